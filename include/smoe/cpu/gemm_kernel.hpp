#pragma once
// cpu_kernels::gemm: the single-threaded GEMM every CPU component runs inside its own parallel
// work items (one expert, one token block):
//
//   C = epilogue(op(A) · op(B)),   epilogue: (+ C if accumulate) (+ bias row) (relu),
//
// with A, B, C views over the caller's memory and op = as stored or transposed. Two engines:
//   avx512  register-tiled micro-kernels that read A and B in place (cpu/gemm_avx512.hpp); a
//           transposed B is first transposed into the caller's scratch (O(k·n), 16 × 16 blocks);
//   eigen   Eigen's GEMM over maps of the same views (any ISA, any scalar type).
// `automatic` picks avx512 for float and double when the CPU has it. Both engines sum in an order
// fixed by the shapes, so results never depend on the thread count; they round differently from
// each other, as any two GEMMs do.
#include <algorithm>
#include <type_traits>

#include "smoe/core/tensor.hpp"
#include "smoe/core/view.hpp"
#include "smoe/cpu/eigen.hpp"
#include "smoe/cpu/gemm_avx512.hpp"

namespace smoe::cpu_kernels {

enum class Op { none, transpose };
enum class GemmEngine { automatic, eigen, avx512 };

template <class T>
struct GemmEpilogue {
  bool accumulate = false;  // C += product instead of C = product
  const T* bias = nullptr;  // [n] added to every row
  bool relu = false;        // max(·, 0) last
};

// Whether `engine` can run for T on this machine.
template <class T>
bool gemm_engine_available(GemmEngine engine) {
  if (engine != GemmEngine::avx512) return true;
#if defined(SMOE_HAVE_AVX512_GEMM)
  return (std::is_same_v<T, float> || std::is_same_v<T, double>) && avx512::cpu_supports_avx512();
#else
  return false;
#endif
}

// out [b.cols, b.rows] = bᵀ (a copy, no arithmetic): AVX-512 register transposes where available.
template <class T>
void transpose(std::type_identity_t<ConstMatrixView<T>> b, Tensor<T>& out) {
  out.resize({b.cols, b.rows});
  if (b.rows == 0 || b.cols == 0) return;
#if defined(SMOE_HAVE_AVX512_GEMM)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    if (avx512::cpu_supports_avx512()) {
      avx512::transpose(b.rows, b.cols, b.data, b.stride, out.data(), b.rows);
      return;
    }
  }
#endif
  eigen(out.matrix()) = eigen(b).transpose();
}

// A given by one pointer per row: X [count, cols] with row r at rows[r]. With Op::none A = X
// ([m, k] = [count, cols]); with Op::transpose A = Xᵀ ([m, k] = [cols, count]). An operand made of
// scattered rows (an expert's tokens) is read where it lies instead of being gathered first.
template <class T>
struct RowPointers {
  const T* const* rows = nullptr;
  index_t count = 0;
  index_t cols = 0;
};

namespace gemm_detail {
inline GemmEngine resolve(GemmEngine engine, bool avx512) {
  if (engine == GemmEngine::automatic) return avx512 ? GemmEngine::avx512 : GemmEngine::eigen;
  if (engine == GemmEngine::avx512 && !avx512)
    fail("gemm: the avx512 engine is not available for this CPU, scalar type or build");
  return engine;
}

inline void check_shapes(index_t am, index_t ak, index_t bk, index_t bn, index_t m, index_t n) {
  if (am != m || bk != ak || bn != n)
    fail("gemm: shapes do not match: op(a) [", am, ", ", ak, "], op(b) [", bk, ", ", bn, "], c [", m, ", ", n, "]");
}

// c = epilogue(lhs · op_b(b)) through Eigen, lhs an Eigen expression for op_a(a).
template <class T, class Lhs>
void eigen_gemm(const Lhs& lhs, ConstMatrixView<T> b, Op op_b, MatrixView<T> c, GemmEpilogue<T> ep) {
  auto out = eigen(c);
  auto run = [&](const auto& rhs) {
    if (ep.accumulate)
      out.noalias() += lhs * rhs;
    else
      out.noalias() = lhs * rhs;
  };
  if (op_b == Op::none)
    run(eigen(b));
  else
    run(eigen(b).transpose());
  if (ep.bias) out.rowwise() += Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(ep.bias, c.cols);
  // x > 0 ? x : 0, like the Relu activation and the avx512 kernel: NaN becomes 0 on every CPU
  // (cwiseMax leaves NaN unspecified, so CPUs without AVX-512 gave NaN; SMOE_CPU_GENERIC=1 found it).
  if (ep.relu) out = (out.array() > T(0)).select(out, T(0));
}

#if defined(SMOE_HAVE_AVX512_GEMM)
// Runs the avx512 kernel on A (any layout); a transposed B is transposed into `scratch` first.
template <class T, avx512::ALayout Layout>
void avx512_gemm(avx512::AOperand<T, Layout> a, index_t k, ConstMatrixView<T> b, Op op_b, MatrixView<T> c,
                 GemmEpilogue<T> ep, Tensor<T>* scratch) {
  const index_t m = c.rows, n = c.cols;
  const T* bp = b.data;
  index_t ldb = b.stride;
  Tensor<T> local;
  if (op_b == Op::transpose) {
    Tensor<T>& bt = scratch ? *scratch : local;
    bt.resize({k, n});
    avx512::transpose(n, k, b.data, b.stride, bt.data(), n);
    bp = bt.data();
    ldb = n;
  }
  avx512::gemm<T, Layout>(m, n, k, a, bp, ldb, c.data, c.stride, ep.accumulate, ep.bias, ep.relu);
}

template <class T>
void avx512_gemm(ConstMatrixView<T> a, Op op_a, index_t k, ConstMatrixView<T> b, Op op_b, MatrixView<T> c,
                 GemmEpilogue<T> ep, Tensor<T>* scratch) {
  using avx512::ALayout, avx512::AOperand;
  if (op_a == Op::none)
    avx512_gemm(AOperand<T, ALayout::strided>{a.data, a.stride}, k, b, op_b, c, ep, scratch);
  else
    avx512_gemm(AOperand<T, ALayout::strided_t>{a.data, a.stride}, k, b, op_b, c, ep, scratch);
}
template <class T>
void avx512_gemm(RowPointers<T> a, Op op_a, index_t k, ConstMatrixView<T> b, Op op_b, MatrixView<T> c,
                 GemmEpilogue<T> ep, Tensor<T>* scratch) {
  using avx512::ALayout, avx512::AOperand;
  if (op_a == Op::none)
    avx512_gemm(AOperand<T, ALayout::rows>{nullptr, 0, a.rows, 0}, k, b, op_b, c, ep, scratch);
  else
    avx512_gemm(AOperand<T, ALayout::rows_t>{nullptr, 0, a.rows, 0}, k, b, op_b, c, ep, scratch);
}
#endif

template <class T>
void eigen_gemm(ConstMatrixView<T> a, Op op_a, ConstMatrixView<T> b, Op op_b, MatrixView<T> c, GemmEpilogue<T> ep) {
  if (op_a == Op::none)
    eigen_gemm(eigen(a), b, op_b, c, ep);
  else
    eigen_gemm(eigen(a).transpose(), b, op_b, c, ep);
}
// Eigen has no row-pointer operand: the rows are gathered into a temporary.
template <class T>
void eigen_gemm(RowPointers<T> a, Op op_a, ConstMatrixView<T> b, Op op_b, MatrixView<T> c, GemmEpilogue<T> ep) {
  Tensor<T> x({a.count, a.cols});
  for (index_t r = 0; r < a.count; ++r) std::copy_n(a.rows[r], a.cols, x.data() + r * a.cols);
  eigen_gemm(std::as_const(x).matrix(), op_a, b, op_b, c, ep);
}

template <class T>
index_t stored_rows(ConstMatrixView<T> a) {
  return a.rows;
}
template <class T>
index_t stored_rows(RowPointers<T> a) {
  return a.count;
}

// The body of both gemm overloads: A is a ConstMatrixView or RowPointers (X [stored_rows, cols]).
template <class T, class A>
void run(A a, Op op_a, ConstMatrixView<T> b, Op op_b, MatrixView<T> c, GemmEpilogue<T> ep, [[maybe_unused]] Tensor<T>* scratch,
         GemmEngine engine) {
  const index_t rows = stored_rows(a), m = c.rows, n = c.cols, k = op_a == Op::none ? a.cols : rows;
  check_shapes(op_a == Op::none ? rows : a.cols, k, op_b == Op::none ? b.rows : b.cols,
               op_b == Op::none ? b.cols : b.rows, m, n);
  if (m == 0 || n == 0) return;
  engine = resolve(engine, gemm_engine_available<T>(GemmEngine::avx512));
#if defined(SMOE_HAVE_AVX512_GEMM)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>)
    if (engine == GemmEngine::avx512) return avx512_gemm(a, op_a, k, b, op_b, c, ep, scratch);
#endif
  eigen_gemm(a, op_a, b, op_b, c, ep);
}
}  // namespace gemm_detail

// c [m, n] = epilogue(op_a(a) · op_b(b)); a is [m, k] (or [k, m] transposed), b [k, n] (or [n, k]).
// `scratch` holds op_b(b) when the avx512 engine needs B transposed (reused across calls to avoid
// allocating; a temporary when null).
template <class T>
void gemm(ConstMatrixView<T> a, Op op_a, ConstMatrixView<T> b, Op op_b, MatrixView<T> c, GemmEpilogue<T> ep = {},
          Tensor<T>* scratch = nullptr, GemmEngine engine = GemmEngine::automatic) {
  gemm_detail::run(a, op_a, b, op_b, c, ep, scratch, engine);
}

// The same with A given by row pointers (read in place by the avx512 engine; the eigen engine
// gathers them into a temporary).
template <class T>
void gemm(RowPointers<T> a, Op op_a, ConstMatrixView<T> b, Op op_b, MatrixView<T> c, GemmEpilogue<T> ep = {},
          Tensor<T>* scratch = nullptr, GemmEngine engine = GemmEngine::automatic) {
  gemm_detail::run(a, op_a, b, op_b, c, ep, scratch, engine);
}

}  // namespace smoe::cpu_kernels
