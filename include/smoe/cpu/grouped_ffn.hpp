#pragma once
// The CPU grouped GEMM of two-layer experts over a Dispatch, forward and backward, for any weights
// the caller points it at (an expert pool's own parameters, weights materialized from a shared
// pool, one set tied across layers):
//
//   expert e, slots s ∈ [offsets[e], offsets[e+1]):
//     pre_s = x[token(s)]·W1[e] + b1[e]    [fan·G]      h_s = act(pre_s)    [G]
//     ys[s] = h_s·W2[e] + b2[e]            [d]
//
// Experts run in parallel (dynamic schedule); each runs single-threaded GEMMs (cpu/gemm_kernel.hpp:
// the ReLU and the biases fused into the GEMM's store) that read the expert's token rows of x in
// place through row pointers, in forward and again in backward: no [A, d] copy of the inputs.
// Per-token sums (dx) run per token over the token's slots in k order, so every result is
// independent of the thread count.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "smoe/core/dispatch.hpp"
#include "smoe/core/tensor.hpp"
#include "smoe/cpu/dot.hpp"
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
  Tensor<T> dxs;          // backward: per-slot input gradients [A, d]
  Tensor<T> slot_d_gate;  // weighted backward: per-slot gate gradients [A]
  index_t assignments = -1;
  struct Scratch {
    // (weighted backward) the gathered, gate-scaled output gradients, hidden and pre-activation
    // gradients, GEMM scratch
    Tensor<T> dys, dh, dpre, gemm;
    std::vector<const T*> rows;  // the expert's token rows of x (or dy), read in place
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

// The rows of x of slots [begin, end), as row pointers into x (read in place by the GEMM).
template <class T>
RowPointers<T> slot_rows(ConstMatrixView<T> x, const Dispatch<T>& dispatch, index_t begin, index_t end,
                         std::vector<const T*>& pointers) {
  pointers.resize(static_cast<std::size_t>(end - begin));
  for (index_t s = begin; s < end; ++s) pointers[s - begin] = x.row(dispatch.slot_token[static_cast<std::size_t>(s)]);
  return {pointers.data(), end - begin, x.cols};
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
    const RowPointers<T> xs = slot_rows(x, dispatch, begin, end, scratch.rows);
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

namespace ffn_backward {
// Where backward takes each expert's output gradients from: per-slot dys [A, d] (the combiner
// applied the gates), or the layer's dy [T, d] with WeightedSum's backward fused in.
template <class T>
struct Upstream {
  ConstMatrixView<T> grads;  // dys [A, d], or dy [T, d] when weighted
  bool weighted = false;
  MatrixView<T> d_gates;     // [T, K], written when weighted
};

template <class T, Activation Act>
void run(ConstMatrixView<T> x, const Dispatch<T>& dispatch, ExpertWeights<T> w, ExpertGradients<T> g,
         GroupedFFNShape shape, Upstream<T> up, MatrixView<T> dx, GroupedFFNCache<T>& cache) {
  constexpr bool relu = std::is_same_v<Act, Relu>;
  const index_t A = dispatch.assignments(), d = shape.d_model, G = shape.hidden, H = Act::fan * G;
  if (cache.assignments != A) fail("grouped_ffn_backward: needs the forward of the same dispatch first");
  cache.dxs.resize({A, d});
  if (up.weighted) cache.slot_d_gate.resize({A});
  cache.scratch.resize(static_cast<std::size_t>(max_threads()));
  parallel_for_indexed(dispatch.experts, [&](index_t e, int thread) {
    const index_t begin = dispatch.expert_begin(e), end = dispatch.expert_end(e), n = end - begin;
    if (n == 0) return;
    auto& scratch = cache.scratch[static_cast<std::size_t>(thread)];
    const ConstMatrixView<T> h = std::as_const(cache.h).matrix().rows_range(begin, end);
    scratch.dh.resize({n, G});
    const MatrixView<T> dh = scratch.dh.matrix();
    const ConstMatrixView<T> w2 = expert_matrix(w.w2, e, G, d);
    ConstMatrixView<T> dys = up.grads;
    if (up.weighted) {
      // u = dy[t]·W2ᵀ gives both the gate gradient <dy[t], ys[s]> = <u, h_s> + <dy[t], b2> and,
      // scaled by the gate, dh; dys = gate · dy[t] is the gathered dy scaled in place.
      gemm(slot_rows(up.grads, dispatch, begin, end, scratch.rows), Op::none, w2, Op::transpose, dh, GemmEpilogue<T>{},
           &scratch.gemm);
      gather_slots(up.grads, dispatch, begin, end, scratch.dys);
      for (index_t i = 0; i < n; ++i) {
        T* dy_row = scratch.dys.data() + i * d;
        T* u = dh.row(i);
        cache.slot_d_gate[begin + i] =
            dot(static_cast<const T*>(u), h.row(i), G) + (w.b2 ? dot(static_cast<const T*>(dy_row), w.b2 + e * d, d) : T(0));
        const T gate = dispatch.slot_gate[static_cast<std::size_t>(begin + i)];
        for (index_t c = 0; c < d; ++c) dy_row[c] *= gate;
        for (index_t c = 0; c < G; ++c) u[c] *= gate;
      }
      dys = std::as_const(scratch.dys).matrix();
    } else {
      dys = up.grads.rows_range(begin, end);
      gemm(dys, Op::none, w2, Op::transpose, dh, GemmEpilogue<T>{}, &scratch.gemm);
    }
    gemm(h, Op::transpose, dys, Op::none, MatrixView<T>(g.w2 + e * G * d, G, d), GemmEpilogue<T>{.accumulate = true},
         &scratch.gemm);
    if (g.b2) add_column_sums(dys, g.b2 + e * d);
    MatrixView<T> dpre = dh;  // ReLU: masked in place
    if constexpr (relu) {
      for (index_t i = 0; i < n; ++i) Act::backward(h.row(i), dh.row(i), dpre.row(i), G);
    } else {
      scratch.dpre.resize({n, H});
      dpre = scratch.dpre.matrix();
      const ConstMatrixView<T> pre = std::as_const(cache.pre).matrix().rows_range(begin, end);
      for (index_t i = 0; i < n; ++i) Act::backward(pre.row(i), dh.row(i), dpre.row(i), G);
    }
    gemm(slot_rows(x, dispatch, begin, end, scratch.rows), Op::transpose, ConstMatrixView<T>(dpre), Op::none, MatrixView<T>(g.w1 + e * d * H, d, H),
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
      for (index_t j = 0; j < K; ++j) {
        const index_t s = dispatch.slot(t, j);
        if (up.weighted) up.d_gates(t, j) = s >= 0 ? cache.slot_d_gate[s] : T(0);
        if (s < 0) continue;
        const T* in = cache.dxs.data() + s * d;
        for (index_t c = 0; c < d; ++c) out[c] += in[c];
      }
    }
  });
}
}  // namespace ffn_backward

// Accumulates the weight gradients into g and WRITES dx [T, d] (0 for tokens without a slot),
// from the per-slot output gradients dys [A, d]. x and dispatch must be those of the forward that
// filled cache.
template <class T, Activation Act>
void grouped_ffn_backward(ConstMatrixView<T> x, const Dispatch<T>& dispatch, ExpertWeights<T> w, ExpertGradients<T> g,
                          GroupedFFNShape shape, ConstMatrixView<T> dys, MatrixView<T> dx,
                          GroupedFFNCache<T>& cache) {
  ffn_backward::run<T, Act>(x, dispatch, w, g, shape, {dys, false, {}}, dx, cache);
}

// The backward of y[t] = Σ_k gate · ys[slot(t, k)] and the experts in one pass, from dy [T, d]:
// WRITES d_gates [T, K] (0 for empty slots) and dx, accumulates the weight gradients. Neither the
// per-slot outputs nor their gradients ([A, d] each) are read or written.
template <class T, Activation Act>
void grouped_ffn_backward_weighted(ConstMatrixView<T> x, const Dispatch<T>& dispatch, ExpertWeights<T> w,
                                   ExpertGradients<T> g, GroupedFFNShape shape, ConstMatrixView<T> dy,
                                   MatrixView<T> d_gates, MatrixView<T> dx, GroupedFFNCache<T>& cache) {
  ffn_backward::run<T, Act>(x, dispatch, w, g, shape, {dy, true, d_gates}, dx, cache);
}

}  // namespace smoe::cpu_kernels
