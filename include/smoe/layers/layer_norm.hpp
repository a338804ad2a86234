#pragma once
// LayerNorm (Ba, Kiros & Hinton 2016), per token over d, biased variance:
//   μ = mean_c x_c,  r = 1 / sqrt(mean_c (x_c − μ)² + eps),  x̂ = (x − μ)·r,  y = x̂ ⊙ w + b
//   "weight" w [d] (initialized to 1), "bias" b [d] (initialized to 0)
// backward, with g = dy ⊙ w:
//   dx = r · (g − mean_c g_c − x̂ · mean_c(g_c x̂_c)),   dw += Σ_t dy ⊙ x̂,   db += Σ_t dy
// Row statistics accumulate in double (two passes: mean, then centered variance). The forward
// keeps a copy of x, μ and r [N]; dw and db are summed per fixed block of tokens, then over blocks
// in order, so they are the same for any thread count.
#include <algorithm>
#include <cmath>
#include <string_view>
#include <type_traits>

#include "smoe/core/parameter.hpp"
#include "smoe/core/validate.hpp"
#include "smoe/cpu/parallel.hpp"

namespace smoe {

struct LayerNormConfig {
  index_t d_model = 0;
  double eps = 1e-5;

  void validate(const char* context) const {
    if (d_model < 1) fail(context, ": d_model must be >= 1, got ", d_model);
    if (!(eps > 0) || !std::isfinite(eps)) fail(context, ": eps must be finite and > 0, got ", eps);
  }
};

template <class T, class Backend = cpu>
class LayerNorm {
  static_assert(std::is_same_v<Backend, cpu>, "LayerNorm<T, smoe::cuda> needs <smoe/cuda/layer_norm.cuh>");

 public:
  using scalar_type = T;
  using backend = cpu;
  static constexpr const char* name = "LayerNorm";
  bool validate_inputs = validate_by_default;

  explicit LayerNorm(LayerNormConfig c) : config_((c.validate(name), c)), weight_({c.d_model}), bias_({c.d_model}) {
    weight_.value.fill(T(1));
  }

  index_t d_model() const { return config_.d_model; }
  const LayerNormConfig& config() const { return config_; }
  Parameter<T>& weight() { return weight_; }
  Parameter<T>& bias() { return bias_; }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("weight"), weight_);
    f(std::string_view("bias"), bias_);
  }

  // Accounting: 2·d parameters; elementwise work is not counted in FLOPs (only matrix products are).
  index_t total_parameters() const { return 2 * config_.d_model; }
  double active_parameters_per_token() const { return double(2 * config_.d_model); }
  double flops_per_token() const { return 0.0; }

  // x, y [N, d]; y may not alias x.
  void forward(ConstMatrixView<T> x, MatrixView<T> y) {
    const index_t tokens = x.rows, d = d_model();
    expect_shape(name, "x", x, tokens, d);
    expect_shape(name, "y", y, tokens, d);
    if (validate_inputs) check_finite(name, "x", x);
    x_.resize({tokens, d});
    mean_.resize({tokens});
    rstd_.resize({tokens});
    const T* w = weight_.value.data();
    const T* b = bias_.value.data();
    const double eps = config_.eps;
    cpu_kernels::parallel_for_blocks(tokens, block, [&](index_t first, index_t last) {
      for (index_t t = first; t < last; ++t) {
        const T* in = x.row(t);
        T* saved = x_.data() + t * d;
        T* out = y.row(t);
        double sum = 0;
        for (index_t c = 0; c < d; ++c) sum += double(in[c]);
        const double mu = sum / double(d);
        double var = 0;
        for (index_t c = 0; c < d; ++c) var += (double(in[c]) - mu) * (double(in[c]) - mu);
        const T m = T(mu), r = T(1.0 / std::sqrt(var / double(d) + eps));
        mean_[t] = m;
        rstd_[t] = r;
        for (index_t c = 0; c < d; ++c) {
          saved[c] = in[c];
          out[c] = (in[c] - m) * r * w[c] + b[c];
        }
      }
    });
  }

  // Writes dx [N, d]; accumulates weight.grad and bias.grad.
  void backward(ConstMatrixView<T> dy, MatrixView<T> dx) {
    if (x_.rank() != 2) fail(name, ": backward called before forward");
    const index_t tokens = x_.dim(0), d = d_model();
    expect_shape(name, "dy", dy, tokens, d);
    expect_shape(name, "dx", dx, tokens, d);
    if (validate_inputs) check_finite(name, "dy", dy);
    if (tokens == 0) return;
    const index_t blocks = std::max<index_t>(1, tokens / block);
    partial_.resize({blocks, 2 * d});  // per block: dw then db
    const T* w = weight_.value.data();
    cpu_kernels::parallel_for_blocks(tokens, block, [&](index_t first, index_t last) {
      T* dw = partial_.data() + (first / block) * 2 * d;
      T* db = dw + d;
      std::fill_n(dw, 2 * d, T(0));
      for (index_t t = first; t < last; ++t) {
        const T* xt = x_.data() + t * d;
        const T* g = dy.row(t);
        T* out = dx.row(t);
        const T m = mean_[t], r = rstd_[t];
        double sum_g = 0, dot = 0;
        for (index_t c = 0; c < d; ++c) {
          const T gw = g[c] * w[c];
          sum_g += double(gw);
          dot += double(gw) * double((xt[c] - m) * r);
        }
        const T mean_g = T(sum_g / double(d)), mean_gx = T(dot / double(d));
        for (index_t c = 0; c < d; ++c) {
          const T xhat = (xt[c] - m) * r;
          out[c] = r * (g[c] * w[c] - mean_g - xhat * mean_gx);
          dw[c] += g[c] * xhat;
          db[c] += g[c];
        }
      }
    });
    T* gw = weight_.grad.data();
    T* gb = bias_.grad.data();
    for (index_t blk = 0; blk < blocks; ++blk) {
      const T* p = partial_.data() + blk * 2 * d;
      for (index_t c = 0; c < d; ++c) {
        gw[c] += p[c];
        gb[c] += p[d + c];
      }
    }
  }

 private:
  static constexpr index_t block = 64;  // tokens per work item (and per dw/db partial sum)

  LayerNormConfig config_;
  Parameter<T> weight_, bias_;
  Tensor<T> x_, mean_, rstd_;  // forward cache
  Tensor<T> partial_;          // per-block dw, db
};

}  // namespace smoe
