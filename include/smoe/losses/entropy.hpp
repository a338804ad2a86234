#pragma once
// sigma-MoE entropy regularizer (Csordás et al. 2023, Eq. 20-21): L = Σ_e p_e log p_e = −H(p),
// p = mean over all tokens of softmax(raw router logits), also for sigmoid routers. Minimizing it
// maximizes the entropy of the batch-averaged selection distribution. log p_e =
// logsumexp_t(log_softmax(s_t)_e) − log T, as the reference code computes it: by summing the
// softmax over the tokens, and in log space for an expert whose sum would underflow. Range
// [−log E, 0].
#include <algorithm>
#include <cmath>
#include <limits>
#include <span>
#include <vector>

#include "smoe/losses/balance_loss.hpp"

namespace smoe {

// EntropyLoss<T, cuda> is the CUDA backend's (smoe/cuda/losses.cuh).
template <class T, class Backend = cpu>
struct EntropyLoss {
  static_assert(std::is_same_v<Backend, cpu>, "EntropyLoss<T, cuda> needs <smoe/cuda/losses.cuh>");
  using scalar_type = T;
  static constexpr const char* name = "EntropyLoss";
  double coef;

  explicit EntropyLoss(double coefficient = 0.001) : coef(coefficient) {}

  LossScope scope = LossScope::local;

  T forward(const Routing<T>& r, index_t E) {
    if (scope == LossScope::global) return forward(r, E, detail::NoReduce{});
    detail::expect_logits(name, r, E);
    const index_t tokens = r.tokens();
    constexpr T neg_inf = -std::numeric_limits<T>::infinity();
    log_p_.assign(static_cast<std::size_t>(E), neg_inf);
    batch_tokens_ = T(tokens);
    if (tokens == 0) return T(0);
    // T·p_e = Σ_t q_te in one exp pass. Where that sum is too small for a float to hold it
    // accurately, the column is redone in log space: LSE_t(s_te − lse_t).
    const std::vector<T> column_sums = detail::softmax_column_sums(r.logits, E, lse_);
    constexpr T tiny = std::numeric_limits<T>::min() / std::numeric_limits<T>::epsilon();
    T loss = 0;
    for (index_t e = 0; e < E; ++e) {
      if (column_sums[e] > tiny) {
        log_p_[e] = std::log(column_sums[e]) - std::log(T(tokens));
      } else {
        T m = neg_inf, sum = 0;  // running (max, Σ exp(· − max)) over the tokens in order
        for (index_t t = 0; t < tokens; ++t) {
          const T z = r.logits[t * E + e] - lse_[t];
          if (!(z > neg_inf)) continue;  // no mass (or NaN)
          const T nm = std::max(m, z);
          sum = (m > neg_inf ? sum * std::exp(m - nm) : T(0)) + std::exp(z - nm);
          m = nm;
        }
        log_p_[e] = m > neg_inf ? m + std::log(sum) - std::log(T(tokens)) : neg_inf;
      }
      if (std::isfinite(log_p_[e])) loss += std::exp(log_p_[e]) * log_p_[e];  // 0·log 0 = 0
    }
    return loss;
  }

  // The global scope (reduce(std::span<T>) sums over the ranks): p_e from the column sums Σ_t q_te
  // summed over ranks. Unlike the local scope it has no log-space path for an expert whose summed
  // column underflows: log p_e = log of that sum (−∞ for 0, which adds nothing); such an expert's
  // term p_e·log p_e is below 1e-29 in float and its gradient is scaled by q_te ≤ that sum.
  template <class Reduce>
  T forward(const Routing<T>& r, index_t E, Reduce&& reduce) {
    if (scope == LossScope::local) return forward(r, E);
    detail::expect_logits(name, r, E);
    constexpr T neg_inf = -std::numeric_limits<T>::infinity();
    std::vector<T> sums = detail::softmax_column_sums(r.logits, E, lse_);
    sums.push_back(T(r.tokens()));
    reduce(std::span<T>(sums));
    batch_tokens_ = sums[E];
    log_p_.assign(static_cast<std::size_t>(E), neg_inf);
    if (batch_tokens_ == T(0)) return T(0);
    T loss = 0;
    for (index_t e = 0; e < E; ++e) {
      if (sums[e] > T(0)) log_p_[e] = std::log(sums[e]) - std::log(batch_tokens_);
      if (std::isfinite(log_p_[e])) loss += std::exp(log_p_[e]) * log_p_[e];
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
    const T scale = T(coef) / batch_tokens_;
    detail::for_each_softmax_row(r.logits, E, lse_, [&](index_t t, const T* q_data) {
      const ConstArrayMap<T> q(q_data, E);
      const T mean = (q * lp).sum();
      ArrayMap<T>(d_logits.row(t), E) += scale * q * (lp - mean);
    });
  }

 private:
  std::vector<T> log_p_;  // log p_e of the last forward
  std::vector<T> lse_;    // per-token logsumexp of the last forward
  T batch_tokens_ = 0;    // tokens of the batch p covers
};

}  // namespace smoe
