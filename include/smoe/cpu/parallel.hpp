#pragma once
// CPU parallelism: OpenMP when the target links it, serial otherwise. Work items are independent
// (one expert, one token block), so results do not depend on the thread count.
//
// A work item always runs inside the parallel region when more than one thread is available,
// even when there is a single item: Eigen parallelizes a GEMM only outside a parallel region, and
// its multithreaded GEMM blocks the depth differently (kc <= 320), which changes the rounding.
// So every Eigen product in a work item is single-threaded and rounds the same for any thread
// count.
#include <algorithm>

#include "smoe/core/config.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace smoe::cpu_kernels {

// Calls f(i) for i in [0, n), dynamically scheduled over the available threads.
template <class F>
void parallel_for(index_t n, F&& f) {
#if defined(_OPENMP)
  if (n > 0 && !omp_in_parallel() && omp_get_max_threads() > 1) {
#pragma omp parallel for schedule(dynamic, 1)
    for (index_t i = 0; i < n; ++i) f(i);
    return;
  }
#endif
  for (index_t i = 0; i < n; ++i) f(i);
}

// How many threads a parallel_for started here may use: 1 inside a parallel region or without
// OpenMP. Per-thread scratch is sized by it.
inline int max_threads() {
#if defined(_OPENMP)
  return omp_in_parallel() ? 1 : std::max(1, omp_get_max_threads());
#else
  return 1;
#endif
}

// parallel_for that also passes the calling thread's index in [0, max_threads()), for per-thread
// scratch buffers: f(i, thread). Serial (thread 0) inside a parallel region.
template <class F>
void parallel_for_indexed(index_t n, F&& f) {
#if defined(_OPENMP)
  const int threads = max_threads();
  if (n > 0 && threads > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (index_t i = 0; i < n; ++i) f(i, omp_get_thread_num());
    return;
  }
#endif
  for (index_t i = 0; i < n; ++i) f(i, 0);
}

// Calls f(begin, end) for consecutive blocks of [0, n): `block` items each, the last block also
// takes the remainder (so no block is a sliver, e.g. a one-row GEMM that Eigen would run as a
// GEMV with another rounding). The blocks are a function of n and block only, never of the
// thread count.
template <class F>
void parallel_for_blocks(index_t n, index_t block, F&& f) {
  if (n <= 0) return;
  const index_t blocks = std::max<index_t>(1, n / block);
  parallel_for(blocks, [&](index_t b) { f(b * block, b + 1 == blocks ? n : (b + 1) * block); });
}

}  // namespace smoe::cpu_kernels
