#pragma once
// sigma-MoE entropy regularizer (Csordás et al. 2023, Eq. 20-21): L = Σ_e p_e log p_e = −H(p),
// p = mean over all tokens of softmax(raw router logits), also for sigmoid routers. Minimizing it
// maximizes the entropy of the batch-averaged selection distribution. Computed in log space as
// the reference code does: log p_e = logsumexp_t(log_softmax(s_t)_e) − log T. Range [−log E, 0].
#include <cmath>
#include <limits>
#include <vector>

#include "smoe/losses/balance_loss.hpp"

namespace smoe {

template <class T>
struct EntropyLoss {
  using scalar_type = T;
  static constexpr const char* name = "EntropyLoss";
  double coef;

  explicit EntropyLoss(double coefficient = 0.001) : coef(coefficient) {}

  T forward(const Routing<T>& r, index_t E) {
    detail::expect_logits(name, r, E);
    const index_t tokens = r.tokens();
    log_p_.assign(static_cast<std::size_t>(E), -std::numeric_limits<T>::infinity());
    if (tokens == 0) return T(0);
    std::vector<T> column(static_cast<std::size_t>(tokens));
    std::vector<T> lse(static_cast<std::size_t>(tokens));
    for (index_t t = 0; t < tokens; ++t) lse[t] = detail::logsumexp(r.logits.data() + t * E, E);
    T loss = 0;
    for (index_t e = 0; e < E; ++e) {
      for (index_t t = 0; t < tokens; ++t) column[t] = r.logits[t * E + e] - lse[t];
      log_p_[e] = detail::logsumexp(column.data(), tokens) - std::log(T(tokens));
      if (std::isfinite(log_p_[e])) loss += std::exp(log_p_[e]) * log_p_[e];  // 0·log 0 = 0
    }
    return loss;
  }

  // ∂L/∂s_ti = (1/T) · q_ti · (log p_i − Σ_e q_te log p_e), q_t = softmax(s_t)
  void backward(const Routing<T>& r, index_t E, MatrixView<T> d_logits, MatrixView<T>) const {
    const index_t tokens = r.tokens();
    for (index_t t = 0; t < tokens; ++t) {
      const T* s = r.logits.data() + t * E;
      const T lse = detail::logsumexp(s, E);
      T mean = 0;
      for (index_t e = 0; e < E; ++e) mean += std::exp(s[e] - lse) * finite_log_p(e);
      for (index_t e = 0; e < E; ++e)
        d_logits(t, e) += T(coef) / T(tokens) * std::exp(s[e] - lse) * (finite_log_p(e) - mean);
    }
  }

 private:
  // An expert with p_e = 0 has q_te = 0 for every token, so its log only needs to be finite.
  T finite_log_p(index_t e) const { return std::isfinite(log_p_[e]) ? log_p_[e] : T(0); }
  std::vector<T> log_p_;
};

}  // namespace smoe
