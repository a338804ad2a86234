#pragma once
// Top-k selection on the device, with the CPU's total order (routing/topk_select.hpp): candidates
// not removed before removed ones, then larger score first (NaN below -Inf), then the smaller
// index. Output best first. Insertion into a kept list of k <= max_topk entries held in registers.
#include <cstdint>

#include "smoe/core/config.hpp"

namespace smoe::cuda_kernels {

inline constexpr index_t max_topk = 32;

// The k best candidates offered so far, best first (k <= max_topk).
template <class T>
struct TopKList {
  struct Candidate {
    bool alive, number;
    T score;
    std::int32_t index;
  };
  Candidate kept[max_topk] = {};  // initialized only to quiet GCC 12's -O3 maybe-uninitialized
  index_t k = 0, filled = 0;

  SMOE_HOST_DEVICE static bool beats(const Candidate& a, const Candidate& b) {
    if (a.alive != b.alive) return a.alive;
    if (a.number != b.number) return a.number;
    if (a.number && a.score != b.score) return a.score > b.score;
    return a.index < b.index;
  }
  SMOE_HOST_DEVICE void offer(T score, std::int32_t index, bool alive = true) {
    const Candidate c{alive, score == score, score, index};
    if (filled == k && !beats(c, kept[k - 1])) return;
    index_t pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && beats(c, kept[pos - 1])) {
      kept[pos] = kept[pos - 1];
      --pos;
    }
    kept[pos] = c;
  }
};

// removed(i) -> bool: whether candidate i is removed (expert dropout); pass NotRemoved for none.
struct NotRemoved {
  SMOE_HOST_DEVICE bool operator()(index_t) const { return false; }
};

// The k best of s[0..n) (k <= n): always k distinct valid ids.
template <class T, class Removed>
SMOE_HOST_DEVICE void topk_row(const T* s, index_t n, index_t k, std::int32_t* out, const Removed& removed) {
  TopKList<T> list;
  list.k = k;
  for (index_t i = 0; i < n; ++i) list.offer(s[i], static_cast<std::int32_t>(i), !removed(i));
  for (index_t j = 0; j < k; ++j) out[j] = list.kept[j].index;
}

}  // namespace smoe::cuda_kernels
