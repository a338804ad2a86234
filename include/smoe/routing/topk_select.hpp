#pragma once
// Top-k selection over one token's scores with a total order, so the result is always k valid,
// distinct indices whatever the scores hold (NaN, Inf, ties):
//   alive candidates before dropped ones, then larger score first (NaN ranks below -Inf), then the
//   smaller index first (ties go to the smaller expert id, as cub::DeviceTopK documents).
// Output order is best first.
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <type_traits>
#include <vector>

#include "smoe/core/config.hpp"
#include "smoe/cpu/topk_avx512.hpp"

namespace smoe {

namespace detail {
template <class T>
struct Candidate {
  bool alive;
  bool number;  // not NaN
  T score;
  std::int32_t index;
  bool beats(const Candidate& o) const {
    if (alive != o.alive) return alive;
    if (number != o.number) return number;
    if (number && score != o.score) return score > o.score;
    return index < o.index;
  }
};

// Insertion into a kept list of k <= 16, best first, under the strict order `before`; a
// candidate that does not beat the k-th kept one costs one comparison.
template <class T, class Before>
void insert_topk(const T* scores, index_t n, index_t k, std::int32_t* out, Before before) {
  T kept[16] = {};  // zero-initialized only to quiet GCC 12's -O3 maybe-uninitialized
  std::int32_t ids[16] = {};
  index_t filled = 0;
  for (index_t i = 0; i < n; ++i) {
    const T v = scores[i];
    if (filled == k && !before(v, kept[k - 1])) continue;
    index_t pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && before(v, kept[pos - 1])) {
      kept[pos] = kept[pos - 1];
      ids[pos] = ids[pos - 1];
      --pos;
    }
    kept[pos] = v;
    ids[pos] = static_cast<std::int32_t>(i);
  }
  std::copy_n(ids, k, out);
}
}  // namespace detail

// Writes the k best of scores[0..n) into out[0..k). `dropped` (may be null): candidates with a
// nonzero entry rank below every alive one. Requires 1 <= k <= n.
template <class T>
void select_topk(const T* scores, index_t n, index_t k, std::int32_t* out, const std::uint8_t* dropped = nullptr) {
  using C = detail::Candidate<T>;
  auto candidate = [&](index_t i) {
    const T s = scores[i];
    return C{dropped == nullptr || dropped[i] == 0, !std::isnan(s), s, static_cast<std::int32_t>(i)};
  };
  const auto better = [](const C& a, const C& b) { return a.beats(b); };
  if (k > 16) {  // large k (top-k activations over thousands of units): linear-time partition
    std::vector<C> all(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) all[i] = candidate(i);
    std::nth_element(all.begin(), all.begin() + (k - 1), all.end(), better);
    std::sort(all.begin(), all.begin() + k, better);
    for (index_t j = 0; j < k; ++j) out[j] = all[j].index;
    return;
  }
  if (dropped == nullptr) {  // the common case, on raw scores: same order, a cheap rejection test
    bool any_nan = false;  // (a vectorizable scan) without NaN the order is plain `>`
    for (index_t i = 0; i < n; ++i) any_nan |= scores[i] != scores[i];
    // a ranks before b: larger first, a number before NaN; equal scores keep the earlier
    // (smaller) index first because candidates arrive in index order.
    if (any_nan) {
      detail::insert_topk(scores, n, k, out, [](T a, T b) { return a > b || (b != b && a == a); });
      return;
    }
#if defined(SMOE_HAVE_AVX512_GEMM)
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>)
      if (n <= 1024 && cpu_kernels::avx512::cpu_supports_avx512()) {
        cpu_kernels::avx512::topk_no_nan(scores, n, k, out);
        return;
      }
#endif
    detail::insert_topk(scores, n, k, out, [](T a, T b) { return a > b; });
    return;
  }
  C top[16];  // insertion into the kept list, best first
  index_t filled = 0;
  for (index_t i = 0; i < n; ++i) {
    const C c = candidate(i);
    if (filled == k && !c.beats(top[k - 1])) continue;
    index_t pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && c.beats(top[pos - 1])) {
      top[pos] = top[pos - 1];
      --pos;
    }
    top[pos] = c;
  }
  for (index_t j = 0; j < k; ++j) out[j] = top[j].index;
}

}  // namespace smoe
