#pragma once
// Switch Transformer load-balancing loss (Fedus et al. 2022, Eq. 4-6):
//   L = E · Σ_e f_e · P_e,
//   f_e = fraction of tokens whose highest-scoring expert (argmax of the raw logits, ties to the
//         smaller id) is e — piecewise constant, so no gradient flows through it;
//   P_e = mean over tokens of softmax(raw logits)_e, for every router (also sigmoid ones).
// L = 1 at perfect balance. The sigma-MoE reference code computes mean_{t,e}(p_te · f_e), i.e.
// this value divided by E²; smoe uses the paper's form.
#include <cstdint>
#include <vector>

#include "smoe/losses/balance_loss.hpp"
#include "smoe/routing/topk_select.hpp"

namespace smoe {

template <class T>
struct SwitchBalanceLoss {
  using scalar_type = T;
  static constexpr const char* name = "SwitchBalanceLoss";
  double coef;

  explicit SwitchBalanceLoss(double coefficient = 0.01) : coef(coefficient) {}

  T forward(const Routing<T>& r, index_t E) {
    detail::expect_logits(name, r, E);
    const index_t tokens = r.tokens();
    f_.assign(static_cast<std::size_t>(E), T(0));
    std::vector<T> P(static_cast<std::size_t>(E), T(0));
    for (index_t t = 0; t < tokens; ++t) {
      const T* s = r.logits.data() + t * E;
      std::int32_t top;
      select_topk(s, E, 1, &top);
      f_[top] += T(1) / T(tokens);
      const T lse = detail::logsumexp(s, E);
      for (index_t e = 0; e < E; ++e) P[e] += std::exp(s[e] - lse) / T(tokens);
    }
    T loss = 0;
    for (index_t e = 0; e < E; ++e) loss += f_[e] * P[e];
    return T(E) * loss;
  }

  // ∂L/∂s_ti = (E/T) · p_ti · (f_i − Σ_e f_e p_te)
  void backward(const Routing<T>& r, index_t E, MatrixView<T> d_logits, MatrixView<T>) const {
    const index_t tokens = r.tokens();
    for (index_t t = 0; t < tokens; ++t) {
      const T* s = r.logits.data() + t * E;
      const T lse = detail::logsumexp(s, E);
      T fp = 0;
      for (index_t e = 0; e < E; ++e) fp += f_[e] * std::exp(s[e] - lse);
      for (index_t e = 0; e < E; ++e)
        d_logits(t, e) += T(coef) * T(E) / T(tokens) * std::exp(s[e] - lse) * (f_[e] - fp);
    }
  }

 private:
  std::vector<T> f_;  // from forward: the non-differentiable dispatch fractions
};

}  // namespace smoe
