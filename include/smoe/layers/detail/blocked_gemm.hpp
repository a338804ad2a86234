#pragma once
// Deterministic blocked GEMMs for the dense transformer layers (row-major views), on the library's
// single-threaded GEMM kernel (cpu/gemm_kernel.hpp: AVX-512 micro-kernels where the CPU has them,
// Eigen otherwise).
//
// Every product is cut into tiles of the output that depend only on the shapes, and each tile is
// one cpu_kernels::gemm call over the whole summed dimension: results are bitwise identical for any
// thread count. Weight gradients (c += aᵀ·b) are split over the output, never over the summed dimension,
// so no cross-thread reduction is needed. A transposed B (c = a·bᵀ) is transposed once per call
// into the caller's scratch and shared read-only by the blocks (the kernel reads B row-major, and
// transposing per block would redo the O(k·n) copy for every block).
#include <algorithm>
#include <cassert>
#include <type_traits>

#include "smoe/core/tensor.hpp"
#include "smoe/core/view.hpp"
#include "smoe/cpu/eigen.hpp"
#include "smoe/cpu/gemm_kernel.hpp"
#include "smoe/cpu/parallel.hpp"

namespace smoe::detail {

// C is cut into tiles of up to tile_rows × tile_cols (edge tiles also take the remainder, as
// parallel_for_blocks does): a tile's A rows and B columns (≤ 2 MiB in float at k = 512) stay in
// L2 while its GEMM runs, which row blocks alone would not give for wide B such as W1 [d, d_ff].
inline constexpr index_t tile_rows = 256, tile_cols = 512;

// Calls f(r0, r1, c0, c1) for every tile of a [rows, cols] output, the tiles in parallel.
template <class F>
void for_each_tile(index_t rows, index_t cols, F&& f) {
  if (rows <= 0 || cols <= 0) return;
  const index_t row_tiles = std::max<index_t>(1, rows / tile_rows), col_tiles = std::max<index_t>(1, cols / tile_cols);
  cpu_kernels::parallel_for(row_tiles * col_tiles, [&](index_t t) {
    const index_t i = t / col_tiles, j = t % col_tiles;
    f(i * tile_rows, i + 1 == row_tiles ? rows : (i + 1) * tile_rows, j * tile_cols,
      j + 1 == col_tiles ? cols : (j + 1) * tile_cols);
  });
}

// Columns [begin, end) of m as a view of the same memory (U is T or const T).
template <class U>
MatrixView<U> column_range(MatrixView<U> m, index_t begin, index_t end) {
  assert(0 <= begin && begin <= end && end <= m.cols);
  return MatrixView<U>(m.data == nullptr ? nullptr : m.data + begin, m.rows, end - begin, m.stride);
}

// c = epilogue(a·b): a [n, k], b [k, m], c [n, m], by tiles of c.
template <class T>
void blocked_gemm_nn(std::type_identity_t<ConstMatrixView<T>> a, std::type_identity_t<ConstMatrixView<T>> b,
                     MatrixView<T> c, cpu_kernels::GemmEpilogue<T> ep = {}) {
  using namespace cpu_kernels;
  assert(a.rows == c.rows && a.cols == b.rows && b.cols == c.cols);
  for_each_tile(c.rows, c.cols, [&](index_t r0, index_t r1, index_t c0, index_t c1) {
    GemmEpilogue<T> tile_ep = ep;
    if (ep.bias) tile_ep.bias = ep.bias + c0;
    gemm(a.rows_range(r0, r1), Op::none, column_range(b, c0, c1), Op::none, column_range(c.rows_range(r0, r1), c0, c1),
         tile_ep);
  });
}

// c = epilogue(a·bᵀ): a [n, k], b [m, k], c [n, m]. bᵀ goes into `b_t` once, then blocks of rows.
template <class T>
void blocked_gemm_nt(std::type_identity_t<ConstMatrixView<T>> a, std::type_identity_t<ConstMatrixView<T>> b,
                     MatrixView<T> c, Tensor<T>& b_t, cpu_kernels::GemmEpilogue<T> ep = {}) {
  assert(a.rows == c.rows && a.cols == b.cols && b.rows == c.cols);
  if (c.rows == 0 || c.cols == 0) return;
  cpu_kernels::transpose<T>(b, b_t);
  blocked_gemm_nn<T>(a, std::as_const(b_t).matrix(), c, ep);
}

// c += aᵀ·b; a [n, k], b [n, m], c [k, m] (a weight gradient), by tiles of c, each summing over all
// n rows in one GEMM (A is read transposed in place).
template <class T>
void blocked_gemm_tn_add(std::type_identity_t<ConstMatrixView<T>> a, std::type_identity_t<ConstMatrixView<T>> b,
                         MatrixView<T> c) {
  using namespace cpu_kernels;
  assert(a.rows == b.rows && a.cols == c.rows && b.cols == c.cols);
  if (a.rows == 0) return;
  for_each_tile(c.rows, c.cols, [&](index_t r0, index_t r1, index_t c0, index_t c1) {
    gemm(column_range(a, r0, r1), Op::transpose, column_range(b, c0, c1), Op::none,
         column_range(c.rows_range(r0, r1), c0, c1), GemmEpilogue<T>{.accumulate = true});
  });
}

// out[c] += Σ_t m[t, c] (a bias gradient), t in order: the same for any thread count.
template <class T>
void add_column_sums(std::type_identity_t<ConstMatrixView<T>> m, T* out) {
  for (index_t t = 0; t < m.rows; ++t) {
    const T* row = m.row(t);
    for (index_t c = 0; c < m.cols; ++c) out[c] += row[c];
  }
}

}  // namespace smoe::detail
