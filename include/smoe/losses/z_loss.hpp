#pragma once
// Router z-loss (ST-MoE, Zoph et al. 2022, Eq. 5): L = mean_t (logsumexp_e s_te)², keeping router
// logits small so that softmax stays well conditioned.
#include "smoe/losses/balance_loss.hpp"

namespace smoe {

template <class T>
struct RouterZLoss {
  using scalar_type = T;
  static constexpr const char* name = "RouterZLoss";
  double coef;

  explicit RouterZLoss(double coefficient = 0.001) : coef(coefficient) {}

  T forward(const Routing<T>& r, index_t E) const {
    detail::expect_logits(name, r, E);
    T loss = 0;
    for (index_t t = 0; t < r.tokens(); ++t) {
      const T lse = detail::logsumexp(r.logits.data() + t * E, E);
      loss += lse * lse;
    }
    return r.tokens() == 0 ? T(0) : loss / T(r.tokens());
  }

  // ∂L/∂s_ti = (2/T) · lse_t · softmax(s_t)_i
  void backward(const Routing<T>& r, index_t E, MatrixView<T> d_logits, MatrixView<T>) const {
    const index_t tokens = r.tokens();
    for (index_t t = 0; t < tokens; ++t) {
      const T* s = r.logits.data() + t * E;
      const T lse = detail::logsumexp(s, E);
      for (index_t e = 0; e < E; ++e) d_logits(t, e) += T(coef) * T(2) / T(tokens) * lse * std::exp(s[e] - lse);
    }
  }
};

}  // namespace smoe
