#pragma once
// DenseMLP<T, Act, smoe::cuda>: layers/dense_mlp.hpp on the device, same config, parameters
// ("w1" [d, fan·d_ff], "w2" [d_ff, d], "b1", "b2" with bias) and contract; like the CPU layer it
// keeps a view of x, not a copy (x must hold its values until backward).
//   forward:   pre = x·W1 + b1;  h = act(pre) (the experts' per-unit ActivationForward; Top-K
//              activation keeps the K largest units per row with the CPU's order, topk_row);
//              y = h·W2 + b2                                            (RowGemm)
//   backward:  dh = dy·W2ᵀ (masked to the kept units);  dpre = act'(pre)·dh;
//              W2.grad += hᵀ·dy, W1.grad += xᵀ·dpre, b.grad += column sums (GroupedOuterSum
//              without groups: each element sums the tokens in order, no atomics);  dx = dpre·W1ᵀ.
// Top-K activation holds its kept units in registers, so topk <= cuda_kernels::max_topk (32) here.
#include <cstdint>
#include <string_view>

#include "smoe/core/parameter.hpp"
#include "smoe/cuda/device_tensor.cuh"
#include "smoe/cuda/feed_forward_experts.cuh"
#include "smoe/cuda/grouped_gemm.cuh"
#include "smoe/cuda/topk.cuh"
#include "smoe/cuda/validate.cuh"
#include "smoe/layers/dense_mlp.hpp"

namespace smoe {
namespace cuda_kernels {

// Keeps the K largest of h's row t (G units; the CPU's order), zeroes the rest, records the kept units.
template <class T>
struct KeepTopKUnits {
  T* h;
  std::int32_t* kept;
  index_t G, K;
  SMOE_HOST_DEVICE void operator()(index_t t) const {
    T* row = h + t * G;
    std::int32_t* ids = kept + t * K;
    topk_row(row, G, K, ids, NotRemoved{});
    for (index_t u = 0; u < G; ++u) {
      bool keep = false;
      for (index_t j = 0; j < K; ++j) keep = keep || ids[j] == u;
      if (!keep) row[u] = from_acc<T>(0);
    }
  }
};

// dh[t, u] = 0 for the units row t did not keep.
template <class T>
struct MaskToKeptUnits {
  T* dh;
  const std::int32_t* kept;
  index_t G, K;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    const index_t t = i / G, u = i % G;
    bool keep = false;
    for (index_t j = 0; j < K; ++j) keep = keep || kept[t * K + j] == u;
    if (!keep) dh[i] = from_acc<T>(0);
  }
};

}  // namespace cuda_kernels

template <class T, Activation Act>
class DenseMLP<T, Act, cuda> {
  static_assert(is_device_scalar_v<T>, "DenseMLP<T, Act, smoe::cuda>: T must be float, double, bf16 or fp16");
  static_assert(UnitActivation<Act>, "DenseMLP<T, Act, smoe::cuda>: Act needs the per-unit `unit` and "
                                     "`unit_backward` (experts/activation.hpp) to run on the device");

 public:
  using scalar_type = T;
  using backend = cuda;
  static constexpr const char* name = "DenseMLP<cuda>";
  // NaN/Inf checks of x and dy copy them to the host and wait for the stream: opt-in on the device.
  bool validate_inputs = false;

  explicit DenseMLP(DenseMLPConfig c, cuda_stream stream = {})
      : config_((c.validate(name), c)), w1_({c.d_model, Act::fan * c.hidden}), w2_({c.hidden, c.d_model}) {
    if (c.topk > cuda_kernels::max_topk)
      fail(name, ": topk must be <= ", cuda_kernels::max_topk, " on the CUDA backend, got ", c.topk);
    if (c.bias) {
      b1_ = Parameter<T, cuda>({Act::fan * c.hidden});
      b2_ = Parameter<T, cuda>({c.d_model});
    }
    set_stream(stream);
  }

  index_t d_model() const { return config_.d_model; }
  index_t hidden() const { return config_.hidden; }
  const DenseMLPConfig& config() const { return config_; }
  Parameter<T, cuda>& w1() { return w1_; }
  Parameter<T, cuda>& w2() { return w2_; }
  Parameter<T, cuda>& b1() { return b1_; }
  Parameter<T, cuda>& b2() { return b2_; }
  cuda_stream stream() const { return stream_; }
  void set_stream(cuda_stream s) {
    stream_ = s;
    for (auto* p : {&w1_, &w2_, &b1_, &b2_}) {
      p->value.set_stream(s);
      p->grad.set_stream(s);
    }
    for (auto* t : {&pre_, &h_, &dh_, &dpre_}) t->set_stream(s);
    for (auto* t : {&kept_, &rows_}) t->set_stream(s);
  }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("w1"), w1_);
    f(std::string_view("w2"), w2_);
    if (config_.bias) {
      f(std::string_view("b1"), b1_);
      f(std::string_view("b2"), b2_);
    }
  }

  index_t total_parameters() const {
    const index_t d = d_model(), G = hidden();
    return d * Act::fan * G + G * d + (config_.bias ? Act::fan * G + d : 0);
  }
  double active_parameters_per_token() const { return double(total_parameters()); }
  double flops_per_token() const { return 2.0 * double(d_model()) * double(hidden()) * double(Act::fan + 1); }

  // x, y [T, d].
  void forward(ConstMatrixView<T, cuda> x, MatrixView<T, cuda> y) {
    using namespace cuda_kernels;
    const index_t tokens = x.rows, d = d_model(), G = hidden(), F = Act::fan * G, K = config_.topk;
    expect_shape(name, "x", x, tokens, d);
    expect_shape(name, "y", y, tokens, d);
    if (validate_inputs) check_finite(name, "x", x, stream_);
    x_ = x;
    has_forward_ = true;
    pre_.resize({tokens, F});
    h_.resize({tokens, G});
    if (tokens == 0) return;
    // The activation functors skip rows past a device count (the experts' slots); here all count.
    rows_.resize({1});
    rows_.fill(static_cast<std::int32_t>(tokens));
    for_each_index(stream_, tokens * F,
                   RowGemm<T, T, T>{x.data, x.stride, nullptr, Strided<T>{w1_.value.data(), 0, F, 1}, nullptr, bias(b1_), 0,
                                    nullptr, pre_.data(), F, d, F, false});
    for_each_index(stream_, tokens * G, ActivationForward<T, Act>{pre_.data(), h_.data(), rows_.data(), G});
    if (K > 0) {
      kept_.resize({tokens, K});
      for_each_index(stream_, tokens, KeepTopKUnits<T>{h_.data(), kept_.data(), G, K});
    }
    for_each_index(stream_, tokens * d,
                   RowGemm<T, T, T>{h_.data(), G, nullptr, Strided<T>{w2_.value.data(), 0, d, 1}, nullptr, bias(b2_), 0,
                                    nullptr, y.data, y.stride, G, d, false});
  }

  // Writes dx [T, d]; accumulates every parameter's gradient.
  void backward(ConstMatrixView<T, cuda> dy, MatrixView<T, cuda> dx) {
    using namespace cuda_kernels;
    if (!has_forward_) fail(name, ": backward called before forward");
    const index_t tokens = x_.rows, d = d_model(), G = hidden(), F = Act::fan * G, K = config_.topk;
    expect_shape(name, "dy", dy, tokens, d);
    expect_shape(name, "dx", dx, tokens, d);
    if (validate_inputs) check_finite(name, "dy", dy, stream_);
    if (tokens == 0) return;
    dh_.resize({tokens, G});
    dpre_.resize({tokens, F});
    for_each_index(stream_, tokens * G,
                   RowGemm<T, T, T>{dy.data, dy.stride, nullptr, Strided<T>{w2_.value.data(), 0, 1, d}, nullptr, nullptr, 0,
                                    nullptr, dh_.data(), G, d, G, false});
    for_each_index(stream_, G * d,
                   GroupedOuterSum<T, T, T>{h_.data(), G, nullptr, dy.data, dy.stride, nullptr, tokens, w2_.grad.data(), G, d});
    if (config_.bias)
      for_each_index(stream_, d,
                     GroupedOuterSum<T, T, T>{nullptr, 0, nullptr, dy.data, dy.stride, nullptr, tokens, b2_.grad.data(), 1, d});
    if (K > 0) for_each_index(stream_, tokens * G, MaskToKeptUnits<T>{dh_.data(), kept_.data(), G, K});
    for_each_index(stream_, tokens * G, ActivationBackward<T, Act>{pre_.data(), dh_.data(), dpre_.data(), rows_.data(), G});
    for_each_index(stream_, d * F,
                   GroupedOuterSum<T, T, T>{x_.data, x_.stride, nullptr, dpre_.data(), F, nullptr, tokens, w1_.grad.data(), d, F});
    if (config_.bias)
      for_each_index(stream_, F,
                     GroupedOuterSum<T, T, T>{nullptr, 0, nullptr, dpre_.data(), F, nullptr, tokens, b1_.grad.data(), 1, F});
    // dx last: x (read above) may be the caller's dx memory.
    for_each_index(stream_, tokens * d,
                   RowGemm<T, T, T>{dpre_.data(), F, nullptr, Strided<T>{w1_.value.data(), 0, 1, F}, nullptr, nullptr, 0,
                                    nullptr, dx.data, dx.stride, F, d, false});
  }

 private:
  const T* bias(const Parameter<T, cuda>& b) const { return config_.bias ? b.value.data() : nullptr; }

  DenseMLPConfig config_;
  Parameter<T, cuda> w1_, w2_, b1_, b2_;
  cuda_stream stream_{};
  ConstMatrixView<T, cuda> x_;  // the forward input (not copied: it must hold its values until backward)
  bool has_forward_ = false;
  Tensor<T, cuda> pre_, h_;     // forward cache
  Tensor<std::int32_t, cuda> kept_, rows_;  // kept units [T, K]; the row count the activation functors read
  Tensor<T, cuda> dh_, dpre_;
};

}  // namespace smoe
