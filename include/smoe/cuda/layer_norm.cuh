#pragma once
// LayerNorm<T, smoe::cuda>: layers/layer_norm.hpp on the device, same config, parameters
// ("weight" [d] initialized to 1, "bias" [d] initialized to 0) and contract (x, y, dy, dx [N, d];
// backward accumulates weight.grad and bias.grad).
//   forward:   one work item per row: mean, then centered variance (two passes, as the CPU) in
//              acc_t<T> (fp32; fp64 for double); keeps a copy of x, μ and r [N] (in acc_t<T>).
//   backward:  one work item per row for dx; dw and db as one work item per column summing its
//              rows in row order, then added to the gradients: no atomics, bitwise-equal reruns.
#include <string_view>

#include "smoe/core/parameter.hpp"
#include "smoe/cuda/device_tensor.cuh"
#include "smoe/cuda/validate.cuh"
#include "smoe/layers/layer_norm.hpp"

namespace smoe {
namespace cuda_kernels {

template <class T>
struct LayerNormForward {
  using A = acc_t<T>;
  const T* x;
  index_t ldx;
  const T *w, *b;
  T* saved;  // [N, d]
  A *mean, *rstd;  // [N]
  T* y;
  index_t ldy, d;
  A eps;
  SMOE_HOST_DEVICE void operator()(index_t t) const {
    using std::sqrt;
    const T* in = x + t * ldx;
    A sum = 0;
    for (index_t c = 0; c < d; ++c) sum += to_acc(in[c]);
    const A mu = sum / A(d);
    A var = 0;
    for (index_t c = 0; c < d; ++c) var += (to_acc(in[c]) - mu) * (to_acc(in[c]) - mu);
    const A r = A(1) / sqrt(var / A(d) + eps);
    mean[t] = mu;
    rstd[t] = r;
    T* keep = saved + t * d;
    T* out = y + t * ldy;
    for (index_t c = 0; c < d; ++c) {
      keep[c] = in[c];
      out[c] = from_acc<T>((to_acc(in[c]) - mu) * r * to_acc(w[c]) + to_acc(b[c]));
    }
  }
};

// dx = r · (g − mean_c g_c − x̂ · mean_c(g_c x̂_c)) with g = dy ⊙ w, x̂ = (x − μ)·r.
template <class T>
struct LayerNormBackwardRows {
  using A = acc_t<T>;
  const T* x;  // saved [N, d]
  const A *mean, *rstd;
  const T* w;
  const T* dy;
  index_t lddy;
  T* dx;
  index_t lddx, d;
  SMOE_HOST_DEVICE void operator()(index_t t) const {
    const T* xt = x + t * d;
    const T* g = dy + t * lddy;
    const A m = mean[t], r = rstd[t];
    A sum_g = 0, dot = 0;
    for (index_t c = 0; c < d; ++c) {
      const A gw = to_acc(g[c]) * to_acc(w[c]);
      sum_g += gw;
      dot += gw * ((to_acc(xt[c]) - m) * r);
    }
    const A mean_g = sum_g / A(d), mean_gx = dot / A(d);
    T* out = dx + t * lddx;
    for (index_t c = 0; c < d; ++c)
      out[c] = from_acc<T>(r * (to_acc(g[c]) * to_acc(w[c]) - mean_g - (to_acc(xt[c]) - m) * r * mean_gx));
  }
};

// weight.grad[c] += Σ_t dy[t, c] · x̂[t, c] and bias.grad[c] += Σ_t dy[t, c], rows in order.
template <class T>
struct LayerNormParameterGrads {
  using A = acc_t<T>;
  const T* x;
  const A *mean, *rstd;
  const T* dy;
  index_t lddy, tokens, d;
  T *weight_grad, *bias_grad;
  SMOE_HOST_DEVICE void operator()(index_t c) const {
    A dw = 0, db = 0;
    for (index_t t = 0; t < tokens; ++t) {
      const A g = to_acc(dy[t * lddy + c]);
      dw += g * ((to_acc(x[t * d + c]) - mean[t]) * rstd[t]);
      db += g;
    }
    weight_grad[c] = from_acc<T>(to_acc(weight_grad[c]) + dw);
    bias_grad[c] = from_acc<T>(to_acc(bias_grad[c]) + db);
  }
};

}  // namespace cuda_kernels

template <class T>
class LayerNorm<T, cuda> {
  static_assert(is_device_scalar_v<T>, "LayerNorm<T, smoe::cuda>: T must be float, double, bf16 or fp16");

 public:
  using scalar_type = T;
  using backend = cuda;
  using A = acc_t<T>;
  static constexpr const char* name = "LayerNorm<cuda>";
  // NaN/Inf checks of x and dy copy them to the host and wait for the stream: opt-in on the device.
  bool validate_inputs = false;

  explicit LayerNorm(LayerNormConfig c, cuda_stream stream = {})
      : config_((c.validate(name), c)), weight_({c.d_model}), bias_({c.d_model}) {
    set_stream(stream);
    weight_.value.fill(from_acc<T>(1));
  }

  index_t d_model() const { return config_.d_model; }
  const LayerNormConfig& config() const { return config_; }
  Parameter<T, cuda>& weight() { return weight_; }
  Parameter<T, cuda>& bias() { return bias_; }
  cuda_stream stream() const { return stream_; }
  void set_stream(cuda_stream s) {
    stream_ = s;
    for (auto* t : {&weight_.value, &weight_.grad, &bias_.value, &bias_.grad, &x_}) t->set_stream(s);
    for (auto* t : {&mean_, &rstd_}) t->set_stream(s);
  }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("weight"), weight_);
    f(std::string_view("bias"), bias_);
  }

  index_t total_parameters() const { return 2 * config_.d_model; }
  double active_parameters_per_token() const { return double(2 * config_.d_model); }
  double flops_per_token() const { return 0.0; }

  // x, y [N, d]; y may not alias x.
  void forward(ConstMatrixView<T, cuda> x, MatrixView<T, cuda> y) {
    const index_t tokens = x.rows, d = d_model();
    expect_shape(name, "x", x, tokens, d);
    expect_shape(name, "y", y, tokens, d);
    if (validate_inputs) cuda_kernels::check_finite(name, "x", x, stream_);
    x_.resize({tokens, d});
    mean_.resize({tokens});
    rstd_.resize({tokens});
    cuda_kernels::for_each_index(
        stream_, tokens,
        cuda_kernels::LayerNormForward<T>{x.data, x.stride, weight_.value.data(), bias_.value.data(), x_.data(), mean_.data(),
                                          rstd_.data(), y.data, y.stride, d, A(config_.eps)});
  }

  // Writes dx [N, d]; accumulates weight.grad and bias.grad.
  void backward(ConstMatrixView<T, cuda> dy, MatrixView<T, cuda> dx) {
    if (x_.rank() != 2) fail(name, ": backward called before forward");
    const index_t tokens = x_.dim(0), d = d_model();
    expect_shape(name, "dy", dy, tokens, d);
    expect_shape(name, "dx", dx, tokens, d);
    if (validate_inputs) cuda_kernels::check_finite(name, "dy", dy, stream_);
    if (tokens == 0) return;
    // dw, db first: they read dy, which dx may overwrite when the caller aliases them.
    cuda_kernels::for_each_index(stream_, d,
                                 cuda_kernels::LayerNormParameterGrads<T>{x_.data(), mean_.data(), rstd_.data(), dy.data,
                                                                          dy.stride, tokens, d, weight_.grad.data(),
                                                                          bias_.grad.data()});
    cuda_kernels::for_each_index(stream_, tokens,
                                 cuda_kernels::LayerNormBackwardRows<T>{x_.data(), mean_.data(), rstd_.data(),
                                                                        weight_.value.data(), dy.data, dy.stride, dx.data,
                                                                        dx.stride, d});
  }

 private:
  LayerNormConfig config_;
  Parameter<T, cuda> weight_, bias_;
  cuda_stream stream_{};
  Tensor<T, cuda> x_;            // forward cache: a copy of x
  Tensor<A, cuda> mean_, rstd_;  // and μ, r per row
};

}  // namespace smoe
