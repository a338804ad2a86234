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

// c [m, n] = epilogue(op_a(a) · op_b(b)); a is [m, k] (or [k, m] transposed), b [k, n] (or [n, k]).
// `scratch` holds op_b(b) when the avx512 engine needs B transposed (reused across calls to avoid
// allocating; a temporary when null).
template <class T>
void gemm(ConstMatrixView<T> a, Op op_a, ConstMatrixView<T> b, Op op_b, MatrixView<T> c, GemmEpilogue<T> ep = {},
          Tensor<T>* scratch = nullptr, GemmEngine engine = GemmEngine::automatic) {
  const index_t m = c.rows, n = c.cols, k = op_a == Op::none ? a.cols : a.rows;
  if ((op_a == Op::none ? a.rows : a.cols) != m || (op_b == Op::none ? b.rows : b.cols) != k ||
      (op_b == Op::none ? b.cols : b.rows) != n)
    fail("gemm: shapes do not match: op(a) [", op_a == Op::none ? a.rows : a.cols, ", ", k, "], op(b) [",
         op_b == Op::none ? b.rows : b.cols, ", ", op_b == Op::none ? b.cols : b.rows, "], c [", m, ", ", n, "]");
  if (m == 0 || n == 0) return;
  if (engine == GemmEngine::automatic)
    engine = gemm_engine_available<T>(GemmEngine::avx512) ? GemmEngine::avx512 : GemmEngine::eigen;
#if defined(SMOE_HAVE_AVX512_GEMM)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    if (engine == GemmEngine::avx512) {
      if (!gemm_engine_available<T>(engine)) fail("gemm: the avx512 engine is not available on this CPU");
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
      if (op_a == Op::none)
        avx512::gemm<T, false>(m, n, k, a.data, a.stride, bp, ldb, c.data, c.stride, ep.accumulate, ep.bias, ep.relu);
      else
        avx512::gemm<T, true>(m, n, k, a.data, a.stride, bp, ldb, c.data, c.stride, ep.accumulate, ep.bias, ep.relu);
      return;
    }
  }
#endif
  if (engine != GemmEngine::eigen) fail("gemm: the avx512 engine is not available for this scalar type or build");
  auto out = eigen(c);
  auto multiply = [&](const auto& lhs) {
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
  };
  if (op_a == Op::none)
    multiply(eigen(a));
  else
    multiply(eigen(a).transpose());
  if (ep.bias) out.rowwise() += Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(ep.bias, n);
  if (ep.relu) out = out.cwiseMax(T(0));
}

}  // namespace smoe::cpu_kernels
