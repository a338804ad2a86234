#pragma once
// SharedExpertsMoE<Layer, Act>: DeepSeekMoE's shared experts (Dai et al. 2024, "DeepSeekMoE:
// Towards Ultimate Expert Specialization"): N_s experts every token goes through, their outputs
// added ungated to the routed output:
//
//   y = MoE(x) + Σ_{j<N_s} FFN^shared_j(x)
//
//   "shared.w1" [N_s, d, fan·G_s], "shared.w2" [N_s, G_s, d] (optional "shared.b1", "shared.b2").
// With sigmoid_gate (Qwen2-MoE's shared_expert_gate, a Linear d → 1 without bias) the shared sum
// is scaled per token:  y = MoE(x) + σ(x·w_g) · Σ_j FFN^shared_j(x),   "shared_gate" [1, d].
// The shared experts are a FeedForwardExperts run over a dispatch that sends every token to each
// of them (the same grouped GEMM as the routed experts). The inner layer's parameters keep their
// names ("router.…", "experts.…", "combine").
//
// Why a composite and not an Experts type: an Experts type computes one output per routed slot,
// and the router decides the slots; an always-on, ungated expert has no slot (adding it as extra
// slots would change K, the gates, the balance losses and the routing statistics), so it lives
// one level up, around MoE<>. Like MoE<>, it does not copy x: the memory passed to forward must
// hold the same values until backward.
#include <cmath>
#include <cstdint>
#include <string_view>

#include "smoe/core/buffer.hpp"
#include "smoe/core/dispatch.hpp"
#include "smoe/core/parameter.hpp"
#include "smoe/cpu/parallel.hpp"
#include "smoe/experts/expert_pool.hpp"
#include "smoe/experts/feed_forward_experts.hpp"
#include "smoe/layers/accounting.hpp"
#include "smoe/layers/layer_parameters.hpp"
#include "smoe/layers/moe.hpp"

namespace smoe {

struct SharedExpertsConfig {
  index_t experts = 1;  // N_s
  index_t hidden = 0;   // G_s, hidden units of one shared expert
  bool bias = false;
  bool sigmoid_gate = false;  // scale the shared sum by σ(x·w_g) (Qwen2-MoE)

  void validate(const char* context) const {
    if (experts < 1) fail(context, ": shared experts (N_s) must be >= 1, got ", experts);
    if (hidden < 1) fail(context, ": shared hidden (G_s) must be >= 1, got ", hidden);
  }
};

template <class Layer, Activation Act = Relu>
class SharedExpertsMoE {
 public:
  using scalar_type = typename Layer::scalar_type;
  using T = scalar_type;
  using backend = cpu;
  static constexpr const char* name = "SharedExpertsMoE";

  SharedExpertsMoE(Layer moe, SharedExpertsConfig c)
      : moe_(std::move(moe)),
        config_((c.validate(name), c)),
        shared_(FeedForwardConfig{.d_model = moe_.d_model(), .experts = c.experts, .hidden = c.hidden, .bias = c.bias}) {
    if (c.sigmoid_gate) shared_gate_ = Parameter<T>({1, moe_.d_model()});
  }

  index_t d_model() const { return moe_.d_model(); }
  index_t k() const { return moe_.k(); }
  index_t shared_experts() const { return config_.experts; }
  Layer& moe() { return moe_; }
  const Layer& moe() const { return moe_; }
  auto& router() { return moe_.router(); }
  FeedForwardExperts<T, Act>& shared() { return shared_; }
  Parameter<T>& shared_gate() { return shared_gate_; }  // [1, d]; empty unless config().sigmoid_gate
  const SharedExpertsConfig& config() const { return config_; }

  template <class F>
  void for_each_parameter(F&& f) {
    for_each_layer_parameter(moe_, f);
    shared_.for_each_parameter(with_prefix("shared.", f));
    if (config_.sigmoid_gate) f(std::string_view("shared_gate"), shared_gate_);
  }

  // The inner layer's buffers and counters (a router's expert-dropout step) under their own names,
  // so that a checkpoint of the composite resumes the same random sequence.
  template <class F>
  void for_each_buffer(F&& f) {
    for_each_buffer_of(moe_, f);
  }
  template <class F>
  void for_each_counter(F&& f) {
    for_each_counter_of(moe_, f);
  }

  MoEOutput<T> forward(ConstMatrixView<T> x, MatrixView<T> y, Mode mode = Mode::eval) {
    const index_t tokens = x.rows, d = d_model(), Ns = shared_experts();
    expect_shape(name, "x", x, tokens, d);
    expect_shape(name, "y", y, tokens, d);
    MoEOutput<T> out = moe_.forward(x, y, mode);
    if (dispatch_.tokens != tokens || dispatch_.experts != Ns) {  // every token to every shared expert
      ids_.resize({tokens, Ns});
      gates_.resize({tokens, Ns});
      for (index_t t = 0; t < tokens; ++t)
        for (index_t j = 0; j < Ns; ++j) ids_[t * Ns + j] = std::int32_t(j), gates_[t * Ns + j] = T(1);
      build_dispatch(std::as_const(ids_).matrix(), std::as_const(gates_).matrix(), Ns, dispatch_);
    }
    ys_.resize({dispatch_.assignments(), d});
    shared_.forward(x, dispatch_, ys_.matrix());
    gate_.resize({config_.sigmoid_gate ? tokens : 0});
    detail::elementwise_blocks(tokens, token_block, [&](index_t first, index_t last) {
      for (index_t t = first; t < last; ++t) {
        T* o = y.row(t);
        T g = T(1);
        if (config_.sigmoid_gate) {
          T z = 0;
          for (index_t i = 0; i < d; ++i) z += x(t, i) * shared_gate_.value[i];
          g = gate_[t] = T(1) / (T(1) + std::exp(-z));
        }
        for (index_t j = 0; j < Ns; ++j) {
          const T* in = ys_.data() + dispatch_.slot(t, j) * d;
          for (index_t i = 0; i < d; ++i) o[i] += g * in[i];
        }
      }
    });
    x_ = x;
    has_forward_ = true;
    return out;
  }

  void backward(ConstMatrixView<T> dy, MatrixView<T> dx) {
    if (!has_forward_) fail(name, ": backward called before forward");
    const index_t tokens = x_.rows, d = d_model();
    expect_shape(name, "dy", dy, tokens, d);
    expect_shape(name, "dx", dx, tokens, d);
    moe_.backward(dy, dx);
    // Every slot's output gradient is its token's dy (times the token's gate g when gated).
    dys_.resize({dispatch_.assignments(), d});
    detail::elementwise_blocks(dispatch_.assignments(), token_block, [&](index_t first, index_t last) {
      for (index_t s = first; s < last; ++s) {
        const index_t t = dispatch_.slot_token[static_cast<std::size_t>(s)];
        const T g = config_.sigmoid_gate ? gate_[t] : T(1);
        for (index_t i = 0; i < d; ++i) dys_[s * d + i] = g * dy(t, i);
      }
    });
    dx_shared_.resize({tokens, d});
    shared_.backward(x_, dispatch_, std::as_const(dys_).matrix(), dx_shared_.matrix());
    if (config_.sigmoid_gate) {
      // y += g·S with S = Σ_j ys_j and g = σ(z), z = x·w_g:  ∂z = g(1 − g)·⟨dy, S⟩,
      // w_g.grad += ∂z·x and dx += ∂z·w_g (tokens in order, so the weight gradient is deterministic).
      for (index_t t = 0; t < tokens; ++t) {
        T dot = 0;
        for (index_t j = 0; j < shared_experts(); ++j) {
          const T* in = ys_.data() + dispatch_.slot(t, j) * d;
          for (index_t i = 0; i < d; ++i) dot += dy(t, i) * in[i];
        }
        const T dz = gate_[t] * (T(1) - gate_[t]) * dot;
        for (index_t i = 0; i < d; ++i) {
          shared_gate_.grad[i] += dz * x_(t, i);
          dx_shared_[t * d + i] += dz * shared_gate_.value[i];
        }
      }
    }
    detail::elementwise_blocks(tokens, token_block, [&](index_t first, index_t last) {
      for (index_t t = first; t < last; ++t) {
        T* o = dx.row(t);
        const T* in = dx_shared_.data() + t * d;
        for (index_t i = 0; i < d; ++i) o[i] += in[i];
      }
    });
  }

  // Accounting: the inner layer plus N_s shared experts, all active for every token.
  index_t total_parameters() const { return smoe::total_parameters(moe_) + shared_parameters(); }
  double active_parameters_per_token() const {
    return smoe::active_parameters_per_token(moe_) + double(shared_parameters());
  }
  double flops_per_token() const {
    return smoe::flops_per_token(moe_) + double(shared_experts()) * expert_flops<Act>(d_model(), config_.hidden);
  }
  double materialization_flops() const { return smoe::materialization_flops(moe_); }

 private:
  static constexpr index_t token_block = 32;

  index_t shared_parameters() const {
    return shared_experts() * expert_parameters<Act>(d_model(), config_.hidden, config_.bias) +
           (config_.sigmoid_gate ? d_model() : 0);
  }

  Layer moe_;
  SharedExpertsConfig config_;
  FeedForwardExperts<T, Act> shared_;
  Parameter<T> shared_gate_;  // [1, d] when config_.sigmoid_gate
  Tensor<T> gate_;            // σ(x·w_g) per token of the last forward
  ConstMatrixView<T> x_;  // the forward input (not copied)
  bool has_forward_ = false;
  Tensor<std::int32_t> ids_;
  Tensor<T> gates_;
  Dispatch<T> dispatch_;  // every token to every shared expert, rebuilt when T changes
  Tensor<T> ys_, dys_, dx_shared_;
};

}  // namespace smoe
