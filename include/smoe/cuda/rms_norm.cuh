#pragma once
// RMSNorm<T, smoe::cuda>: layers/rms_norm.hpp on the device, same config, parameter ("weight" [d],
// initialized to 1) and contract (x, y, dy, dx [N, d]; backward accumulates weight.grad).
//   forward:   one work item per row: Σ x² in acc_t<T> (fp32; fp64 for double), then y = x·r·w;
//              keeps a copy of x and r [N] (in acc_t<T>).
//   backward:  one work item per row for dx; dw as one work item per column summing its rows in
//              row order, then added to weight.grad: no atomics, bitwise-equal reruns.
#include <string_view>

#include "smoe/core/parameter.hpp"
#include "smoe/cuda/device_tensor.cuh"
#include "smoe/cuda/validate.cuh"
#include "smoe/layers/rms_norm.hpp"

namespace smoe {
namespace cuda_kernels {

template <class T>
struct RmsNormForward {
  using A = acc_t<T>;
  const T* x;
  index_t ldx;
  const T* w;
  T* saved;  // [N, d]
  A* rstd;   // [N]
  T* y;
  index_t ldy, d;
  A eps;
  SMOE_HOST_DEVICE void operator()(index_t t) const {
    using std::sqrt;
    const T* in = x + t * ldx;
    A ss = 0;
    for (index_t c = 0; c < d; ++c) ss += to_acc(in[c]) * to_acc(in[c]);
    const A r = A(1) / sqrt(ss / A(d) + eps);
    rstd[t] = r;
    T* keep = saved + t * d;
    T* out = y + t * ldy;
    for (index_t c = 0; c < d; ++c) {
      keep[c] = in[c];
      out[c] = from_acc<T>(to_acc(in[c]) * r * to_acc(w[c]));
    }
  }
};

// dx = r · (g − x̂ · mean_c(g_c x̂_c)) with g = dy ⊙ w, x̂ = x·r.
template <class T>
struct RmsNormBackwardRows {
  using A = acc_t<T>;
  const T* x;  // saved [N, d]
  const A* rstd;
  const T* w;
  const T* dy;
  index_t lddy;
  T* dx;
  index_t lddx, d;
  SMOE_HOST_DEVICE void operator()(index_t t) const {
    const T* xt = x + t * d;
    const T* g = dy + t * lddy;
    const A r = rstd[t];
    A dot = 0;
    for (index_t c = 0; c < d; ++c) dot += to_acc(g[c]) * to_acc(w[c]) * (to_acc(xt[c]) * r);
    const A mean = dot / A(d);
    T* out = dx + t * lddx;
    for (index_t c = 0; c < d; ++c)
      out[c] = from_acc<T>(r * (to_acc(g[c]) * to_acc(w[c]) - to_acc(xt[c]) * r * mean));
  }
};

// weight.grad[c] += Σ_t dy[t, c] · x̂[t, c], rows in order.
template <class T>
struct RmsNormWeightGrad {
  using A = acc_t<T>;
  const T* x;
  const A* rstd;
  const T* dy;
  index_t lddy, tokens, d;
  T* grad;
  SMOE_HOST_DEVICE void operator()(index_t c) const {
    A sum = 0;
    for (index_t t = 0; t < tokens; ++t) sum += to_acc(dy[t * lddy + c]) * (to_acc(x[t * d + c]) * rstd[t]);
    grad[c] = from_acc<T>(to_acc(grad[c]) + sum);
  }
};

}  // namespace cuda_kernels

template <class T>
class RMSNorm<T, cuda> {
  static_assert(is_device_scalar_v<T>, "RMSNorm<T, smoe::cuda>: T must be float, double, bf16 or fp16");

 public:
  using scalar_type = T;
  using backend = cuda;
  using A = acc_t<T>;
  static constexpr const char* name = "RMSNorm<cuda>";
  // NaN/Inf checks of x and dy copy them to the host and wait for the stream: opt-in on the device.
  bool validate_inputs = false;

  explicit RMSNorm(RMSNormConfig c, cuda_stream stream = {}) : config_((c.validate(name), c)), weight_({c.d_model}) {
    set_stream(stream);
    weight_.value.fill(from_acc<T>(1));
  }

  index_t d_model() const { return config_.d_model; }
  const RMSNormConfig& config() const { return config_; }
  Parameter<T, cuda>& weight() { return weight_; }
  cuda_stream stream() const { return stream_; }
  void set_stream(cuda_stream s) {
    stream_ = s;
    for (auto* t : {&weight_.value, &weight_.grad, &x_}) t->set_stream(s);
    rstd_.set_stream(s);
  }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("weight"), weight_);
  }

  index_t total_parameters() const { return config_.d_model; }
  double active_parameters_per_token() const { return double(config_.d_model); }
  double flops_per_token() const { return 0.0; }

  // x, y [N, d]; y may not alias x.
  void forward(ConstMatrixView<T, cuda> x, MatrixView<T, cuda> y) {
    const index_t tokens = x.rows, d = d_model();
    expect_shape(name, "x", x, tokens, d);
    expect_shape(name, "y", y, tokens, d);
    if (validate_inputs) cuda_kernels::check_finite(name, "x", x, stream_);
    x_.resize({tokens, d});
    rstd_.resize({tokens});
    cuda_kernels::for_each_index(stream_, tokens,
                                 cuda_kernels::RmsNormForward<T>{x.data, x.stride, weight_.value.data(), x_.data(),
                                                                 rstd_.data(), y.data, y.stride, d, A(config_.eps)});
  }

  // Writes dx [N, d]; accumulates weight.grad.
  void backward(ConstMatrixView<T, cuda> dy, MatrixView<T, cuda> dx) {
    if (x_.rank() != 2) fail(name, ": backward called before forward");
    const index_t tokens = x_.dim(0), d = d_model();
    expect_shape(name, "dy", dy, tokens, d);
    expect_shape(name, "dx", dx, tokens, d);
    if (validate_inputs) cuda_kernels::check_finite(name, "dy", dy, stream_);
    if (tokens == 0) return;
    // dw first: it reads dy, which dx may overwrite when the caller aliases them.
    cuda_kernels::for_each_index(stream_, d,
                                 cuda_kernels::RmsNormWeightGrad<T>{x_.data(), rstd_.data(), dy.data, dy.stride, tokens, d,
                                                                    weight_.grad.data()});
    cuda_kernels::for_each_index(stream_, tokens,
                                 cuda_kernels::RmsNormBackwardRows<T>{x_.data(), rstd_.data(), weight_.value.data(), dy.data,
                                                                      dy.stride, dx.data, dx.stride, d});
  }

 private:
  RMSNormConfig config_;
  Parameter<T, cuda> weight_;
  cuda_stream stream_{};
  Tensor<T, cuda> x_;   // forward cache: a copy of x
  Tensor<A, cuda> rstd_;  // and r per row
};

}  // namespace smoe
