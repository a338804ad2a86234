#pragma once
// TorchLayer<Layer>: any smoe CPU layer as a libtorch module (PyTorch's C++ API, Debian's
// libtorch-dev; only users who include this header need it). docs/interop.md shows the use.
//
//   smoe::TorchLayer<Layer> m(std::move(layer));    a torch::nn::ModuleHolder, like torch::nn::Linear
//   auto [y, aux] = m->forward(x);                  y like x, aux a 0-d tensor; both in autograd
//   (task_loss + aux).backward();                   smoe's backward fills x.grad and every p.grad()
//   m->routing_stats();                             one RoutingStats per routing layer, last forward
//
// Layer is any MoE<...> composition (ResidualMoE, SharedExpertsMoE, experts over pools), a MoEStack
// (which owns its pool), DenseMLP, or anything else with FeedForward's members (x [..., d]); or a
// TransformerBlock, whose x is [B, L, d] (B sequences, each causal on its own).
//
// Parameters share storage, no copies in either direction: each smoe Parameter's value and grad are
// wrapped (torch::from_blob) as a registered torch parameter and its .grad(), under smoe's own name
// ("router.weight", "experts.w1", ...; torch forbids dots in a parameter name, so each prefix is a
// submodule and named_parameters() reads the same names). A write through torch is seen by smoe and
// the reverse. The wrappers keep the layer alive (a shared holder), so an optimizer that outlives
// the module holds valid memory. torch::save/torch::load work; load copies into the shared storage
// (libtorch's default would swap the storage out from under smoe). Moving the module to another
// dtype or device (to(...)) is refused: smoe's parameters have one type and live on the host.
//
// Autograd: forward runs a torch::autograd::Function whose backward calls the layer's backward.
// Parameter gradients accumulate straight into the shared .grad() (that is where smoe's backward
// accumulates), so the Function reports none to autograd: torch::autograd::grad(loss, params) does
// not see them, loss.backward() does. A .grad() set to none (zero_grad(true)) is re-attached, zeroed,
// at the next backward; a frozen parameter (requires_grad_(false)) has none. MoE's backward returns
// the gradient of Σ y ⊙ dy + aux (the aux loss with weight 1, its coefficients inside):
// `loss = task + aux` is one backward; any other weight c on aux (unused aux: c = 0) costs a second
// backward for the aux term alone, added as (c − 1)·∂aux.
//
// Caches: a smoe layer keeps the caches of its last forward only, and MoE keeps a view of x, not a
// copy: the Function saves the (contiguous) x for backward, and a backward whose forward is not the
// layer's last is refused with an error (run backward before the next forward, or use one module per
// use). Under torch::NoGradGuard (or with grad mode off) forward builds no graph and saves nothing;
// the layer's own scratch is still written (smoe has no cache-free forward).
//
// Inputs: float32 or float64 (the layer's scalar type), CPU, strided; non-contiguous x is made
// contiguous (one copy, as torch's own ops do), and so is the incoming gradient. Other dtypes and
// devices get an smoe::error naming the argument; CUDA tensors wait for a torch adapter of the
// CUDA backend. Training mode (is_training(), torch's default) runs the layer with Mode::train
// (expert dropout, router noise), eval() with Mode::eval.
#include <torch/autograd.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/serialize/input-archive.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "smoe/core/error.hpp"
#include "smoe/core/parameter.hpp"
#include "smoe/core/view.hpp"
#include "smoe/layers/feed_forward.hpp"
#include "smoe/layers/layer_parameters.hpp"
#include "smoe/layers/routing_stats.hpp"

namespace smoe {

// What TorchLayer::forward returns: y (x's shape) and the layer's aux loss (0-d; 0 for layers without one).
struct TorchLayerOutput {
  torch::Tensor y;
  torch::Tensor aux_loss;
};

namespace detail {

// A TransformerBlock-like layer: forward(x, y, sequences, mode) over x [B·L, d].
template <class L>
concept TorchSequenceLayer = requires(L& l, ConstMatrixView<typename L::scalar_type> x,
                                      MatrixView<typename L::scalar_type> y, index_t sequences, Mode mode) {
  l.forward(x, y, sequences, mode);
  l.backward(x, y);
};

template <class L>
concept TorchWrappable = TorchSequenceLayer<L> || FeedForward<L>;

// The aux loss and routing statistics a layer's forward reports (MoEOutput, FeedForwardOutput,
// a stack's per-layer outputs); nothing for layers whose forward returns void.
template <class T, class Out>
void collect_stats(const Out& out, std::vector<RoutingStats>& stats) {
  if constexpr (requires { out.stats.has_value(); }) {
    if (out.stats) stats.push_back(*out.stats);
  } else if constexpr (requires { RoutingStats(out.stats); }) {
    stats.push_back(out.stats);
  }
  if constexpr (requires { out.layers.begin(); })
    for (const auto& layer : out.layers) collect_stats<T>(layer, stats);
}

template <class T>
constexpr torch::Dtype torch_dtype_of = std::is_same_v<T, float> ? torch::kFloat32 : torch::kFloat64;

// A torch tensor over a smoe tensor's memory (no copy); `keep` lives as long as the wrapper does.
template <class T, class Keep>
torch::Tensor wrap_shared(Tensor<T>& t, const Keep& keep) {
  return torch::from_blob(t.data(), torch::IntArrayRef(t.shape()), [keep](void*) {},
                          torch::TensorOptions().dtype(torch_dtype_of<T>));
}

// The layer, shared by the module, every wrapped parameter (their deleters) and every pending
// backward, so it lives as long as any of them. It refers to the registered torch parameters
// weakly (they hold it: a strong reference would be a cycle).
template <class Layer>
struct TorchLayerState : torch::CustomClassHolder {
  using T = typename Layer::scalar_type;
  explicit TorchLayerState(Layer l) : layer(std::move(l)) {}
  Layer layer;
  std::uint64_t forwards = 0;  // id of the layer's last forward (its caches belong to it)
  std::vector<RoutingStats> stats;
  struct Shared {
    Parameter<T>* parameter;
    c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> value;  // the registered torch parameter
  };
  std::vector<Shared> parameters;

  // Runs the layer on x [rows, d] (a view of contiguous memory) into y; returns the aux loss.
  T run_forward(ConstMatrixView<T> x, MatrixView<T> y, index_t sequences, Mode mode) {
    ++forwards;
    stats.clear();
    if constexpr (TorchSequenceLayer<Layer>) {
      const auto out = layer.forward(x, y, sequences, mode);
      collect_stats<T>(out, stats);
      return T(out.aux_loss);
    } else if constexpr (FeedForwardWithMode<Layer>) {
      using R = decltype(layer.forward(x, y, mode));
      if constexpr (std::is_void_v<R>) {
        layer.forward(x, y, mode);
        return T(0);
      } else {
        const auto out = layer.forward(x, y, mode);
        collect_stats<T>(out, stats);
        if constexpr (requires { out.aux_loss; }) return T(out.aux_loss);
        else return T(0);
      }
    } else {
      (void)mode;
      layer.forward(x, y);
      return T(0);
    }
  }
};

// Re-attaches each .grad() that torch set to none or replaced: smoe's backward accumulates into
// the parameter's grad, which must be what torch reads (a replaced gradient's values are kept).
// A parameter with requires_grad(false) gets none (smoe still computes it; nobody reads it).
template <class State>
void attach_gradients(const c10::intrusive_ptr<State>& state) {
  torch::NoGradGuard no_grad;
  for (auto& s : state->parameters) {
    auto impl = s.value.lock();
    if (!impl) continue;  // the torch parameter is gone: nobody reads its gradient
    torch::Tensor value(std::move(impl));
    torch::Tensor& g = value.mutable_grad();
    if (!value.requires_grad()) {  // frozen: no .grad(), so torch's optimizers skip it
      g.reset();
      continue;
    }
    if (g.defined() && g.data_ptr() == static_cast<void*>(s.parameter->grad.data())) continue;
    torch::Tensor shared = wrap_shared(s.parameter->grad, state);
    if (g.defined()) shared.copy_(g);
    else shared.zero_();
    g = shared;
  }
}

inline std::string shape_string(torch::IntArrayRef sizes) {
  std::string s = "[";
  for (std::size_t i = 0; i < sizes.size(); ++i) s.append(i ? ", " : "").append(std::to_string(sizes[i]));
  return s.append("]");
}

template <class T>
MatrixView<T> rows_of(const torch::Tensor& t, index_t d) {
  return MatrixView<T>(t.data_ptr<std::remove_const_t<T>>(), d == 0 ? 0 : t.numel() / d, d);
}

// The autograd Function: inputs x (contiguous), the parameters (so that y requires grad whenever
// they do), and the state; outputs y and the aux loss.
template <class Layer>
struct TorchLayerFunction : torch::autograd::Function<TorchLayerFunction<Layer>> {
  using T = typename Layer::scalar_type;
  using State = TorchLayerState<Layer>;

  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                                                at::TensorList parameters, c10::intrusive_ptr<State> state,
                                                std::int64_t sequences, bool train) {
    (void)parameters;
    const index_t d = x.size(-1);
    torch::Tensor y = torch::empty_like(x);
    const T aux = state->run_forward(rows_of<const T>(x, d), rows_of<T>(y, d), sequences, train ? Mode::train : Mode::eval);
    ctx->save_for_backward({x});
    ctx->saved_data["state"] = c10::IValue::make_capsule(state);
    ctx->saved_data["forward"] = static_cast<std::int64_t>(state->forwards);
    return {y, torch::scalar_tensor(aux, x.options())};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto state = c10::static_intrusive_pointer_cast<State>(ctx->saved_data["state"].toCapsule());
    const torch::Tensor x = ctx->get_saved_variables()[0];
    if (static_cast<std::uint64_t>(ctx->saved_data["forward"].toInt()) != state->forwards)
      fail("TorchLayer: backward of a forward that is not the layer's last (the layer keeps one forward's "
           "caches; run backward before the next forward, or use one module per use)");
    const index_t d = x.size(-1);
    const torch::Tensor dy = grads[0].defined() ? grads[0].contiguous() : torch::zeros_like(x);
    if (dy.sizes() != x.sizes() || dy.scalar_type() != x.scalar_type())
      fail("TorchLayer: the gradient of y must be ", shape_string(x.sizes()), " ", x.scalar_type(), ", got ",
           shape_string(dy.sizes()), " ", dy.scalar_type());
    const double c = grads[1].defined() ? grads[1].item<double>() : 0.0;  // the weight of aux in the loss
    attach_gradients(state);
    Layer& layer = state->layer;
    torch::Tensor dx = torch::empty_like(x);
    if (c != 1.0) {
      // Σ y ⊙ dy + c·aux = (Σ y ⊙ dy + aux) + (c − 1)·aux: first (c − 1)·∂aux alone (dy = 0) into
      // isolated parameter gradients, then the usual backward on top.
      std::vector<Tensor<T>> saved;
      for (auto& s : state->parameters) {
        saved.push_back(s.parameter->grad);
        s.parameter->grad.zero();
      }
      const torch::Tensor zero = torch::zeros_like(x);
      torch::Tensor dx_aux = torch::empty_like(x);
      layer.backward(rows_of<const T>(zero, d), rows_of<T>(dx_aux, d));
      for (std::size_t i = 0; i < saved.size(); ++i) {
        Tensor<T>& g = state->parameters[i].parameter->grad;
        for (index_t j = 0; j < g.size(); ++j) g[j] = saved[i][j] + T(c - 1.0) * g[j];
      }
      layer.backward(rows_of<const T>(dy, d), rows_of<T>(dx, d));
      torch::NoGradGuard no_grad;
      dx.add_(dx_aux, c - 1.0);
    } else {
      layer.backward(rows_of<const T>(dy, d), rows_of<T>(dx, d));
    }
    // One gradient per input: x, each parameter (accumulated in place above: none here), state,
    // sequences, train.
    torch::autograd::variable_list out{dx};
    out.resize(1 + state->parameters.size() + 3);
    return out;
  }
};

// A node of the parameter-name tree ("router" in "router.weight"). load copies into the shared
// storage: libtorch's default load would replace the tensor's storage with the file's.
class TorchParameterGroup : public torch::nn::Module {
 public:
  void load(torch::serialize::InputArchive& archive) override {
    torch::NoGradGuard no_grad;
    for (auto& p : named_parameters(/*recurse=*/false)) {
      torch::Tensor read;
      archive.read(p.key(), read);
      if (read.sizes() != p.value().sizes())
        fail("TorchLayer::load: parameter ", p.key(), " must be ", shape_string(p.value().sizes()), ", got ",
             shape_string(read.sizes()));
      p.value().copy_(read);
    }
    for (auto& child : named_children()) {
      torch::serialize::InputArchive child_archive;
      archive.read(child.key(), child_archive);
      child.value()->load(child_archive);
    }
  }
};

}  // namespace detail

template <class Layer>
class TorchLayerImpl : public detail::TorchParameterGroup {
  static_assert(std::is_same_v<backend_of_t<Layer>, cpu>,
                "TorchLayer: CPU layers only for now (a CUDA layer needs a device adapter)");
  static_assert(std::is_same_v<typename Layer::scalar_type, float> || std::is_same_v<typename Layer::scalar_type, double>,
                "TorchLayer: the layer's scalar type must be float or double");
  static_assert(detail::TorchWrappable<Layer>,
                "TorchLayer: Layer must be a FeedForward layer (layers/feed_forward.hpp) or a TransformerBlock");

 public:
  using layer_type = Layer;
  using T = typename Layer::scalar_type;
  static constexpr const char* name = "TorchLayer";

  explicit TorchLayerImpl(Layer layer) : state_(c10::make_intrusive<State>(std::move(layer))) {
    if constexpr (HasParameters<Layer>)
      for_each_layer_parameter(state_->layer, [&](std::string_view n, Parameter<T>& p) { share(std::string(n), p); });
  }

  Layer& layer() { return state_->layer; }
  const Layer& layer() const { return state_->layer; }
  // One entry per routing layer (a stack or block: in order), from the last forward.
  const std::vector<RoutingStats>& routing_stats() const { return state_->stats; }

  TorchLayerOutput forward(const torch::Tensor& x) {
    const index_t d = state_->layer.d_model();
    if (!x.defined()) fail(name, ": x must be a tensor, got an undefined one");
    if (x.device().type() != torch::kCPU)
      fail(name, ": x device must be cpu, got ", x.device().str(), " (CUDA tensors need the CUDA backend's adapter)");
    if (x.layout() != torch::kStrided) fail(name, ": x layout must be strided, got ", x.layout());
    if (x.scalar_type() != detail::torch_dtype_of<T>)
      fail(name, ": x dtype must be ", detail::torch_dtype_of<T>, " (the layer's scalar type), got ", x.scalar_type());
    index_t sequences = 1;
    if constexpr (detail::TorchSequenceLayer<Layer>) {
      if (x.dim() != 3 || x.size(2) != d)
        fail(name, ": x must be [B, L, d_model = ", d, "] (sequences, positions, features), got ",
             detail::shape_string(x.sizes()));
      sequences = x.size(0);
      if (sequences == 0) fail(name, ": x must hold at least one sequence, got ", detail::shape_string(x.sizes()));
    } else {
      if (x.dim() < 1 || x.size(-1) != d)
        fail(name, ": x must be [..., d_model = ", d, "], got ", detail::shape_string(x.sizes()));
    }
    const torch::Tensor xc = x.contiguous();
    const bool train = is_training();
    if (!torch::GradMode::is_enabled()) {
      // No graph: nothing saved, and any backward still pending for this layer is now refused.
      torch::Tensor y = torch::empty_like(xc);
      const T aux = state_->run_forward(detail::rows_of<const T>(xc, d), detail::rows_of<T>(y, d), sequences,
                                        train ? Mode::train : Mode::eval);
      return {y, torch::scalar_tensor(aux, xc.options())};
    }
    auto out = detail::TorchLayerFunction<Layer>::apply(xc, at::TensorList(registered_), state_, sequences, train);
    return {out[0], out[1]};
  }

  // smoe's parameters are T on the host: a move is refused unless it changes nothing.
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override {
    to(device, non_blocking);
    to(dtype, non_blocking);
  }
  void to(torch::Dtype dtype, bool /*non_blocking*/ = false) override {
    if (dtype != detail::torch_dtype_of<T>)
      fail(name, ": to(", dtype, ") is not supported: the smoe layer's parameters are ", detail::torch_dtype_of<T>,
           " (build the layer with the other scalar type)");
  }
  void to(torch::Device device, bool /*non_blocking*/ = false) override {
    if (device.type() != torch::kCPU)
      fail(name, ": to(", device.str(), ") is not supported: the smoe layer is a CPU layer");
  }

 private:
  using State = detail::TorchLayerState<Layer>;

  // Wraps p's value and grad without copying and registers the value under `full_name`, making a
  // submodule per dotted prefix.
  void share(const std::string& full_name, Parameter<T>& p) {
    torch::nn::Module* node = this;
    std::string prefix;
    std::size_t begin = 0;
    for (std::size_t dot; (dot = full_name.find('.', begin)) != std::string::npos; begin = dot + 1) {
      const std::string part = full_name.substr(begin, dot - begin);
      prefix += prefix.empty() ? part : "." + part;
      auto it = groups_.find(prefix);
      if (it == groups_.end())
        it = groups_.emplace(prefix, node->register_module(part, std::make_shared<detail::TorchParameterGroup>())).first;
      node = it->second.get();
    }
    torch::Tensor& value =
        node->register_parameter(full_name.substr(begin), detail::wrap_shared(p.value, state_), /*requires_grad=*/true);
    value.mutable_grad() = detail::wrap_shared(p.grad, state_);
    registered_.push_back(value);
    state_->parameters.push_back({&p, c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
                                          value.getIntrusivePtr())});
  }

  c10::intrusive_ptr<State> state_;
  std::vector<torch::Tensor> registered_;  // the torch parameters, in smoe's visiting order
  std::map<std::string, std::shared_ptr<torch::nn::Module>> groups_;
};

// The module holder, used as torch's own (torch::nn::Linear): TorchLayer<Layer> m(std::move(layer)).
template <class Layer>
class TorchLayer : public torch::nn::ModuleHolder<TorchLayerImpl<Layer>> {
 public:
  using torch::nn::ModuleHolder<TorchLayerImpl<Layer>>::ModuleHolder;
};

// TorchLayer with the layer type deduced.
template <class Layer>
TorchLayer<std::remove_cvref_t<Layer>> make_torch_layer(Layer&& layer) {
  return TorchLayer<std::remove_cvref_t<Layer>>(std::forward<Layer>(layer));
}

}  // namespace smoe
