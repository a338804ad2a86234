#pragma once
// cpu_kernels::dot: Σ_c a[c]·b[c] as 16 partial sums (element c into lane c mod 16) added pairwise
// at the end. The order is fixed by n alone (the same on every thread and call), and the compiler
// vectorizes it, where a plain running sum would be one dependent chain of n additions.
#include "smoe/core/config.hpp"

namespace smoe::cpu_kernels {

template <class T>
T dot(const T* a, const T* b, index_t n) {
  constexpr index_t lanes = 16;
  T acc[lanes] = {};
  index_t c = 0;
  for (; c + lanes <= n; c += lanes)
    for (index_t l = 0; l < lanes; ++l) acc[l] += a[c + l] * b[c + l];
  for (index_t l = 0; c + l < n; ++l) acc[l] += a[c + l] * b[c + l];
  for (index_t width = lanes / 2; width > 0; width /= 2)
    for (index_t l = 0; l < width; ++l) acc[l] += acc[l + width];
  return acc[0];
}

}  // namespace smoe::cpu_kernels
