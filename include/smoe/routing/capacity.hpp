#pragma once
// Expert capacity for token-choice routers (Switch, GShard): each expert accepts at most
//   C = ceil(capacity_factor · T · K / E)
// assignments; the rest are dropped and counted. The router's routing stays as it chose (so its
// backward stays exact, e.g. a renormalized softmax still depends on a dropped logit); the dispatch
// is built from a copy of the ids with dropped assignments set to −1. Dropped assignments add
// nothing to y and receive no gate gradient; kept gates are not renormalized.
// Priority decides who is kept when an expert overflows:
//   position: first choices of all tokens before second choices (GShard), then token order;
//   gate:     larger gate first, ties by position.
// capacity_factor = 0 (the default) is dropless.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "smoe/routing/routing.hpp"

namespace smoe {

struct CapacityPolicy {
  enum class Priority { position, gate };
  double capacity_factor = 0.0;  // 0: dropless
  Priority priority = Priority::position;

  bool enabled() const { return capacity_factor > 0.0; }
  void validate(const char* context) const {
    if (!(capacity_factor >= 0.0) || !std::isfinite(capacity_factor))
      fail(context, ": capacity_factor must be >= 0 (0 = dropless), got ", capacity_factor);
  }
  index_t capacity(index_t tokens, index_t k, index_t experts) const {
    const double c = std::ceil(capacity_factor * double(tokens * k) / double(experts));
    // C >= T·K keeps every assignment; capping there keeps a huge factor from overflowing the cast.
    return c >= double(tokens * k) ? tokens * k : static_cast<index_t>(c);
  }
};

// Writes r.experts into `kept` with over-capacity assignments set to −1; returns how many were dropped.
template <class T>
index_t apply_capacity(const CapacityPolicy& policy, index_t experts, const Routing<T>& r, Tensor<std::int32_t>& kept) {
  policy.validate("apply_capacity");
  kept = r.experts;
  if (!policy.enabled()) return 0;
  const index_t tokens = r.tokens(), K = r.k(), C = policy.capacity(tokens, K, experts);
  std::vector<index_t> order(static_cast<std::size_t>(tokens * K));  // (k, t) major: position priority
  for (index_t j = 0, i = 0; j < K; ++j)
    for (index_t t = 0; t < tokens; ++t) order[i++] = t * K + j;
  if (policy.priority == CapacityPolicy::Priority::gate)
    std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) { return r.gates[a] > r.gates[b]; });
  std::vector<index_t> load(static_cast<std::size_t>(experts), 0);
  index_t dropped = 0;
  for (index_t i : order) {
    const std::int32_t e = kept[i];
    if (e < 0 || e >= experts) continue;  // empty, or invalid: build_dispatch reports it
    if (load[e] < C) {
      ++load[e];
    } else {
      kept[i] = -1;
      ++dropped;
    }
  }
  return dropped;
}

}  // namespace smoe
