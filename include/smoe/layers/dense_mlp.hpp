#pragma once
// DenseMLP: the parameter-equal baseline a MoE layer replaces, y = act(x·W1 + b1)·W2 + b2 with
// "w1" [d, fan·d_ff], "w2" [d_ff, d] (biases "b1" [fan·d_ff], "b2" [d] when enabled).
// With `topk` > 0 it is sigma-MoE's Top-K-activation MLP (Csordás et al. 2023, Sec. 3.1): only the
// K largest hidden activations of each token are kept (ties to the smaller unit index), the rest
// are zeroed, which saves the second GEMM's work in principle but not the first.
// Every product runs in fixed tiles on the library's GEMM kernel (layers/detail/blocked_gemm.hpp),
// so results are the same for any thread count. Like MoE<>, it does not copy x: the memory passed
// to forward must hold the same values until backward. A plain ReLU is fused into the first GEMM.
#include <algorithm>
#include <cstdint>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "smoe/core/parameter.hpp"
#include "smoe/core/validate.hpp"
#include "smoe/cpu/parallel.hpp"
#include "smoe/experts/activation.hpp"
#include "smoe/layers/detail/blocked_gemm.hpp"
#include "smoe/routing/topk_select.hpp"

namespace smoe {

struct DenseMLPConfig {
  index_t d_model = 0;
  index_t hidden = 0;  // d_ff
  bool bias = false;
  index_t topk = 0;    // 0: dense; K > 0: keep the K largest hidden activations per token

  void validate(const char* context) const {
    if (d_model < 1) fail(context, ": d_model must be >= 1, got ", d_model);
    if (hidden < 1) fail(context, ": hidden (d_ff) must be >= 1, got ", hidden);
    if (topk < 0 || topk > hidden) fail(context, ": topk must be in [0, hidden = ", hidden, "], got ", topk);
  }
};

template <class T, Activation Act = Relu, class Backend = cpu>
class DenseMLP {
  static_assert(std::is_same_v<Backend, cpu>, "DenseMLP<T, Act, smoe::cuda> needs <smoe/cuda/dense_mlp.cuh>");

 public:
  using scalar_type = T;
  using backend = cpu;
  static constexpr const char* name = "DenseMLP";
  bool validate_inputs = validate_by_default;

  explicit DenseMLP(DenseMLPConfig c)
      : config_((c.validate(name), c)), w1_({c.d_model, Act::fan * c.hidden}), w2_({c.hidden, c.d_model}) {
    if (c.bias) {
      b1_ = Parameter<T>({Act::fan * c.hidden});
      b2_ = Parameter<T>({c.d_model});
    }
  }

  index_t d_model() const { return config_.d_model; }
  index_t hidden() const { return config_.hidden; }
  const DenseMLPConfig& config() const { return config_; }
  Parameter<T>& w1() { return w1_; }
  Parameter<T>& w2() { return w2_; }
  Parameter<T>& b1() { return b1_; }
  Parameter<T>& b2() { return b2_; }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("w1"), w1_);
    f(std::string_view("w2"), w2_);
    if (config_.bias) {
      f(std::string_view("b1"), b1_);
      f(std::string_view("b2"), b2_);
    }
  }

  // Accounting (FLOPs: matrix products only, 2 per multiply-add). Every weight is read for every
  // token; the Top-K variant also runs both products densely here, so it counts the same.
  index_t total_parameters() const {
    const index_t d = d_model(), G = hidden();
    return d * Act::fan * G + G * d + (config_.bias ? Act::fan * G + d : 0);
  }
  double active_parameters_per_token() const { return double(total_parameters()); }
  double flops_per_token() const { return 2.0 * double(d_model()) * double(hidden()) * double(Act::fan + 1); }

  // x, y [T, d]. Fixed token blocks, one single-threaded GEMM each: the same for any thread count.
  void forward(ConstMatrixView<T> x, MatrixView<T> y) {
    using namespace cpu_kernels;
    const index_t tokens = x.rows, d = d_model(), G = hidden(), K = config_.topk;
    expect_shape(name, "x", x, tokens, d);
    expect_shape(name, "y", y, tokens, d);
    if (validate_inputs) check_finite(name, "x", x);
    x_ = x;
    has_forward_ = true;
    if (!fused_relu()) pre_.resize({tokens, Act::fan * G});
    h_.resize({tokens, G});
    if (tokens == 0) return;
    if (K > 0) kept_.resize({tokens, K});
    // Plain ReLU: the GEMM stores max(pre, 0) straight into h (h > 0 exactly where pre > 0).
    detail::blocked_gemm_nn<T>(x, std::as_const(w1_.value).matrix(), fused_relu() ? h_.matrix() : pre_.matrix(),
                               {.bias = config_.bias ? b1_.value.data() : nullptr, .relu = fused_relu()});
    if (!fused_relu()) parallel_for_blocks(tokens, row_block, [&](index_t first, index_t last) {
      std::vector<T> scratch(static_cast<std::size_t>(K));
      for (index_t t = first; t < last; ++t) {
        T* h = h_.data() + t * G;
        Act::forward(pre_.data() + t * Act::fan * G, h, G);
        if (K > 0) keep_topk(h, kept_.data() + t * K, scratch.data());
      }
    });
    detail::blocked_gemm_nn<T>(std::as_const(h_).matrix(), std::as_const(w2_.value).matrix(), y,
                               {.bias = config_.bias ? b2_.value.data() : nullptr});
  }

  void backward(ConstMatrixView<T> dy, MatrixView<T> dx) {
    using namespace cpu_kernels;
    const index_t tokens = x_.rows, d = d_model(), G = hidden(), K = config_.topk;
    if (!has_forward_) fail(name, ": backward called before forward");
    expect_shape(name, "dy", dy, tokens, d);
    expect_shape(name, "dx", dx, tokens, d);
    if (validate_inputs) check_finite(name, "dy", dy);
    if (tokens == 0) return;
    dh_.resize({tokens, G});
    dpre_.resize({tokens, Act::fan * G});
    detail::blocked_gemm_nt<T>(dy, std::as_const(w2_.value).matrix(), dh_.matrix(), weight_t_);
    detail::blocked_gemm_tn_add<T>(std::as_const(h_).matrix(), dy, w2_.grad.matrix());
    if (config_.bias) detail::add_column_sums<T>(dy, b2_.grad.data());
    parallel_for_blocks(tokens, row_block, [&](index_t first, index_t last) {
      std::vector<T> scratch(static_cast<std::size_t>(K));
      for (index_t t = first; t < last; ++t) {
        T* dh = dh_.data() + t * G;
        if (K > 0) mask_to_kept(dh, kept_.data() + t * K, scratch.data());
        const T* pre = fused_relu() ? h_.data() + t * G : pre_.data() + t * Act::fan * G;
        Act::backward(pre, dh, dpre_.data() + t * Act::fan * G, G);
      }
    });
    const ConstMatrixView<T> dpre = std::as_const(dpre_).matrix();
    detail::blocked_gemm_tn_add<T>(x_, dpre, w1_.grad.matrix());
    if (config_.bias) detail::add_column_sums<T>(dpre, b1_.grad.data());
    detail::blocked_gemm_nt<T>(dpre, std::as_const(w1_.value).matrix(), dx, weight_t_);
  }

 private:
  static constexpr index_t row_block = 64;

  bool fused_relu() const { return std::is_same_v<Act, Relu> && config_.topk == 0; }

  // Keeps the K largest entries of h (length G), zeroes the rest, records the kept units;
  // `values` is K scratch values.
  void keep_topk(T* h, std::int32_t* kept, T* values) const {
    const index_t G = hidden(), K = config_.topk;
    select_topk(h, G, K, kept);
    for (index_t j = 0; j < K; ++j) values[j] = h[kept[j]];
    std::fill_n(h, G, T(0));
    for (index_t j = 0; j < K; ++j) h[kept[j]] = values[j];
  }
  void mask_to_kept(T* dh, const std::int32_t* kept, T* values) const {
    const index_t G = hidden(), K = config_.topk;
    for (index_t j = 0; j < K; ++j) values[j] = dh[kept[j]];
    std::fill_n(dh, G, T(0));
    for (index_t j = 0; j < K; ++j) dh[kept[j]] = values[j];
  }

  DenseMLPConfig config_;
  Parameter<T> w1_, w2_, b1_, b2_;
  ConstMatrixView<T> x_;  // the forward input (not copied: it must hold its values until backward)
  bool has_forward_ = false;
  Tensor<T> pre_, h_;     // forward cache (pre only when the activation is not a fused ReLU)
  Tensor<std::int32_t> kept_;
  Tensor<T> dh_, dpre_;
  Tensor<T> weight_t_;  // backward: a transposed weight for dh = dy·W2ᵀ, dx = dpre·W1ᵀ
};

}  // namespace smoe
