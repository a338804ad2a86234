#pragma once
// Router z-loss (ST-MoE, Zoph et al. 2022, Eq. 5): L = mean_t (logsumexp_e s_te)², keeping router
// logits small so that softmax stays well conditioned.
#include "smoe/losses/balance_loss.hpp"

namespace smoe {

// RouterZLoss<T, cuda> is the CUDA backend's (smoe/cuda/losses.cuh).
template <class T, class Backend = cpu>
struct RouterZLoss {
  static_assert(std::is_same_v<Backend, cpu>, "RouterZLoss<T, cuda> needs <smoe/cuda/losses.cuh>");
  using scalar_type = T;
  static constexpr const char* name = "RouterZLoss";
  double coef;

  explicit RouterZLoss(double coefficient = 0.001) : coef(coefficient) {}

  T forward(const Routing<T>& r, index_t E) {
    detail::expect_logits(name, r, E);
    detail::row_logsumexp(r.logits, E, lse_);
    T loss = 0;
    for (const T v : lse_) loss += v * v;  // token order
    return r.tokens() == 0 ? T(0) : loss / T(r.tokens());
  }

  // ∂L/∂s_ti = (2/T) · lse_t · softmax(s_t)_i
  void backward(const Routing<T>& r, index_t E, MatrixView<T> d_logits, MatrixView<T>) const {
    using detail::ArrayMap, detail::ConstArrayMap;
    const index_t tokens = r.tokens();
    if (tokens == 0) return;
    expect_equal(name, "tokens of backward (= tokens of the last forward)", index_t(lse_.size()), tokens);
    const T scale = T(coef) * T(2) / T(tokens);
    detail::for_each_softmax_row(r.logits, E, lse_, [&](index_t t, const T* q) {
      ArrayMap<T>(d_logits.row(t), E) += (scale * lse_[t]) * ConstArrayMap<T>(q, E);
    });
  }

 private:
  std::vector<T> lse_;  // per-token logsumexp of the last forward
};

}  // namespace smoe
