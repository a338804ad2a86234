#pragma once
// Log-domain Sinkhorn balancing (Sinkhorn & Knopp 1967; Cuturi 2013), the balancing step of
// S-BASE (Clark et al. 2022, "Unified Scaling Laws for Routed Language Models").
//
// For scores z [T, E] it finds potentials a [E], b [T] such that P_te = exp(z_te + a_e + b_t) has
// row sums r_t = 1 (each token's unit of mass) and column sums c_e = T / E (balanced experts):
//   start a = 0; repeat `iters` times:
//     b_t = log r_t − LSE_e(z_te + a_e)        (rows sum to 1)
//     a_e = log c_e − LSE_t(z_te + b_t)        (then columns sum to T / E)
//   log P_te = z_te + a_e + b_t                (iters = 0: log P = z)
// After every iteration the columns hold their targets exactly (up to rounding) and the rows
// converge to theirs. The last column step is written as log P_te = (z_te + b_t) − LSE_t(z + b) + log c_e,
// the same value in exact arithmetic, so that a column with one entry (T = 1) gives exactly log c.
//
// The sigma-MoE reference code (`sinkhorn_unnorm`) computes b_t = log A − LSE_e(z_te − a_e) and
// a_e = log B − LSE_t(z_te − b_t) but outputs exp(z + a + b): its potentials enter the LSE with the
// opposite sign to the output, so it is not a Sinkhorn iteration and does not converge. smoe
// implements the textbook iteration above.
//
// Non-finite scores: NaN counts as no mass (like −Inf); a row or column whose LSE is not finite
// (all its scores −Inf/NaN, or one +Inf) cannot be balanced and keeps potential 0, so one bad
// token never spreads NaN into the others. No index ever depends on a score.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "smoe/core/config.hpp"
#include "smoe/core/error.hpp"
#include "smoe/core/view.hpp"
#include "smoe/cpu/parallel.hpp"

namespace smoe {

namespace detail {

// Running log-sum-exp of one row or column: max first, then the sum of exp(v − max); NaN skipped.
// __host__ __device__: the CUDA backend's Sinkhorn (cuda/sinkhorn.cuh) runs the same code.
template <class T>
struct LseAccumulator {
  T max = -std::numeric_limits<T>::infinity();
  T sum = 0;
  SMOE_HOST_DEVICE static bool is_nan(T v) { return v != v; }
  SMOE_HOST_DEVICE static bool is_finite(T v) { return v - v == T(0); }  // false for ±Inf and NaN
  SMOE_HOST_DEVICE void take_max(T v) {
    if (v > max) max = v;  // false for NaN
  }
  SMOE_HOST_DEVICE void take_sum(T v) {
    using std::exp;
    if (!is_nan(v) && is_finite(max)) sum += exp(v - max);
  }
  // Merges another block's partial (its own max and its sum relative to that max).
  SMOE_HOST_DEVICE void merge(const LseAccumulator& o) {
    using std::exp;
    const T neg_inf = -std::numeric_limits<T>::infinity();
    if (!(o.max > neg_inf)) return;
    if (!(max > neg_inf)) {
      *this = o;
      return;
    }
    if (!is_finite(max) || !is_finite(o.max)) {
      max = max < o.max ? o.max : max;  // +Inf: the LSE is +Inf, the sum no longer matters
      return;
    }
    const T m = max < o.max ? o.max : max;
    sum = sum * exp(max - m) + o.sum * exp(o.max - m);
    max = m;
  }
  // The LSE, or NaN when it is not finite (no mass or +Inf): the caller then keeps potential 0.
  SMOE_HOST_DEVICE T value() const {
    using std::log;
    if (!is_finite(max) || !(sum > 0)) return std::numeric_limits<T>::quiet_NaN();
    const T v = max + log(sum);
    return is_finite(v) ? v : std::numeric_limits<T>::quiet_NaN();
  }
};

}  // namespace detail

// Writes log P [T, E] of the balanced transport plan for scores z [T, E] after `iters`
// iterations (see the header comment). log_p must not overlap z. Work is split into fixed blocks
// of rows whose partial column sums are combined in block order, so the result does not depend on
// the thread count.
template <class T>
void sinkhorn_balance(ConstMatrixView<T> z, index_t iters, MatrixView<T> log_p) {
  constexpr const char* name = "sinkhorn_balance";
  if (iters < 0) fail(name, ": iters must be >= 0, got ", iters);
  expect_shape(name, "log_p", log_p, z.rows, z.cols);
  const index_t tokens = z.rows, E = z.cols;
  if (tokens == 0 || E == 0) return;
  const std::less<const T*> before;  // a total order even for pointers into different arrays
  const T* out_first = log_p.data;
  const T* out_end = log_p.data + (log_p.rows - 1) * log_p.stride + log_p.cols;
  if (before(z.data, out_end) && before(out_first, z.data + (z.rows - 1) * z.stride + z.cols))
    fail(name, ": log_p must not overlap z");
  if (iters == 0) {
    for (index_t t = 0; t < tokens; ++t) std::copy_n(z.row(t), E, log_p.row(t));
    return;
  }

  constexpr index_t block = 128;
  const index_t blocks = std::max<index_t>(1, tokens / block);
  // Threads only when the work pays for a parallel region; the blocks are the same either way.
  const bool parallel = tokens * E >= 32768;
  auto for_blocks = [&](auto&& f) {
    auto body = [&](index_t b) { f(b, b * block, b + 1 == blocks ? tokens : (b + 1) * block); };
    if (parallel)
      cpu_kernels::parallel_for(blocks, body);
    else
      for (index_t b = 0; b < blocks; ++b) body(b);
  };

  const T log_c = std::log(T(tokens)) - std::log(T(E));
  std::vector<T> a(static_cast<std::size_t>(E), T(0)), b(static_cast<std::size_t>(tokens), T(0));
  std::vector<T> column_lse(static_cast<std::size_t>(E));
  std::vector<detail::LseAccumulator<T>> partial(static_cast<std::size_t>(blocks * E));

  for (index_t it = 0; it < iters; ++it) {
    // Rows: b_t = 0 − LSE_e(z_te + a_e).
    for_blocks([&](index_t, index_t first, index_t last) {
      for (index_t t = first; t < last; ++t) {
        const T* zt = z.row(t);
        detail::LseAccumulator<T> acc;
        for (index_t e = 0; e < E; ++e) acc.take_max(zt[e] + a[e]);
        for (index_t e = 0; e < E; ++e) acc.take_sum(zt[e] + a[e]);
        const T lse = acc.value();
        b[t] = std::isnan(lse) ? T(0) : -lse;
      }
    });
    // Columns: a_e = log c − LSE_t(z_te + b_t), as per-block partials merged in block order.
    for_blocks([&](index_t blk, index_t first, index_t last) {
      detail::LseAccumulator<T>* acc = partial.data() + blk * E;
      for (index_t e = 0; e < E; ++e) acc[e] = {};
      for (index_t t = first; t < last; ++t) {
        const T* zt = z.row(t);
        for (index_t e = 0; e < E; ++e) acc[e].take_max(zt[e] + b[t]);
      }
      for (index_t t = first; t < last; ++t) {
        const T* zt = z.row(t);
        for (index_t e = 0; e < E; ++e) acc[e].take_sum(zt[e] + b[t]);
      }
    });
    for (index_t e = 0; e < E; ++e) {
      detail::LseAccumulator<T> acc = partial[e];
      for (index_t blk = 1; blk < blocks; ++blk) acc.merge(partial[blk * E + e]);
      column_lse[e] = acc.value();
      a[e] = std::isnan(column_lse[e]) ? T(0) : log_c - column_lse[e];
    }
  }

  for_blocks([&](index_t, index_t first, index_t last) {
    for (index_t t = first; t < last; ++t) {
      const T* zt = z.row(t);
      T* out = log_p.row(t);
      for (index_t e = 0; e < E; ++e)
        out[e] = std::isnan(column_lse[e]) ? zt[e] + b[t] : (zt[e] + b[t]) - column_lse[e] + log_c;
    }
  });
}

}  // namespace smoe
