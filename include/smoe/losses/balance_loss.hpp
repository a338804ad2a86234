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
#include <vector>

#include <Eigen/Core>

#include "smoe/cpu/parallel.hpp"
#include "smoe/routing/routing.hpp"

namespace smoe {

// On the CUDA backend a loss writes its value into device memory instead of returning it, so the
// layer never waits for the device:  forward(routing, experts, float* value)  (smoe/cuda/).
template <class L>
concept BalanceLoss =
    (std::same_as<backend_of_t<L>, cpu> &&
     requires(L& l, const Routing<typename L::scalar_type>& r, index_t experts, MatrixView<typename L::scalar_type> grad) {
       { l.coef } -> std::convertible_to<double>;
       { l.forward(r, experts) } -> std::convertible_to<typename L::scalar_type>;
       l.backward(r, experts, grad, grad);
     }) ||
    (!std::same_as<backend_of_t<L>, cpu> &&
     requires(L& l, const Routing<typename L::scalar_type, backend_of_t<L>>& r, index_t experts,
              MatrixView<typename L::scalar_type, backend_of_t<L>> grad, typename L::scalar_type* value) {
       { l.coef } -> std::convertible_to<double>;
       l.forward(r, experts, value);
       l.backward(r, experts, grad, grad);
     });

// check_balance_loss<L>(): BalanceLoss<L> with one static_assert per requirement (a first error line
// that names the concept and the member; MoE<> calls it).
template <class L>
constexpr bool check_balance_loss() {
  static_assert(requires { typename L::scalar_type; },
                "smoe::BalanceLoss: missing member type `scalar_type` (float or double)");
  if constexpr (requires { typename L::scalar_type; }) {
    using T = typename L::scalar_type;
    static_assert(requires(L& l) { { l.coef } -> std::convertible_to<double>; },
                  "smoe::BalanceLoss: missing or ill-typed data member `coef` (the loss coefficient, a double)");
    using S = backend_of_t<L>;
    if constexpr (std::same_as<S, cpu>)
      static_assert(requires(L& l, const Routing<T>& r, index_t experts) {
                      { l.forward(r, experts) } -> std::convertible_to<T>;
                    },
                    "smoe::BalanceLoss: missing or ill-typed member `T forward(const Routing<T>& routing, index_t experts)`");
    else
      static_assert(requires(L& l, const Routing<T, S>& r, index_t experts, T* value) { l.forward(r, experts, value); },
                    "smoe::BalanceLoss: missing or ill-typed member `void forward(const Routing<T, cuda>& routing, "
                    "index_t experts, T* value)` (the CUDA backend's form)");
    static_assert(requires(L& l, const Routing<T, S>& r, index_t experts, MatrixView<T, S> d_logits, MatrixView<T, S> d_gates) {
                    l.backward(r, experts, d_logits, d_gates);
                  },
                  "smoe::BalanceLoss: missing or ill-typed member `void backward(const Routing<T>& routing, index_t "
                  "experts, MatrixView<T> d_logits, MatrixView<T> d_gates)`");
  }
  return BalanceLoss<L>;
}

// Which batch a batch-statistic loss (Switch, importance, entropy) reads. `local`: the tokens of
// this process. `global`: the whole batch of an expert-parallel group; the loss's per-expert sums
// (and token count) are summed over ranks by the `reduce` callable the layer passes to
// forward(routing, experts, reduce), so every rank computes the loss of the global batch, and its
// backward gives the gradient of that one loss with respect to this rank's logits and gates.
// In one process both scopes are the same loss.
enum class LossScope { local, global };

namespace detail {
// The reduction of one process: nothing to add.
struct NoReduce {
  template <class Span>
  void operator()(Span) const {}
};

// log Σ exp(s[0..n)), stable for large |s|.
template <class T>
T logsumexp(const T* s, index_t n) {
  const T m = *std::max_element(s, s + n);
  if (!std::isfinite(m)) return m;
  T z = 0;
  for (index_t i = 0; i < n; ++i) z += std::exp(s[i] - m);
  return m + std::log(z);
}

// The logit losses work on fixed blocks of tokens: rows in parallel, per-block partial sums merged
// in block order, so results never depend on the thread count. exp runs vectorized (Eigen arrays).
inline constexpr index_t loss_token_block = 256;

template <class T>
using ArrayMap = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
template <class T>
using ConstArrayMap = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;

// lse[t] = log Σ_e exp(s[t, e]) for every token of logits [T, E]; a row whose max is not finite
// (all −Inf, a +Inf or NaN) gets that max, as logsumexp does.
template <class T>
void row_logsumexp(const Tensor<T>& logits, index_t E, std::vector<T>& lse) {
  const index_t tokens = logits.rank() == 2 ? logits.dim(0) : 0;
  lse.resize(static_cast<std::size_t>(tokens));
  cpu_kernels::parallel_for_blocks(tokens, loss_token_block, [&](index_t first, index_t last) {
    for (index_t t = first; t < last; ++t) {
      const ConstArrayMap<T> s(logits.data() + t * E, E);
      const T m = s.maxCoeff();
      lse[t] = std::isfinite(m) ? m + std::log((s - m).exp().sum()) : m;
    }
  });
}

// q = softmax(s[0..E)) given its lse, vectorized.
template <class T>
void softmax_row(const T* s, index_t E, T lse, T* q) {
  ArrayMap<T>(q, E) = (ConstArrayMap<T>(s, E) - lse).exp();
}

// Calls f(t, q) for every token with q = softmax(logits[t]) (from lse), per token block in
// parallel; f must only write to per-token outputs.
template <class T, class F>
void for_each_softmax_row(const Tensor<T>& logits, index_t E, const std::vector<T>& lse, F&& f) {
  const index_t tokens = static_cast<index_t>(lse.size());
  cpu_kernels::parallel_for_blocks(tokens, loss_token_block, [&](index_t first, index_t last) {
    std::vector<T> q(static_cast<std::size_t>(E));
    for (index_t t = first; t < last; ++t) {
      softmax_row(logits.data() + t * E, E, lse[t], q.data());
      f(t, static_cast<const T*>(q.data()));
    }
  });
}

// Σ_t softmax(logits[t]) [E], filling lse[t] on the way: one exp per element. Per-block sums in
// token order, then the blocks in order.
template <class T>
std::vector<T> softmax_column_sums(const Tensor<T>& logits, index_t E, std::vector<T>& lse) {
  const index_t tokens = logits.rank() == 2 ? logits.dim(0) : 0;
  const index_t blocks = std::max<index_t>(1, tokens / loss_token_block);
  lse.resize(static_cast<std::size_t>(tokens));
  std::vector<T> partial(static_cast<std::size_t>(blocks * E), T(0));
  cpu_kernels::parallel_for_blocks(tokens, loss_token_block, [&](index_t first, index_t last) {
    ArrayMap<T> sum(partial.data() + first / loss_token_block * E, E);
    std::vector<T> buffer(static_cast<std::size_t>(E));
    ArrayMap<T> q(buffer.data(), E);
    for (index_t t = first; t < last; ++t) {
      const ConstArrayMap<T> s(logits.data() + t * E, E);
      const T m = s.maxCoeff();
      if (std::isfinite(m)) {
        q = (s - m).exp();
        const T z = q.sum();
        lse[t] = m + std::log(z);
        q *= T(1) / z;
      } else {  // as logsumexp: the row's lse is its max
        lse[t] = m;
        q = (s - m).exp();
      }
      sum += q;
    }
  });
  std::vector<T> total(static_cast<std::size_t>(E), T(0));
  for (index_t b = 0; b < blocks; ++b)
    for (index_t e = 0; e < E; ++e) total[e] += partial[b * E + e];
  return total;
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
