#pragma once
// Importance loss (Shazeer et al. 2017, Eq. 6): L = CV(I)² = Var(I) / mean(I)², with
// I_e = Σ over assignments to expert e of the final gate, and the population variance over the E
// experts. Its gradient flows into the gates (and through the router's gate policy to the logits).
// L = 0 when no gate mass is routed (mean 0).
#include <span>
#include <vector>

#include "smoe/losses/balance_loss.hpp"

namespace smoe {

// ImportanceLoss<T, cuda> is the CUDA backend's (smoe/cuda/losses.cuh).
template <class T, class Backend = cpu>
struct ImportanceLoss {
  static_assert(std::is_same_v<Backend, cpu>, "ImportanceLoss<T, cuda> needs <smoe/cuda/losses.cuh>");
  using scalar_type = T;
  static constexpr const char* name = "ImportanceLoss";
  double coef;

  explicit ImportanceLoss(double coefficient = 0.1) : coef(coefficient) {}

  LossScope scope = LossScope::local;

  T forward(const Routing<T>& r, index_t E) { return forward(r, E, detail::NoReduce{}); }

  // reduce(std::span<T>) sums a buffer over the ranks of the global batch (scope = global).
  template <class Reduce>
  T forward(const Routing<T>& r, index_t E, Reduce&& reduce) {
    importance_.assign(static_cast<std::size_t>(E), T(0));
    const index_t n = r.tokens() * r.k();
    for (index_t i = 0; i < n; ++i)
      if (const auto e = r.experts[i]; e >= 0 && e < E) importance_[e] += r.gates[i];
    if (scope == LossScope::global) reduce(std::span<T>(importance_));
    mean_ = 0;
    for (T v : importance_) mean_ += v / T(E);
    var_ = 0;
    for (T v : importance_) var_ += (v - mean_) * (v - mean_) / T(E);
    return mean_ == T(0) ? T(0) : var_ / (mean_ * mean_);
  }

  // ∂L/∂I_e = (2/E) · ((I_e − μ)/μ² − Var/μ³), added to every gate routed to e.
  void backward(const Routing<T>& r, index_t E, MatrixView<T>, MatrixView<T> d_gates) const {
    if (mean_ == T(0)) return;
    const index_t K = r.k();
    for (index_t t = 0; t < r.tokens(); ++t)
      for (index_t j = 0; j < K; ++j)
        if (const auto e = r.experts[t * K + j]; e >= 0 && e < E)
          d_gates(t, j) += T(coef) * T(2) / T(E) *
                           ((importance_[e] - mean_) / (mean_ * mean_) - var_ / (mean_ * mean_ * mean_));
  }

 private:
  std::vector<T> importance_;
  T mean_ = 0, var_ = 0;
};

}  // namespace smoe
