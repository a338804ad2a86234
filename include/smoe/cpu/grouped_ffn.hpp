#pragma once
// The CPU grouped GEMM of two-layer experts over a Dispatch, forward and backward, for any weights
// the caller points it at (an expert pool's own parameters, weights materialized from a shared
// pool, one set tied across layers):
//
//   expert e, slots s ∈ [offsets[e], offsets[e+1]):
//     pre_s = x[token(s)]·W1[e] + b1[e]    [fan·G]      h_s = act(pre_s)    [G]
//     ys[s] = h_s·W2[e] + b2[e]            [d]
//
// Experts run in parallel (dynamic schedule); each gathers its tokens into a per-thread block that
// stays in L2 and runs single-threaded GEMMs on it (cpu/gemm_kernel.hpp: the ReLU and the biases
// are fused into the GEMM's store). Backward gathers x again rather than keeping an [A, d] copy.
// Per-token sums (dx) run per token over the token's slots in k order, so every result is
// independent of the thread count.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "smoe/core/dispatch.hpp"
#include "smoe/core/tensor.hpp"
#include "smoe/cpu/gemm_kernel.hpp"
#include "smoe/cpu/parallel.hpp"
#include "smoe/experts/activation.hpp"

namespace smoe::cpu_kernels {

// Weights of E experts: w1 [E, d, fan·G], w2 [E, G, d], b1 [E, fan·G] and b2 [E, d] or null.
template <class T>
struct ExpertWeights {
  const T* w1 = nullptr;
  const T* w2 = nullptr;
  const T* b1 = nullptr;
  const T* b2 = nullptr;
};

// Where backward accumulates: same layout as ExpertWeights; null biases are skipped.
template <class T>
struct ExpertGradients {
  T* w1 = nullptr;
  T* w2 = nullptr;
  T* b1 = nullptr;
  T* b2 = nullptr;
};

struct GroupedFFNShape {
  index_t d_model = 0;
  index_t hidden = 0;  // G
};

// What forward keeps for backward, and the per-thread scratch of both passes.
template <class T>
struct GroupedFFNCache {
  Tensor<T> pre, h;  // [A, fan·G] (not kept for ReLU), [A, G]
  Tensor<T> dxs;     // backward: per-slot input gradients [A, d]
  index_t assignments = -1;
  struct Scratch {
    Tensor<T> xs, dh, dpre, gemm;  // gathered inputs, hidden and pre-activation gradients, GEMM scratch
  };
  std::vector<Scratch> scratch;
};

// out[c] += Σ_rows m(r, c), rows in order.
template <class T>
void add_column_sums(ConstMatrixView<T> m, T* out) {
  for (index_t r = 0; r < m.rows; ++r) {
    const T* row = m.row(r);
    for (index_t c = 0; c < m.cols; ++c) out[c] += row[c];
  }
}

// Copies the rows of x of slots [begin, end) into `buffer`, returned as [end − begin, d].
template <class T>
ConstMatrixView<T> gather_slots(ConstMatrixView<T> x, const Dispatch<T>& dispatch, index_t begin, index_t end,
                                Tensor<T>& buffer) {
  const index_t d = x.cols;
  buffer.resize({end - begin, d});
  for (index_t s = begin; s < end; ++s)
    std::copy_n(x.row(dispatch.slot_token[static_cast<std::size_t>(s)]), d, buffer.data() + (s - begin) * d);
  return std::as_const(buffer).matrix();
}

// Matrix e of a stack of E matrices [E, rows, cols].
template <class T>
ConstMatrixView<T> expert_matrix(const T* base, index_t e, index_t rows, index_t cols) {
  return {base + e * rows * cols, rows, cols};
}

// ys [A, d] = the ungated output of each slot's expert; fills cache for backward.
template <class T, Activation Act>
void grouped_ffn_forward(ConstMatrixView<T> x, const Dispatch<T>& dispatch, ExpertWeights<T> w,
                         GroupedFFNShape shape, MatrixView<T> ys, GroupedFFNCache<T>& cache) {
  constexpr bool relu = std::is_same_v<Act, Relu>;
  const index_t A = dispatch.assignments(), d = shape.d_model, G = shape.hidden, H = Act::fan * G;
  cache.h.resize({A, G});
  if constexpr (!relu) cache.pre.resize({A, H});
  cache.assignments = A;
  cache.scratch.resize(static_cast<std::size_t>(max_threads()));
  parallel_for_indexed(dispatch.experts, [&](index_t e, int thread) {
    const index_t begin = dispatch.expert_begin(e), end = dispatch.expert_end(e);
    if (begin == end) return;
    auto& scratch = cache.scratch[static_cast<std::size_t>(thread)];
    const ConstMatrixView<T> xs = gather_slots(x, dispatch, begin, end, scratch.xs);
    const MatrixView<T> h = cache.h.matrix().rows_range(begin, end);
    // ReLU: the GEMM stores max(pre, 0) straight into h (h > 0 exactly where pre > 0).
    const MatrixView<T> pre = relu ? h : cache.pre.matrix().rows_range(begin, end);
    gemm(xs, Op::none, expert_matrix(w.w1, e, d, H), Op::none, pre,
         GemmEpilogue<T>{.bias = w.b1 ? w.b1 + e * H : nullptr, .relu = relu}, &scratch.gemm);
    if constexpr (!relu)
      for (index_t i = 0; i < end - begin; ++i) Act::forward(pre.row(i), h.row(i), G);
    gemm(ConstMatrixView<T>(h), Op::none, expert_matrix(w.w2, e, G, d), Op::none, ys.rows_range(begin, end),
         GemmEpilogue<T>{.bias = w.b2 ? w.b2 + e * d : nullptr}, &scratch.gemm);
  });
}

// Accumulates the weight gradients into g and WRITES dx [T, d] (0 for tokens without a slot).
// x and dispatch must be those of the forward that filled cache.
template <class T, Activation Act>
void grouped_ffn_backward(ConstMatrixView<T> x, const Dispatch<T>& dispatch, ExpertWeights<T> w, ExpertGradients<T> g,
                          GroupedFFNShape shape, ConstMatrixView<T> dys, MatrixView<T> dx,
                          GroupedFFNCache<T>& cache) {
  constexpr bool relu = std::is_same_v<Act, Relu>;
  const index_t A = dispatch.assignments(), d = shape.d_model, G = shape.hidden, H = Act::fan * G;
  if (cache.assignments != A) fail("grouped_ffn_backward: needs the forward of the same dispatch first");
  cache.dxs.resize({A, d});
  cache.scratch.resize(static_cast<std::size_t>(max_threads()));
  parallel_for_indexed(dispatch.experts, [&](index_t e, int thread) {
    const index_t begin = dispatch.expert_begin(e), end = dispatch.expert_end(e), n = end - begin;
    if (n == 0) return;
    auto& scratch = cache.scratch[static_cast<std::size_t>(thread)];
    const ConstMatrixView<T> dy = dys.rows_range(begin, end);
    const ConstMatrixView<T> h = std::as_const(cache.h).matrix().rows_range(begin, end);
    scratch.dh.resize({n, G});
    const MatrixView<T> dh = scratch.dh.matrix();
    gemm(dy, Op::none, expert_matrix(w.w2, e, G, d), Op::transpose, dh, GemmEpilogue<T>{}, &scratch.gemm);
    gemm(h, Op::transpose, dy, Op::none, MatrixView<T>(g.w2 + e * G * d, G, d), GemmEpilogue<T>{.accumulate = true},
         &scratch.gemm);
    if (g.b2) add_column_sums(dy, g.b2 + e * d);
    MatrixView<T> dpre = dh;  // ReLU: masked in place
    if constexpr (relu) {
      for (index_t i = 0; i < n; ++i) Act::backward(h.row(i), dh.row(i), dpre.row(i), G);
    } else {
      scratch.dpre.resize({n, H});
      dpre = scratch.dpre.matrix();
      const ConstMatrixView<T> pre = std::as_const(cache.pre).matrix().rows_range(begin, end);
      for (index_t i = 0; i < n; ++i) Act::backward(pre.row(i), dh.row(i), dpre.row(i), G);
    }
    const ConstMatrixView<T> xs = gather_slots(x, dispatch, begin, end, scratch.xs);
    gemm(xs, Op::transpose, ConstMatrixView<T>(dpre), Op::none, MatrixView<T>(g.w1 + e * d * H, d, H),
         GemmEpilogue<T>{.accumulate = true}, &scratch.gemm);
    if (g.b1) add_column_sums(ConstMatrixView<T>(dpre), g.b1 + e * H);
    gemm(ConstMatrixView<T>(dpre), Op::none, expert_matrix(w.w1, e, d, H), Op::transpose,
         cache.dxs.matrix().rows_range(begin, end), GemmEpilogue<T>{}, &scratch.gemm);
  });
  const index_t K = dispatch.k;
  parallel_for_blocks(x.rows, 32, [&](index_t first, index_t last) {
    for (index_t t = first; t < last; ++t) {
      T* out = dx.row(t);
      std::fill_n(out, d, T(0));
      for (index_t j = 0; j < K; ++j)
        if (const index_t s = dispatch.slot(t, j); s >= 0) {
          const T* in = cache.dxs.data() + s * d;
          for (index_t c = 0; c < d; ++c) out[c] += in[c];
        }
    }
  });
}

}  // namespace smoe::cpu_kernels
