#pragma once
// The BalanceLoss concept and the softmax helpers the losses share.
// A loss L reads the routing of one forward:
//   forward(routing, experts) -> L (without its coefficient)
//   backward(routing, experts, d_logits [T, E], d_gates [T, K])  adds coef · ∂L into both
// The MoE layer adds Σ coef · L to its aux loss, and the losses' gradients flow back through the
// router (∂L/∂gates through the gate policy, ∂L/∂logits into the router projection).
#include <algorithm>
#include <cmath>
#include <concepts>

#include "smoe/routing/routing.hpp"

namespace smoe {

template <class L>
concept BalanceLoss = requires(L& l, const Routing<typename L::scalar_type>& r, index_t experts,
                               MatrixView<typename L::scalar_type> grad) {
  { l.coef } -> std::convertible_to<double>;
  { l.forward(r, experts) } -> std::convertible_to<typename L::scalar_type>;
  l.backward(r, experts, grad, grad);
};

namespace detail {
// log Σ exp(s[0..n)), stable for large |s|.
template <class T>
T logsumexp(const T* s, index_t n) {
  const T m = *std::max_element(s, s + n);
  if (!std::isfinite(m)) return m;
  T z = 0;
  for (index_t i = 0; i < n; ++i) z += std::exp(s[i] - m);
  return m + std::log(z);
}

// Checks that routing.logits is [T, E]: the logit-based losses need raw router scores.
template <class T>
void expect_logits(const char* context, const Routing<T>& r, index_t experts) {
  if (r.logits.rank() != 2 || r.logits.dim(0) != r.tokens() || r.logits.dim(1) != experts)
    fail(context, ": needs router logits [", r.tokens(), ", ", experts, "]; this router provides ",
         r.logits.rank() == 2 ? r.logits.dim(1) : 0, " logits per token");
}
}  // namespace detail

}  // namespace smoe
