#pragma once
// RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"), per token over d:
//   r = 1 / sqrt(mean_c x_c² + eps),   y_c = x_c · r · w_c,        "weight" w [d], initialized to 1
// backward, with x̂ = x·r and g = dy ⊙ w:
//   dx = r · (g − x̂ · mean_c(g_c x̂_c)),   dw += Σ_t dy ⊙ x̂
// Row statistics accumulate in double. The forward keeps a copy of x and r [N]; dw is summed per
// fixed block of tokens, then over blocks in order, so it is the same for any thread count.
#include <algorithm>
#include <cmath>
#include <string_view>
#include <type_traits>

#include "smoe/core/parameter.hpp"
#include "smoe/core/validate.hpp"
#include "smoe/cpu/parallel.hpp"

namespace smoe {

struct RMSNormConfig {
  index_t d_model = 0;
  double eps = 1e-6;

  void validate(const char* context) const {
    if (d_model < 1) fail(context, ": d_model must be >= 1, got ", d_model);
    if (!(eps > 0) || !std::isfinite(eps)) fail(context, ": eps must be finite and > 0, got ", eps);
  }
};

template <class T, class Backend = cpu>
class RMSNorm {
  static_assert(std::is_same_v<Backend, cpu>, "RMSNorm<T, smoe::cuda> needs <smoe/cuda/rms_norm.cuh>");

 public:
  using scalar_type = T;
  using backend = cpu;
  static constexpr const char* name = "RMSNorm";
  bool validate_inputs = validate_by_default;

  explicit RMSNorm(RMSNormConfig c) : config_((c.validate(name), c)), weight_({c.d_model}) { weight_.value.fill(T(1)); }

  index_t d_model() const { return config_.d_model; }
  const RMSNormConfig& config() const { return config_; }
  Parameter<T>& weight() { return weight_; }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("weight"), weight_);
  }

  // Accounting: d weights; elementwise work is not counted in FLOPs (only matrix products are).
  index_t total_parameters() const { return config_.d_model; }
  double active_parameters_per_token() const { return double(config_.d_model); }
  double flops_per_token() const { return 0.0; }

  // x, y [N, d]; y may not alias x.
  void forward(ConstMatrixView<T> x, MatrixView<T> y) {
    const index_t tokens = x.rows, d = d_model();
    expect_shape(name, "x", x, tokens, d);
    expect_shape(name, "y", y, tokens, d);
    if (validate_inputs) check_finite(name, "x", x);
    x_.resize({tokens, d});
    rstd_.resize({tokens});
    const T* w = weight_.value.data();
    const double eps = config_.eps;
    cpu_kernels::parallel_for_blocks(tokens, block, [&](index_t first, index_t last) {
      for (index_t t = first; t < last; ++t) {
        const T* in = x.row(t);
        T* saved = x_.data() + t * d;
        T* out = y.row(t);
        double ss = 0;
        for (index_t c = 0; c < d; ++c) ss += double(in[c]) * double(in[c]);
        const T r = T(1.0 / std::sqrt(ss / double(d) + eps));
        rstd_[t] = r;
        for (index_t c = 0; c < d; ++c) {
          saved[c] = in[c];
          out[c] = in[c] * r * w[c];
        }
      }
    });
  }

  // Writes dx [N, d]; accumulates weight.grad.
  void backward(ConstMatrixView<T> dy, MatrixView<T> dx) {
    if (x_.rank() != 2) fail(name, ": backward called before forward");
    const index_t tokens = x_.dim(0), d = d_model();
    expect_shape(name, "dy", dy, tokens, d);
    expect_shape(name, "dx", dx, tokens, d);
    if (validate_inputs) check_finite(name, "dy", dy);
    if (tokens == 0) return;
    const index_t blocks = std::max<index_t>(1, tokens / block);
    partial_.resize({blocks, d});
    const T* w = weight_.value.data();
    cpu_kernels::parallel_for_blocks(tokens, block, [&](index_t first, index_t last) {
      T* dw = partial_.data() + (first / block) * d;
      std::fill_n(dw, d, T(0));
      for (index_t t = first; t < last; ++t) {
        const T* xt = x_.data() + t * d;
        const T* g = dy.row(t);
        T* out = dx.row(t);
        const T r = rstd_[t];
        double dot = 0;
        for (index_t c = 0; c < d; ++c) dot += double(g[c] * w[c]) * double(xt[c] * r);
        const T mean = T(dot / double(d));
        for (index_t c = 0; c < d; ++c) {
          const T xhat = xt[c] * r;
          out[c] = r * (g[c] * w[c] - xhat * mean);
          dw[c] += g[c] * xhat;
        }
      }
    });
    T* grad = weight_.grad.data();
    for (index_t b = 0; b < blocks; ++b)
      for (index_t c = 0; c < d; ++c) grad[c] += partial_[b * d + c];
  }

 private:
  static constexpr index_t block = 64;  // tokens per work item (and per dw partial sum)

  RMSNormConfig config_;
  Parameter<T> weight_;
  Tensor<T> x_, rstd_;  // forward cache
  Tensor<T> partial_;   // per-block dw
};

}  // namespace smoe
