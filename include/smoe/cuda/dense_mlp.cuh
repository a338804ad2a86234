#pragma once
// DenseMLP<T, Act, cuda>: layers/dense_mlp.hpp on the device, y = act(x·W1 + b1)·W2 + b2, same
// parameters ("w1" [d, fan·d_ff], "w2" [d_ff, d], "b1", "b2"), dtypes fp32/bf16/fp16/fp64 with fp32
// accumulation, and sigma-MoE's Top-K-activation variant (topk > 0: the K largest hidden
// activations of each token kept, ties to the smaller unit; K <= 32 on the device, cuda/topk.cuh).
// The products are cuda/dense_gemm.cuh's (cuBLAS on a GPU); a bias is broadcast into the output
// first and the product added to it; the bias gradients are column sums over tokens in order.
// Like the CPU layer it does not copy x: x must hold its values until backward.
#include <cstdint>
#include <string_view>

#include "smoe/core/parameter.hpp"
#include "smoe/cuda/dense_gemm.cuh"
#include "smoe/cuda/grouped_ffn.cuh"
#include "smoe/cuda/topk.cuh"
#include "smoe/cuda/validate.cuh"
#include "smoe/layers/dense_mlp.hpp"

namespace smoe {

namespace cuda_kernels {

// out[r, c] = bias[c] for every row r.
template <class T>
struct BroadcastRows {
  const T* bias;
  T* out;
  index_t ld, n;
  SMOE_HOST_DEVICE void operator()(index_t i) const { out[(i / n) * ld + i % n] = bias[i % n]; }
};

// Row t of h [T, G]: keeps its K largest entries (ties to the smaller unit), zeroes the rest, and
// records the kept units in kept [T, K].
template <class T>
struct KeepTopK {
  T* h;
  std::int32_t* kept;
  index_t G, K;
  SMOE_HOST_DEVICE void operator()(index_t t) const {
    T* row = h + t * G;
    std::int32_t* k = kept + t * K;
    topk_row(row, G, K, k, NotRemoved{});
    for (index_t u = 0; u < G; ++u) {
      bool keep = false;
      for (index_t j = 0; j < K; ++j) keep = keep || k[j] == u;
      if (!keep) row[u] = from_acc<T>(0);
    }
  }
};

// dh[t, u] = 0 unless u was kept in row t.
template <class T>
struct MaskToKept {
  T* dh;
  const std::int32_t* kept;
  index_t G, K;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    const index_t t = i / G, u = i % G;
    for (index_t j = 0; j < K; ++j)
      if (kept[t * K + j] == u) return;
    dh[i] = from_acc<T>(0);
  }
};

}  // namespace cuda_kernels

template <class T, Activation Act>
class DenseMLP<T, Act, cuda> {
  static_assert(UnitActivation<Act>, "DenseMLP<T, Act, cuda>: Act needs the per-unit `unit` and `unit_backward`");

 public:
  using scalar_type = T;
  using backend = cuda;
  static constexpr const char* name = "DenseMLP<cuda>";
  // NaN/Inf checks of x and dy copy them to the host: opt-in on the device.
  bool validate_inputs = false;

  explicit DenseMLP(DenseMLPConfig c, cuda_stream stream = {}) : config_((c.validate(name), c)) {
    if (c.topk > cuda_kernels::max_topk)
      fail(name, ": topk must be <= ", cuda_kernels::max_topk, " on the device, got ", c.topk);
    w1_ = Parameter<T, cuda>({c.d_model, Act::fan * c.hidden});
    w2_ = Parameter<T, cuda>({c.hidden, c.d_model});
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
  // GemmPath::portable runs the portable GEMMs on a GPU too (cuBLAS's reference).
  void set_gemm_path(cuda_kernels::GemmPath path) { gemm_path_ = path; }

  cuda_stream stream() const { return stream_; }
  void set_stream(cuda_stream s) {
    stream_ = s;
    for (auto* p : {&w1_, &w2_, &b1_, &b2_}) {
      p->value.set_stream(s);
      p->grad.set_stream(s);
    }
    for (auto* t : {&pre_, &h_, &dh_, &dpre_}) t->set_stream(s);
    kept_.set_stream(s);
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

  // Accounting as the CPU layer's.
  index_t total_parameters() const {
    const index_t d = d_model(), G = hidden();
    return d * Act::fan * G + G * d + (config_.bias ? Act::fan * G + d : 0);
  }
  double active_parameters_per_token() const { return double(total_parameters()); }
  double flops_per_token() const { return 2.0 * double(d_model()) * double(hidden()) * double(Act::fan + 1); }

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
    linear(x.data, x.stride, w1_.value.data(), config_.bias ? b1_.value.data() : nullptr, pre_.data(), F, tokens, F, d);
    for_each_index(stream_, tokens * G, ActivationForward<T, Act>{pre_.data(), h_.data(), nullptr, G});
    if (K > 0) {
      kept_.resize({tokens, K});
      for_each_index(stream_, tokens, KeepTopK<T>{h_.data(), kept_.data(), G, K});
    }
    linear(h_.data(), G, w2_.value.data(), config_.bias ? b2_.value.data() : nullptr, y.data, y.stride, tokens, d, G);
  }

  void backward(ConstMatrixView<T, cuda> dy, MatrixView<T, cuda> dx) {
    using namespace cuda_kernels;
    const index_t tokens = x_.rows, d = d_model(), G = hidden(), F = Act::fan * G, K = config_.topk;
    if (!has_forward_) fail(name, ": backward called before forward");
    expect_shape(name, "dy", dy, tokens, d);
    expect_shape(name, "dx", dx, tokens, d);
    if (validate_inputs) check_finite(name, "dy", dy, stream_);
    if (tokens == 0) return;
    dh_.resize({tokens, G});
    dpre_.resize({tokens, F});
    // dh = dy·W2ᵀ; W2.grad += hᵀ·dy; b2.grad += Σ_t dy[t]
    dense_gemm(stream_, tokens, G, d, dy.data, dy.stride, false, w2_.value.data(), d, true, dh_.data(), G, false, gemm_path_);
    weight_gradient(h_.data(), G, dy.data, dy.stride, w2_.grad.data(), G, d, tokens, gemm_path_);
    if (config_.bias) column_sums(dy.data, dy.stride, b2_.grad.data(), d, tokens);
    if (K > 0) for_each_index(stream_, tokens * G, MaskToKept<T>{dh_.data(), kept_.data(), G, K});
    for_each_index(stream_, tokens * G, ActivationBackward<T, Act>{pre_.data(), dh_.data(), dpre_.data(), nullptr, G});
    // W1.grad += xᵀ·dpre; b1.grad += Σ_t dpre[t]; dx = dpre·W1ᵀ
    weight_gradient(x_.data, x_.stride, dpre_.data(), F, w1_.grad.data(), d, F, tokens, gemm_path_);
    if (config_.bias) column_sums(dpre_.data(), F, b1_.grad.data(), F, tokens);
    dense_gemm(stream_, tokens, d, F, dpre_.data(), F, false, w1_.value.data(), F, true, dx.data, dx.stride, false,
               gemm_path_);
  }

 private:
  // out [rows, n] = in·W (+ bias), W [k, n].
  void linear(const T* in, index_t ld_in, const T* w, const T* bias, T* out, index_t ld_out, index_t rows, index_t n,
              index_t k) {
    using namespace cuda_kernels;
    if (bias) for_each_index(stream_, rows * n, BroadcastRows<T>{bias, out, ld_out, n});
    dense_gemm(stream_, rows, n, k, in, ld_in, false, w, n, false, out, ld_out, bias != nullptr, gemm_path_);
  }
  // g [m, n] += aᵀ·b over `rows` rows (a [rows, m], b [rows, n]).
  void weight_gradient(const T* a, index_t lda, const T* b, index_t ldb, T* g, index_t m, index_t n, index_t rows,
                       cuda_kernels::GemmPath path) {
    cuda_kernels::dense_gemm(stream_, m, n, rows, a, lda, true, b, ldb, false, g, n, true, path);
  }
  // out[c] += Σ_r in[r, c], rows in order.
  void column_sums(const T* in, index_t ld, T* out, index_t n, index_t rows) {
    using namespace cuda_kernels;
    for_each_index(stream_, n, GroupedOuterSum<T, T, T>{nullptr, 0, nullptr, in, ld, nullptr, rows, out, 1, n});
  }

  DenseMLPConfig config_;
  cuda_stream stream_{};
  Parameter<T, cuda> w1_, w2_, b1_, b2_;
  ConstMatrixView<T, cuda> x_;  // the forward input (not copied)
  bool has_forward_ = false;
  Tensor<T, cuda> pre_, h_, dh_, dpre_;
  Tensor<std::int32_t, cuda> kept_;
  cuda_kernels::GemmPath gemm_path_ = cuda_kernels::GemmPath::fastest;
};

}  // namespace smoe
