#pragma once
// ResidualMoE<Layer, Act>: PR-MoE's residual expert (Rajbhandari et al. 2022, DeepSpeed-MoE,
// `use_residual`): every token goes through a fixed dense MLP besides its routed experts, and a
// learned per-token softmax mixes the two:
//
//   (c0, c1) = softmax(x · mixᵀ (+ mix_bias)),  y = c0·MoE(x) + c1·MLP(x)
//
//   "residual.w1" [d, fan·G_r], "residual.w2" [G_r, d] (DenseMLP, optional "residual.b1",
//   "residual.b2"), "residual.mix" [2, d], optional "residual.mix_bias" [2].
// The mixing Linear d → 2 has no bias by default; DeepSpeed's nn.Linear(hidden, 2) has one:
// set mix_bias = true to match it. The inner layer's parameters keep their names ("router.…",
// "experts.…", "combine"). A pyramid (PR-MoE: more experts in later layers) is a stack of these
// layers with a different expert count in each inner MoE.
//
// Why a composite and not an Experts type: the Experts concept produces one output per routed
// slot that the combiner then gates; the residual MLP has no slot (it runs for every token) and
// its mixing coefficient multiplies the already combined routed output c0·Σ_k g_k ys_k, so it
// lives one level up, around MoE<>. Like MoE<>, it does not copy x: the memory passed to
// forward must hold the same values until backward.
//
// backward(dy): dc_j = <dy, out_j> (out_0 = MoE(x), out_1 = MLP(x)), dz = c ⊙ (dc − Σ_j c_j dc_j),
//   the MoE gets c0·dy, the MLP c1·dy, dmix += dzᵀ x, dx = dx_MoE + dx_MLP + dz · mix.
// The inner layer's aux loss passes through unchanged.
#include <cmath>
#include <string_view>

#include "smoe/core/buffer.hpp"
#include "smoe/core/parameter.hpp"
#include "smoe/cpu/parallel.hpp"
#include "smoe/experts/expert_pool.hpp"
#include "smoe/layers/accounting.hpp"
#include "smoe/layers/dense_mlp.hpp"
#include "smoe/layers/layer_parameters.hpp"
#include "smoe/layers/moe.hpp"

namespace smoe {

struct ResidualConfig {
  index_t hidden = 0;  // G_r, the residual MLP's hidden units
  bool bias = false;   // biases of the residual MLP
  bool mix_bias = false;

  void validate(const char* context) const {
    if (hidden < 1) fail(context, ": residual hidden (G_r) must be >= 1, got ", hidden);
  }
};

template <class Layer, Activation Act = Relu>
class ResidualMoE {
 public:
  using scalar_type = typename Layer::scalar_type;
  using T = scalar_type;
  using backend = cpu;
  static constexpr const char* name = "ResidualMoE";

  ResidualMoE(Layer moe, ResidualConfig c)
      : moe_(std::move(moe)),
        config_((c.validate(name), c)),
        mlp_(DenseMLPConfig{.d_model = moe_.d_model(), .hidden = c.hidden, .bias = c.bias}),
        mix_({2, moe_.d_model()}) {
    mlp_.validate_inputs = false;  // the inner MoE validates x and what backward receives
    if (c.mix_bias) mix_bias_ = Parameter<T>({2});
  }

  index_t d_model() const { return moe_.d_model(); }
  index_t k() const { return moe_.k(); }
  Layer& moe() { return moe_; }
  const Layer& moe() const { return moe_; }
  auto& router() { return moe_.router(); }
  DenseMLP<T, Act>& residual() { return mlp_; }
  Parameter<T>& mix() { return mix_; }
  Parameter<T>& mix_bias() { return mix_bias_; }
  const ResidualConfig& config() const { return config_; }
  // (c0, c1) of the last forward, [T, 2].
  const Tensor<T>& coefficients() const { return c_; }

  template <class F>
  void for_each_parameter(F&& f) {
    for_each_layer_parameter(moe_, f);
    mlp_.for_each_parameter(with_prefix("residual.", f));
    f(std::string_view("residual.mix"), mix_);
    if (config_.mix_bias) f(std::string_view("residual.mix_bias"), mix_bias_);
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
    const index_t tokens = x.rows, d = d_model();
    expect_shape(name, "x", x, tokens, d);
    expect_shape(name, "y", y, tokens, d);
    moe_y_.resize({tokens, d});
    mlp_y_.resize({tokens, d});
    MoEOutput<T> out = moe_.forward(x, moe_y_.matrix(), mode);
    mlp_.forward(x, mlp_y_.matrix());
    x_ = x;
    c_.resize({tokens, 2});
    detail::elementwise_blocks(tokens, token_block, [&](index_t first, index_t last) {
      for (index_t t = first; t < last; ++t) {
        const T* xt = x.row(t);
        double z[2];
        for (int j = 0; j < 2; ++j) {
          double acc = config_.mix_bias ? double(mix_bias_.value[j]) : 0.0;
          const T* w = mix_.value.data() + j * d;
          for (index_t i = 0; i < d; ++i) acc += double(w[i]) * double(xt[i]);
          z[j] = acc;
        }
        const double top = std::max(z[0], z[1]), e0 = std::exp(z[0] - top), e1 = std::exp(z[1] - top);
        const T c0 = T(e0 / (e0 + e1)), c1 = T(e1 / (e0 + e1));
        c_[2 * t] = c0;
        c_[2 * t + 1] = c1;
        const T *a = moe_y_.data() + t * d, *b = mlp_y_.data() + t * d;
        T* o = y.row(t);
        for (index_t i = 0; i < d; ++i) o[i] = c0 * a[i] + c1 * b[i];
      }
    });
    has_forward_ = true;
    return out;
  }

  void backward(ConstMatrixView<T> dy, MatrixView<T> dx) {
    if (!has_forward_) fail(name, ": backward called before forward");
    const index_t tokens = x_.rows, d = d_model();
    expect_shape(name, "dy", dy, tokens, d);
    expect_shape(name, "dx", dx, tokens, d);
    dz_.resize({tokens, 2});
    d_moe_.resize({tokens, d});
    d_mlp_.resize({tokens, d});
    dx_mlp_.resize({tokens, d});
    detail::elementwise_blocks(tokens, token_block, [&](index_t first, index_t last) {
      for (index_t t = first; t < last; ++t) {
        const T* g = dy.row(t);
        const T *a = moe_y_.data() + t * d, *b = mlp_y_.data() + t * d;
        double dc0 = 0, dc1 = 0;
        for (index_t i = 0; i < d; ++i) dc0 += double(g[i]) * double(a[i]), dc1 += double(g[i]) * double(b[i]);
        const double c0 = double(c_[2 * t]), c1 = double(c_[2 * t + 1]), mean = c0 * dc0 + c1 * dc1;
        dz_[2 * t] = T(c0 * (dc0 - mean));
        dz_[2 * t + 1] = T(c1 * (dc1 - mean));
        T *gm = d_moe_.data() + t * d, *gr = d_mlp_.data() + t * d;
        for (index_t i = 0; i < d; ++i) gm[i] = T(c0) * g[i], gr[i] = T(c1) * g[i];
      }
    });
    // dmix[j] += Σ_t dz[t, j]·x[t], by column blocks (each element sums the tokens in order).
    detail::elementwise_blocks(d, column_block, [&](index_t first, index_t last) {
      for (int j = 0; j < 2; ++j) {
        T* gw = mix_.grad.data() + j * d;
        for (index_t t = 0; t < tokens; ++t) {
          const T z = dz_[2 * t + j];
          const T* xt = x_.row(t);
          for (index_t i = first; i < last; ++i) gw[i] += z * xt[i];
        }
      }
    });
    if (config_.mix_bias)
      for (int j = 0; j < 2; ++j) {
        T s = 0;
        for (index_t t = 0; t < tokens; ++t) s += dz_[2 * t + j];
        mix_bias_.grad[j] += s;
      }
    mlp_.backward(std::as_const(d_mlp_).matrix(), dx_mlp_.matrix());
    moe_.backward(std::as_const(d_moe_).matrix(), dx);
    detail::elementwise_blocks(tokens, token_block, [&](index_t first, index_t last) {
      for (index_t t = first; t < last; ++t) {
        T* o = dx.row(t);
        const T* r = dx_mlp_.data() + t * d;
        const T z0 = dz_[2 * t], z1 = dz_[2 * t + 1];
        const T *w0 = mix_.value.data(), *w1 = mix_.value.data() + d;
        for (index_t i = 0; i < d; ++i) o[i] += r[i] + z0 * w0[i] + z1 * w1[i];
      }
    });
  }

  // Accounting: the inner layer, plus the residual MLP (every token, all of it) and the mixing
  // Linear (2·d parameters, 2·2·d FLOPs).
  index_t total_parameters() const { return smoe::total_parameters(moe_) + residual_parameters(); }
  double active_parameters_per_token() const {
    return smoe::active_parameters_per_token(moe_) + double(residual_parameters());
  }
  double flops_per_token() const {
    return smoe::flops_per_token(moe_) + expert_flops<Act>(d_model(), config_.hidden) + 4.0 * double(d_model());
  }
  double materialization_flops() const { return smoe::materialization_flops(moe_); }

 private:
  static constexpr index_t token_block = 32, column_block = 64;

  index_t residual_parameters() const {
    return expert_parameters<Act>(d_model(), config_.hidden, config_.bias) + 2 * d_model() + (config_.mix_bias ? 2 : 0);
  }

  Layer moe_;
  ResidualConfig config_;
  DenseMLP<T, Act> mlp_;
  Parameter<T> mix_, mix_bias_;
  ConstMatrixView<T> x_;  // the forward input (not copied)
  bool has_forward_ = false;
  Tensor<T> moe_y_, mlp_y_, c_;            // forward cache
  Tensor<T> dz_, d_moe_, d_mlp_, dx_mlp_;  // backward scratch
};

}  // namespace smoe
