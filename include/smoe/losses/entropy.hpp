#pragma once
// sigma-MoE entropy regularizer (Csordás et al. 2023, Eq. 20-21): L = Σ_e p_e log p_e = −H(p),
// p = mean over all tokens of softmax(raw router logits), also for sigmoid routers. Minimizing it
// maximizes the entropy of the batch-averaged selection distribution. Computed in log space as
// the reference code does: log p_e = logsumexp_t(log_softmax(s_t)_e) − log T. Range [−log E, 0].
#include <algorithm>
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
    using detail::ArrayMap, detail::ConstArrayMap;
    detail::expect_logits(name, r, E);
    const index_t tokens = r.tokens();
    constexpr T neg_inf = -std::numeric_limits<T>::infinity();
    log_p_.assign(static_cast<std::size_t>(E), neg_inf);
    if (tokens == 0) return T(0);
    detail::row_logsumexp(r.logits, E, lse_);
    // log p_e = LSE_t(z_te) − log T with z = log softmax: per token block a max and a shifted sum
    // of exp per expert, vectorized over the experts, then the blocks merged in order.
    const index_t blocks = std::max<index_t>(1, tokens / detail::loss_token_block);
    std::vector<T> block_max(static_cast<std::size_t>(blocks * E), neg_inf), block_sum(block_max.size(), T(0));
    cpu_kernels::parallel_for_blocks(tokens, detail::loss_token_block, [&](index_t first, index_t last) {
      const index_t b = first / detail::loss_token_block;
      ArrayMap<T> m(block_max.data() + b * E, E), sum(block_sum.data() + b * E, E);
      for (index_t t = first; t < last; ++t) m = m.max(ConstArrayMap<T>(r.logits.data() + t * E, E) - lse_[t]);
      const auto shift = m.isFinite().select(m, T(0));  // an all −Inf column sums to 0
      for (index_t t = first; t < last; ++t) sum += (ConstArrayMap<T>(r.logits.data() + t * E, E) - lse_[t] - shift).exp();
    });
    T loss = 0;
    for (index_t e = 0; e < E; ++e) {
      T m = neg_inf, sum = 0;  // running (max, Σ exp(· − max)) over the blocks in order
      for (index_t b = 0; b < blocks; ++b) {
        const T bm = block_max[b * E + e], bs = block_sum[b * E + e];
        if (!(bm > neg_inf)) continue;
        const T nm = std::max(m, bm);
        sum = (m > neg_inf ? sum * std::exp(m - nm) : T(0)) + bs * std::exp(bm - nm);
        m = nm;
      }
      log_p_[e] = m > neg_inf ? m + std::log(sum) - std::log(T(tokens)) : neg_inf;
      if (std::isfinite(log_p_[e])) loss += std::exp(log_p_[e]) * log_p_[e];  // 0·log 0 = 0
    }
    return loss;
  }

  // ∂L/∂s_ti = (1/T) · q_ti · (log p_i − Σ_e q_te log p_e), q_t = softmax(s_t)
  void backward(const Routing<T>& r, index_t E, MatrixView<T> d_logits, MatrixView<T>) const {
    using detail::ArrayMap, detail::ConstArrayMap;
    const index_t tokens = r.tokens();
    if (tokens == 0) return;
    expect_equal(name, "tokens of backward (= tokens of the last forward)", index_t(lse_.size()), tokens);
    std::vector<T> finite_log_p(static_cast<std::size_t>(E));
    // An expert with p_e = 0 has q_te = 0 for every token, so its log only needs to be finite.
    for (index_t e = 0; e < E; ++e) finite_log_p[e] = std::isfinite(log_p_[e]) ? log_p_[e] : T(0);
    const ConstArrayMap<T> lp(finite_log_p.data(), E);
    const T scale = T(coef) / T(tokens);
    detail::for_each_softmax_row(r.logits, E, lse_, [&](index_t t, const T* q_data) {
      const ConstArrayMap<T> q(q_data, E);
      const T mean = (q * lp).sum();
      ArrayMap<T>(d_logits.row(t), E) += scale * q * (lp - mean);
    });
  }

 private:
  std::vector<T> log_p_;  // log p_e of the last forward
  std::vector<T> lse_;    // per-token logsumexp of the last forward
};

}  // namespace smoe
