#pragma once
// The stacks of smoe_eval's multi-layer mode (smoe_eval_stack.hpp): evaluate_stack<T, P, Backend>,
// explicitly instantiated for each dtype T and pool P by smoe_eval_stack_float.cpp and
// smoe_eval_stack_double.cpp on the CPU, and by smoe_eval_cuda.cpp on the CUDA backend (which
// includes the CUDA headers first and says what a device layer's forward returns: LayerOutput).
//
// Layer l of the stack is, from the inside out,
//   MoE<SoftmaxTopK | SigmoidTopK, Experts, WeightedSum, SwitchBalance, RouterZ, Entropy, Importance>
//   with Experts = FeedForwardExperts (per_layer), TiedExperts (tied) or SaMoEExperts (samoe_*),
//   wrapped in ResidualMoE when "residual_expert_size" > 0: c0·MoE(x) + c1·MLP(x),
//   then in SharedExpertsMoE when "shared_experts" > 0: (…) + Σ_j FFN_j(x), ungated,
// so the shared experts are added outside the PR-MoE mixture, which mixes only the routed output
// with the residual MLP. The layers form a MoEStack<AnyLayer, Pool>, which owns the pool.
#include <smoe/combine/weighted_sum.hpp>
#include <smoe/experts/activation.hpp>
#include <smoe/experts/expert_pool.hpp>
#include <smoe/experts/feed_forward_experts.hpp>
#include <smoe/experts/samoe_experts.hpp>
#include <smoe/experts/tied_experts.hpp>
#include <smoe/layers/moe.hpp>
#include <smoe/layers/moe_stack.hpp>
#include <smoe/layers/residual_moe.hpp>
#include <smoe/layers/shared_experts_moe.hpp>
#include <smoe/losses/entropy.hpp>
#include <smoe/losses/importance.hpp>
#include <smoe/losses/switch_balance.hpp>
#include <smoe/losses/z_loss.hpp>
#include <smoe/routing/sigmoid_topk.hpp>
#include <smoe/routing/softmax_topk.hpp>

#include <concepts>
#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "smoe_eval_stack.hpp"

namespace smoe_eval {
namespace stack_detail {

// What a layer's forward returns on Backend (smoe_eval_cuda.cpp specializes it for smoe::cuda).
template <class T, class Backend>
struct LayerOutput {
  using type = smoe::MoEOutput<T>;
};

// A layer of the stack behind a virtual interface: a MoE<>, or a composite (ResidualMoE,
// SharedExpertsMoE) around an AnyLayer. The composites and the MoEStack are then instantiated once
// per activation and pool rather than once per router × activation × pool × composite (compile
// time). Every call is forwarded unchanged.
template <class T, class Backend>
class AnyLayer {
 public:
  using scalar_type = T;
  using gate_type = T;  // float and double: the routing runs in T on both backends
  using backend = Backend;
  using ConstMatrixView = smoe::ConstMatrixView<T, Backend>;
  using MatrixView = smoe::MatrixView<T, Backend>;
  using Parameter = smoe::Parameter<T, Backend>;
  template <class U>
  using Tensor = smoe::Tensor<U, Backend>;
  using Output = typename LayerOutput<T, Backend>::type;

  template <class Layer>
    requires(!std::same_as<std::remove_cvref_t<Layer>, AnyLayer>)
  explicit AnyLayer(Layer layer) : impl_(std::make_unique<Model<Layer>>(std::move(layer))) {}
  AnyLayer(AnyLayer&&) noexcept = default;
  AnyLayer& operator=(AnyLayer&&) noexcept = default;

  index_t d_model() const { return impl_->d_model(); }
  index_t k() const { return impl_->k(); }
  Output forward(ConstMatrixView x, MatrixView y, smoe::Mode mode = smoe::Mode::eval) { return impl_->forward(x, y, mode); }
  void backward(ConstMatrixView dy, MatrixView dx) { impl_->backward(dy, dx); }
  // Device layers: the stream of the wrapped layer, the losses and routing statistics of the last
  // forward (waiting for the stream).
  auto stream() const
    requires(!std::is_same_v<Backend, smoe::cpu>)
  {
    return impl_->stream();
  }
  template <class Stream>
  void set_stream(Stream s) {
    impl_->set_stream(s);
  }
  smoe::MoEOutput<T> read_losses() const { return impl_->read_losses(); }
  smoe::RoutingStats routing_stats() const { return impl_->routing_stats(); }
  // The names for_each_layer_parameter gives the wrapped layer: "router.weight", "experts.w1" (own
  // experts), "combine" (SaMoE), "residual.…", "shared.…".
  template <class F>
  void for_each_parameter(F&& f) {
    impl_->visit([&f](std::string_view name, Parameter& p) { f(name, p); });
  }
  // Of the routed MoE<> inside: the dispatched ids (−1 where capacity dropped the assignment), the
  // router's gates, and SaMoE's α_l over all M members (0 outside the selected ones; empty for
  // other experts).
  const Tensor<std::int32_t>& dispatched_experts() const { return impl_->dispatched_experts(); }
  const Tensor<T>& gates() const { return impl_->gates(); }
  std::vector<T> combine_coefficients() { return impl_->combine_coefficients(); }
  // (c0, c1) [T, 2] of the ResidualMoE inside, or null.
  const Tensor<T>* residual_coefficients() const { return impl_->residual_coefficients(); }

 private:
  using Visitor = std::function<void(std::string_view, Parameter&)>;
  using Stream = decltype(smoe::detail::stream_of(std::declval<const smoe::Tensor<T, Backend>&>()));
  struct Base {
    virtual ~Base() = default;
    virtual index_t d_model() const = 0;
    virtual index_t k() const = 0;
    virtual Output forward(ConstMatrixView x, MatrixView y, smoe::Mode mode) = 0;
    virtual void backward(ConstMatrixView dy, MatrixView dx) = 0;
    virtual void visit(const Visitor& f) = 0;
    virtual Stream stream() const = 0;
    virtual void set_stream(Stream s) = 0;
    virtual smoe::MoEOutput<T> read_losses() const = 0;
    virtual smoe::RoutingStats routing_stats() const = 0;
    virtual const Tensor<std::int32_t>& dispatched_experts() const = 0;
    virtual const Tensor<T>& gates() const = 0;
    virtual std::vector<T> combine_coefficients() = 0;
    virtual const Tensor<T>* residual_coefficients() const = 0;
  };
  // Layer: a MoE<> (it has routing()) or a composite whose moe() is an AnyLayer.
  template <class Layer>
  struct Model final : Base {
    static constexpr bool routed = requires(Layer& l) { l.routing(); };
    explicit Model(Layer l) : layer(std::move(l)) {}
    index_t d_model() const override { return layer.d_model(); }
    index_t k() const override { return layer.k(); }
    Output forward(ConstMatrixView x, MatrixView y, smoe::Mode mode) override { return layer.forward(x, y, mode); }
    void backward(ConstMatrixView dy, MatrixView dx) override { layer.backward(dy, dx); }
    void visit(const Visitor& f) override { smoe::for_each_layer_parameter(layer, f); }
    Stream stream() const override { return smoe::detail::stream_of(layer); }
    void set_stream(Stream s) override {
      if constexpr (requires { layer.set_stream(s); }) layer.set_stream(s);
    }
    // Only device layers keep their losses apart from forward's result.
    smoe::MoEOutput<T> read_losses() const override {
      if constexpr (requires { layer.read_losses(); })
        return layer.read_losses();
      else
        fail("AnyLayer: read_losses is for device layers");
    }
    smoe::RoutingStats routing_stats() const override {
      if constexpr (requires { layer.routing_stats(); })
        return layer.routing_stats();
      else
        fail("AnyLayer: routing_stats is for device layers");
    }
    const Tensor<std::int32_t>& dispatched_experts() const override {
      if constexpr (routed)
        return layer.dispatched_experts();
      else
        return layer.moe().dispatched_experts();
    }
    const Tensor<T>& gates() const override {
      if constexpr (routed)
        return layer.routing().gates;
      else
        return layer.moe().gates();
    }
    std::vector<T> combine_coefficients() override {
      if constexpr (requires { layer.experts().coefficients(); })
        return layer.experts().coefficients();
      else if constexpr (routed)
        return {};
      else
        return layer.moe().combine_coefficients();
    }
    const Tensor<T>* residual_coefficients() const override {
      if constexpr (requires(Layer& l) { l.mix(); })
        return &layer.coefficients();
      else if constexpr (routed)
        return nullptr;
      else
        return layer.moe().residual_coefficients();
    }
    Layer layer;
  };
  std::unique_ptr<Base> impl_;
};

template <class T, class Act, PoolKind P, class B>
using PoolOf = std::conditional_t<P == PoolKind::per_layer, smoe::NoPool,
                                  std::conditional_t<P == PoolKind::tied, smoe::FeedForwardExperts<T, Act, B>,
                                                     smoe::ExpertPool<T, Act, B>>>;

// The pool the stack owns (per_layer layers own their experts and use NoPool).
template <class T, class Act, PoolKind P, class B>
  requires(P != PoolKind::per_layer)
PoolOf<T, Act, P, B> make_pool(const StackSpec& s) {
  if constexpr (P == PoolKind::tied)
    return smoe::FeedForwardExperts<T, Act, B>(
        {.d_model = s.d_model, .experts = s.n_experts, .hidden = s.expert_size, .bias = s.bias});
  else
    return smoe::ExpertPool<T, Act, B>({.d_model = s.d_model,
                                     .experts = s.n_experts,
                                     .hidden = s.expert_size,
                                     .members = s.members,
                                     .bias = s.bias});
}

template <class T, class B, class R, class X>
AnyLayer<T, B> assemble_moe(const StackSpec& s, R router, X experts) {
  smoe::MoE layer(std::move(router), std::move(experts), smoe::WeightedSum<T, B>{},
                  smoe::SwitchBalanceLoss<T, B>(s.coef.switch_balance), smoe::RouterZLoss<T, B>(s.coef.z),
                  smoe::EntropyLoss<T, B>(s.coef.entropy), smoe::ImportanceLoss<T, B>(s.coef.importance));
  layer.validate_inputs = true;
  layer.capacity.capacity_factor = s.capacity_factor;
  return AnyLayer<T, B>(std::move(layer));
}

// Layer l over `pool` (unused by per_layer experts, which are the layer's own): the routed MoE<>,
// inside a ResidualMoE with a residual expert, inside a SharedExpertsMoE with shared experts.
template <class T, class Act, PoolKind P, class B>
AnyLayer<T, B> make_layer(const StackSpec& s, PoolOf<T, Act, P, B>& pool, index_t l) {
  auto experts = [&] {
    if constexpr (P == PoolKind::per_layer)
      return smoe::FeedForwardExperts<T, Act, B>(
          {.d_model = s.d_model, .experts = s.n_experts, .hidden = s.expert_size, .bias = s.bias});
    else if constexpr (P == PoolKind::tied)
      return smoe::TiedExperts<T, Act, B>(pool);
    else
      return smoe::SaMoEExperts<T, Act,
                                std::conditional_t<P == PoolKind::samoe_weight, smoe::WeightSpace, smoe::OutputSpace>, B>(
          pool, {.layer = l, .temperature = s.temperature, .top_members = s.top_members});
  }();
  const smoe::TopKRouterConfig c{.d_model = s.d_model, .experts = s.n_experts, .k = s.k};
  AnyLayer<T, B> layer = [&] {
    if (s.sigmoid) return assemble_moe<T, B>(s, smoe::SigmoidTopK<T, B>(c), std::move(experts));
    return assemble_moe<T, B>(s, smoe::TopKRouter<T, smoe::SoftmaxGate, B>(c, {.renormalize = s.renormalize}),
                              std::move(experts));
  }();
  if (s.residual_size > 0)
    layer = AnyLayer<T, B>(smoe::ResidualMoE<AnyLayer<T, B>, Act>(
        std::move(layer), {.hidden = s.residual_size, .bias = s.bias, .mix_bias = s.residual_mix_bias}));
  if (s.shared_experts > 0)
    layer = AnyLayer<T, B>(smoe::SharedExpertsMoE<AnyLayer<T, B>, Act>(
        std::move(layer), {.experts = s.shared_experts, .hidden = s.expert_size, .bias = s.bias}));
  return layer;
}

template <class T>
smoe::Tensor<T> scalar(T value) {
  smoe::Tensor<T> t(std::vector<index_t>{});
  t[0] = value;
  return t;
}

// A tensor on the host: itself, or a device tensor's copy (smoe::to_host, waits for its stream).
template <class U, class B>
decltype(auto) on_host(const smoe::Tensor<U, B>& t) {
  if constexpr (std::is_same_v<B, smoe::cpu>)
    return (t);
  else
    return to_host(t);
}
// A host tensor in memory space B: itself, or its device copy.
template <class B, class U>
decltype(auto) in_space(const smoe::Tensor<U>& t) {
  if constexpr (std::is_same_v<B, smoe::cpu>)
    return (t);
  else
    return to_device(t);
}

template <class Stack>
smoe::io::SafetensorsWriter evaluate(Stack& stack, const StackSpec& s, const smoe::io::SafetensorsFile& in) {
  using T = typename Stack::scalar_type;
  using B = typename Stack::backend;
  const index_t d = s.d_model, E = s.n_experts;
  load_parameters<T>(in, stack, {"x", "dy"});
  const auto x_host = load_x<T>(in, d);
  const std::vector<index_t> x_shape = x_host.shape();
  const index_t tokens = x_shape[0];
  smoe::Tensor<T> dy;
  if (in.contains("dy")) dy = load<T>(in, "dy", x_shape);  // checked before anything runs

  const auto& x = in_space<B>(x_host);
  smoe::Tensor<T, B> y({tokens, d});
  const auto result = stack.forward(x.matrix(), y.matrix(), s.mode);

  smoe::io::SafetensorsWriter out;
  out.set_metadata("producer", "smoe_eval");
  out.add("y", on_host(y));
  T aux_total = 0;
  for (index_t l = 0; l < stack.layers(); ++l) {
    const std::string prefix = "layers." + std::to_string(l) + ".";
    AnyLayer<T, B>& layer = stack.layer(l);
    // A device layer keeps its losses and routing on the device until asked.
    const smoe::MoEOutput<T> r = [&] {
      if constexpr (std::is_same_v<B, smoe::cpu>) {
        return result.layers[static_cast<std::size_t>(l)];
      } else {
        smoe::MoEOutput<T> o = layer.read_losses();
        o.stats = layer.routing_stats();
        return o;
      }
    }();
    aux_total += r.aux_loss;
    out.add(prefix + "aux_loss", scalar(r.aux_loss));
    smoe::Tensor<std::int64_t> counts({E});
    for (index_t e = 0; e < E; ++e) counts[e] = r.stats.tokens_per_expert[static_cast<std::size_t>(e)];
    out.add(prefix + "expert_counts", counts);
    out.add(prefix + "routing.tokens_per_expert", counts);
    // As in the single-layer mode: dropped assignments are −1 with gate 0.
    const smoe::Tensor<std::int32_t>& ids = on_host(layer.dispatched_experts());
    smoe::Tensor<T> gates = on_host(layer.gates());
    for (index_t i = 0; i < gates.size(); ++i)
      if (ids[i] < 0) gates[i] = T(0);
    out.add(prefix + "routing.experts", ids);
    out.add(prefix + "routing.gates", gates);
    if (const std::vector<T> alpha = layer.combine_coefficients(); !alpha.empty()) {
      smoe::Tensor<T> a({index_t(alpha.size())});
      for (std::size_t m = 0; m < alpha.size(); ++m) a[index_t(m)] = alpha[m];
      out.add(prefix + "combine_coefficients", a);
    }
    if (const auto* c = layer.residual_coefficients()) out.add(prefix + "residual_coefficients", on_host(*c));
  }
  out.add("aux_loss", scalar(aux_total));

  if (dy.rank() == 2) {
    smoe::Tensor<T, B> dx({tokens, d});
    smoe::zero_grad(stack);
    stack.backward(in_space<B>(dy).matrix(), dx.matrix());
    out.add("grad.x", on_host(dx));
    stack.for_each_parameter([&](std::string_view name, smoe::Parameter<T, B>& p) {
      out.add("grad." + std::string(name), on_host(p.grad));
    });
  }
  return out;
}

template <class T, class Act, PoolKind P, class B>
smoe::io::SafetensorsWriter evaluate_act(const StackSpec& s, const smoe::io::SafetensorsFile& in) {
  using Pool = PoolOf<T, Act, P, B>;
  if constexpr (P == PoolKind::per_layer) {
    smoe::MoEStack<AnyLayer<T, B>> stack(s.layers, [&](index_t l) {
      smoe::NoPool none;
      return make_layer<T, Act, P, B>(s, none, l);
    });
    return evaluate(stack, s, in);
  } else {
    smoe::MoEStack<AnyLayer<T, B>, Pool> stack(make_pool<T, Act, P, B>(s), s.layers, [&](Pool& pool, index_t l) {
      return make_layer<T, Act, P, B>(s, pool, l);
    });
    return evaluate(stack, s, in);
  }
}

}  // namespace stack_detail

template <class T, PoolKind P, class Backend>
smoe::io::SafetensorsWriter evaluate_stack(const StackSpec& s, const smoe::io::SafetensorsFile& in) {
  switch (s.activation) {
    case ActivationKind::relu: return stack_detail::evaluate_act<T, smoe::Relu, P, Backend>(s, in);
    case ActivationKind::gelu: return stack_detail::evaluate_act<T, smoe::Gelu, P, Backend>(s, in);
    case ActivationKind::swiglu: break;
  }
  return stack_detail::evaluate_act<T, smoe::SwiGlu, P, Backend>(s, in);
}

}  // namespace smoe_eval
