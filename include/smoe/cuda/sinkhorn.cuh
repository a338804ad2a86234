#pragma once
// Log-domain Sinkhorn balancing (routing/sinkhorn.hpp) on the device, for G = fp32 or fp64 as the
// CPU runs it for its T. The CPU runs a fixed number of iterations (no tolerance, no data-dependent
// stop), so the device does the same with no host synchronisation: per iteration one functor per
// token (row potentials b), one per (128-token block, expert) (column partials, the CPU's blocks),
// one per expert (partials merged in block order, column potentials a). The running log-sum-exp is
// the CPU's own __host__ __device__ detail::LseAccumulator, so every value follows the CPU's
// operations in the CPU's order.
#include "smoe/cuda/device_tensor.cuh"
#include "smoe/routing/sinkhorn.hpp"

namespace smoe {

namespace cuda_kernels {

// b_t = −LSE_e(z_te + a_e), 0 when the row cannot be balanced.
template <class G>
struct SinkhornRows {
  const G* z;
  index_t z_stride;
  const G* a;
  G* b;
  index_t E;
  SMOE_HOST_DEVICE void operator()(index_t t) const {
    const G* zt = z + t * z_stride;
    detail::LseAccumulator<G> acc;
    for (index_t e = 0; e < E; ++e) acc.take_max(zt[e] + a[e]);
    for (index_t e = 0; e < E; ++e) acc.take_sum(zt[e] + a[e]);
    const G lse = acc.value();
    b[t] = lse != lse ? G(0) : -lse;
  }
};

// The LSE partial of column e over the tokens of block blk: max pass, then sum pass, as the CPU.
template <class G>
struct SinkhornColumnPartials {
  const G* z;
  index_t z_stride;
  const G* b;
  G *partial_max, *partial_sum;  // [blocks, E]
  index_t tokens, E, block, blocks;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    const index_t blk = i / E, e = i % E;
    const index_t first = blk * block, last = blk + 1 == blocks ? tokens : first + block;
    detail::LseAccumulator<G> acc;
    for (index_t t = first; t < last; ++t) acc.take_max(z[t * z_stride + e] + b[t]);
    for (index_t t = first; t < last; ++t) acc.take_sum(z[t * z_stride + e] + b[t]);
    partial_max[i] = acc.max;
    partial_sum[i] = acc.sum;
  }
};

// a_e = log c − LSE_t(z_te + b_t) from the partials merged in block order; 0 when not finite.
template <class G>
struct SinkhornColumns {
  const G *partial_max, *partial_sum;
  G *a, *column_lse;
  index_t E, blocks;
  G log_c;
  SMOE_HOST_DEVICE void operator()(index_t e) const {
    detail::LseAccumulator<G> acc;
    acc.max = partial_max[e];
    acc.sum = partial_sum[e];
    for (index_t blk = 1; blk < blocks; ++blk) {
      detail::LseAccumulator<G> next;
      next.max = partial_max[blk * E + e];
      next.sum = partial_sum[blk * E + e];
      acc.merge(next);
    }
    const G lse = acc.value();
    column_lse[e] = lse;
    a[e] = lse != lse ? G(0) : log_c - lse;
  }
};

template <class G>
struct SinkhornOutput {
  const G* z;
  index_t z_stride;
  const G *b, *column_lse;
  G* log_p;
  index_t log_p_stride, E;
  G log_c;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    const index_t t = i / E, e = i % E;
    const G v = z[t * z_stride + e] + b[t], lse = column_lse[e];
    log_p[t * log_p_stride + e] = lse != lse ? v : v - lse + log_c;
  }
};

template <class G>
struct CopyMatrix {
  const G* src;
  index_t src_stride;
  G* dst;
  index_t dst_stride, cols;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    dst[(i / cols) * dst_stride + i % cols] = src[(i / cols) * src_stride + i % cols];
  }
};

}  // namespace cuda_kernels

// Device scratch of sinkhorn_balance, kept by its caller so steady-state calls do not allocate.
template <class G>
struct SinkhornWorkspace {
  Tensor<G, cuda> a, b, column_lse, partial_max, partial_sum;
  void set_stream(cuda_stream s) {
    for (auto* t : {&a, &b, &column_lse, &partial_max, &partial_sum}) t->set_stream(s);
  }
};

// log P [T, E] of the balanced plan for scores z [T, E] after `iters` iterations, on `stream`
// (routing/sinkhorn.hpp's sinkhorn_balance). log_p must not overlap z.
template <class G>
void sinkhorn_balance(cuda_stream stream, ConstMatrixView<G, cuda> z, index_t iters, MatrixView<G, cuda> log_p,
                      SinkhornWorkspace<G>& work) {
  using namespace cuda_kernels;
  constexpr const char* name = "sinkhorn_balance<cuda>";
  if (iters < 0) fail(name, ": iters must be >= 0, got ", iters);
  expect_shape(name, "log_p", log_p, z.rows, z.cols);
  const index_t tokens = z.rows, E = z.cols;
  if (tokens == 0 || E == 0) return;
  if (iters == 0) {
    for_each_index(stream, tokens * E, CopyMatrix<G>{z.data, z.stride, log_p.data, log_p.stride, E});
    return;
  }
  constexpr index_t block = 128;  // the CPU's blocks
  const index_t blocks = std::max<index_t>(1, tokens / block);
  using std::log;
  const G log_c = log(G(tokens)) - log(G(E));
  work.a.resize({E});
  work.b.resize({tokens});
  work.column_lse.resize({E});
  work.partial_max.resize({blocks, E});
  work.partial_sum.resize({blocks, E});
  work.a.zero();
  for (index_t it = 0; it < iters; ++it) {
    for_each_index(stream, tokens, SinkhornRows<G>{z.data, z.stride, work.a.data(), work.b.data(), E});
    for_each_index(stream, blocks * E,
                   SinkhornColumnPartials<G>{z.data, z.stride, work.b.data(), work.partial_max.data(),
                                             work.partial_sum.data(), tokens, E, block, blocks});
    for_each_index(stream, E,
                   SinkhornColumns<G>{work.partial_max.data(), work.partial_sum.data(), work.a.data(),
                                      work.column_lse.data(), E, blocks, log_c});
  }
  for_each_index(stream, tokens * E,
                 SinkhornOutput<G>{z.data, z.stride, work.b.data(), work.column_lse.data(), log_p.data, log_p.stride, E,
                                   log_c});
}

}  // namespace smoe
