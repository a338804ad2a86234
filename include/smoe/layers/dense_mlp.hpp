#pragma once
// DenseMLP: the parameter-equal baseline a MoE layer replaces, y = act(x·W1 + b1)·W2 + b2 with
// "w1" [d, fan·d_ff], "w2" [d_ff, d] (biases "b1" [fan·d_ff], "b2" [d] when enabled).
// With `topk` > 0 it is sigma-MoE's Top-K-activation MLP (Csordás et al. 2023, Sec. 3.1): only the
// K largest hidden activations of each token are kept (ties to the smaller unit index), the rest
// are zeroed, which saves the second GEMM's work in principle but not the first.
#include <cstdint>
#include <string_view>

#include "smoe/core/parameter.hpp"
#include "smoe/core/validate.hpp"
#include "smoe/cpu/eigen.hpp"
#include "smoe/cpu/parallel.hpp"
#include "smoe/experts/activation.hpp"
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

template <class T, Activation Act = Relu>
class DenseMLP {
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

  void forward(ConstMatrixView<T> x, MatrixView<T> y) {
    using namespace cpu_kernels;
    const index_t tokens = x.rows, d = d_model(), G = hidden(), K = config_.topk;
    expect_shape(name, "x", x, tokens, d);
    expect_shape(name, "y", y, tokens, d);
    if (validate_inputs) check_finite(name, "x", x);
    x_.resize({tokens, d});
    pre_.resize({tokens, Act::fan * G});
    h_.resize({tokens, G});
    if (tokens == 0) return;
    eigen(x_.matrix()) = eigen(x);
    eigen(pre_.matrix()).noalias() = eigen(x) * eigen(w1_.value.matrix());
    if (config_.bias) eigen(pre_.matrix()).rowwise() += eigen(b1_.value.matrix()).row(0);
    if (K > 0) kept_.resize({tokens, K});
    parallel_for(tokens, [&](index_t t) {
      T* h = h_.data() + t * G;
      Act::forward(pre_.data() + t * Act::fan * G, h, G);
      if (K > 0) keep_topk(h, kept_.data() + t * K);
    });
    eigen(y).noalias() = eigen(ConstMatrixView<T>(h_.matrix())) * eigen(w2_.value.matrix());
    if (config_.bias) eigen(y).rowwise() += eigen(b2_.value.matrix()).row(0);
  }

  void backward(ConstMatrixView<T> dy, MatrixView<T> dx) {
    using namespace cpu_kernels;
    const index_t tokens = x_.rank() == 2 ? x_.dim(0) : -1, d = d_model(), G = hidden(), K = config_.topk;
    if (tokens < 0) fail(name, ": backward called before forward");
    expect_shape(name, "dy", dy, tokens, d);
    expect_shape(name, "dx", dx, tokens, d);
    if (validate_inputs) check_finite(name, "dy", dy);
    if (tokens == 0) return;
    dh_.resize({tokens, G});
    dpre_.resize({tokens, Act::fan * G});
    eigen(dh_.matrix()).noalias() = eigen(dy) * eigen(w2_.value.matrix()).transpose();
    eigen(w2_.grad.matrix()).noalias() += eigen(ConstMatrixView<T>(h_.matrix())).transpose() * eigen(dy);
    if (config_.bias) eigen(b2_.grad.matrix()) += eigen(dy).colwise().sum();
    parallel_for(tokens, [&](index_t t) {
      T* dh = dh_.data() + t * G;
      if (K > 0) mask_to_kept(dh, kept_.data() + t * K);
      Act::backward(pre_.data() + t * Act::fan * G, dh, dpre_.data() + t * Act::fan * G, G);
    });
    eigen(w1_.grad.matrix()).noalias() +=
        eigen(ConstMatrixView<T>(x_.matrix())).transpose() * eigen(ConstMatrixView<T>(dpre_.matrix()));
    if (config_.bias) eigen(b1_.grad.matrix()) += eigen(ConstMatrixView<T>(dpre_.matrix())).colwise().sum();
    eigen(dx).noalias() = eigen(ConstMatrixView<T>(dpre_.matrix())) * eigen(w1_.value.matrix()).transpose();
  }

 private:
  // Keeps the K largest entries of h (length G), zeroes the rest, records the kept units.
  void keep_topk(T* h, std::int32_t* kept) const {
    const index_t G = hidden(), K = config_.topk;
    select_topk(h, G, K, kept);
    std::vector<T> values(static_cast<std::size_t>(K));
    for (index_t j = 0; j < K; ++j) values[j] = h[kept[j]];
    std::fill_n(h, G, T(0));
    for (index_t j = 0; j < K; ++j) h[kept[j]] = values[j];
  }
  void mask_to_kept(T* dh, const std::int32_t* kept) const {
    const index_t G = hidden(), K = config_.topk;
    std::vector<T> values(static_cast<std::size_t>(K));
    for (index_t j = 0; j < K; ++j) values[j] = dh[kept[j]];
    std::fill_n(dh, G, T(0));
    for (index_t j = 0; j < K; ++j) dh[kept[j]] = values[j];
  }

  DenseMLPConfig config_;
  Parameter<T> w1_, w2_, b1_, b2_;
  Tensor<T> x_, pre_, h_;  // forward cache
  Tensor<std::int32_t> kept_;
  Tensor<T> dh_, dpre_;
};

}  // namespace smoe
