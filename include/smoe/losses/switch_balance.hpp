#pragma once
// Switch Transformer load-balancing loss (Fedus et al. 2022, Eq. 4-6):
//   L = E · Σ_e f_e · P_e,
//   f_e = fraction of tokens whose highest-scoring expert (argmax of the raw logits, ties to the
//         smaller id) is e — piecewise constant, so no gradient flows through it;
//   P_e = mean over tokens of softmax(raw logits)_e, for every router (also sigmoid ones).
// L = 1 at perfect balance. The sigma-MoE reference code computes mean_{t,e}(p_te · f_e), i.e.
// this value divided by E²; smoe uses the paper's form.
#include <cstdint>
#include <span>
#include <vector>

#include "smoe/losses/balance_loss.hpp"
#include "smoe/routing/topk_select.hpp"

namespace smoe {

// SwitchBalanceLoss<T, cuda> is the CUDA backend's (smoe/cuda/losses.cuh).
template <class T, class Backend = cpu>
struct SwitchBalanceLoss {
  static_assert(std::is_same_v<Backend, cpu>, "SwitchBalanceLoss<T, cuda> needs <smoe/cuda/losses.cuh>");
  using scalar_type = T;
  static constexpr const char* name = "SwitchBalanceLoss";
  double coef;

  explicit SwitchBalanceLoss(double coefficient = 0.01) : coef(coefficient) {}

  LossScope scope = LossScope::local;

  T forward(const Routing<T>& r, index_t E) { return forward(r, E, detail::NoReduce{}); }

  // reduce(std::span<T>) sums a buffer over the ranks of the global batch (scope = global).
  template <class Reduce>
  T forward(const Routing<T>& r, index_t E, Reduce&& reduce) {
    detail::expect_logits(name, r, E);
    const index_t tokens = r.tokens();
    f_.assign(static_cast<std::size_t>(E), T(0));
    // [Σ_t p_t (E) | top-1 counts (E) | tokens]: one buffer, one reduction for the global scope.
    std::vector<T> sums = detail::softmax_column_sums(r.logits, E, lse_);  // fills lse_
    sums.resize(static_cast<std::size_t>(2 * E + 1), T(0));
    for (index_t t = 0; t < tokens; ++t) {
      std::int32_t top;
      select_topk(r.logits.data() + t * E, E, 1, &top);
      sums[E + top] += T(1);
    }
    sums[2 * E] = T(tokens);
    if (scope == LossScope::global) reduce(std::span<T>(sums));
    batch_tokens_ = sums[2 * E];
    if (batch_tokens_ == T(0)) return T(0);
    T loss = 0;
    for (index_t e = 0; e < E; ++e) {
      f_[e] = sums[E + e] / batch_tokens_;
      loss += f_[e] * sums[e] / batch_tokens_;
    }
    return T(E) * loss;
  }

  // ∂L/∂s_ti = (E/T) · p_ti · (f_i − Σ_e f_e p_te), T the tokens of the (local or global) batch
  void backward(const Routing<T>& r, index_t E, MatrixView<T> d_logits, MatrixView<T>) const {
    using detail::ArrayMap, detail::ConstArrayMap;
    const index_t tokens = r.tokens();
    if (tokens == 0) return;
    expect_equal(name, "tokens of backward (= tokens of the last forward)", index_t(lse_.size()), tokens);
    const ConstArrayMap<T> f(f_.data(), E);
    const T scale = T(coef) * T(E) / batch_tokens_;
    detail::for_each_softmax_row(r.logits, E, lse_, [&](index_t t, const T* q_data) {
      const ConstArrayMap<T> p(q_data, E);
      const T fp = (f * p).sum();
      ArrayMap<T>(d_logits.row(t), E) += scale * p * (f - fp);
    });
  }

 private:
  std::vector<T> f_;    // from forward: the non-differentiable dispatch fractions
  std::vector<T> lse_;  // per-token logsumexp of the last forward
  T batch_tokens_ = 0;  // tokens of the batch the statistics cover
};

}  // namespace smoe
