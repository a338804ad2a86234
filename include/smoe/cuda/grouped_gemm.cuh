#pragma once
// The CUDA backend's GEMMs over a dispatch, as portable __host__ __device__ functors (one output
// element each, fp32 or fp64 accumulation in a fixed order, so results are deterministic and
// equal between the GPU and the host-emulated build up to the rounding of the math library).
// They are the reference path and the twin that a tensor-core kernel is checked against.
//
//   RowGemm:            C[r, n] (+)= Σ_k A[row(r), k] · B_{g(r)}[k, n] (+ bias_{g(r)}[n])
//                       rows gathered from A (tokens of slots), B chosen per row (its expert),
//                       B read through strides (so Wᵀ needs no copy); rows r >= *row_count skipped.
//   GroupedOuterSum:    D_g[i, j] += Σ_{r in group g} A[row(r), i] · G[r, j]
//                       (expert weight gradients: a reduction per expert over its slots, in slot
//                       order, no atomics); A = null means A ≡ 1 (bias gradients).
#include <cstdint>

#include "smoe/cuda/execution.cuh"
#include "smoe/cuda/numeric.cuh"

namespace smoe::cuda_kernels {

// A matrix operand read through explicit strides: element (i, j) of group g is
// data[g·group_stride + i·row_stride + j·col_stride].
template <class T>
struct Strided {
  const T* data = nullptr;
  index_t group_stride = 0, row_stride = 0, col_stride = 1;
  SMOE_HOST_DEVICE const T& operator()(index_t g, index_t i, index_t j) const {
    return data[g * group_stride + i * row_stride + j * col_stride];
  }
};

template <class TA, class TB, class TC>
struct RowGemm {
  const TA* a;
  index_t lda;
  const std::int32_t* a_row;      // row of A for output row r (null: r)
  Strided<TB> b;                  // B_g [K, N]
  const std::int32_t* group;      // group of output row r (null: 0)
  const TB* bias;                 // bias_g [N] at bias + g·bias_stride (null: none)
  index_t bias_stride;
  const std::int32_t* row_count;  // device count of valid output rows (null: all)
  TC* c;
  index_t ldc, K, N;
  bool accumulate;

  SMOE_HOST_DEVICE void operator()(index_t idx) const {
    const index_t r = idx / N, n = idx % N;
    if (row_count != nullptr && r >= *row_count) return;
    const index_t row = a_row ? a_row[r] : r;
    const index_t g = group ? group[r] : 0;
    using Acc = acc_t<TC>;
    Acc sum = 0;
    const TA* a_r = a + row * lda;
    for (index_t k = 0; k < K; ++k) sum += Acc(to_acc(a_r[k])) * Acc(to_acc(b(g, k, n)));
    if (bias) sum += Acc(to_acc(bias[g * bias_stride + n]));
    TC& out = c[r * ldc + n];
    out = from_acc<TC>(accumulate ? Acc(to_acc(out)) + sum : sum);
  }
};

template <class TA, class TG, class TD>
struct GroupedOuterSum {
  const TA* a;                  // null: A ≡ 1
  index_t lda;
  const std::int32_t* a_row;    // row of A for slot r (null: r)
  const TG* g;
  index_t ldg;
  const std::int32_t* offsets;  // group g owns rows [offsets[g], offsets[g+1]) (null: one group of `rows`)
  index_t rows;
  TD* d;                        // D_g [I, J] at d + g·I·J
  index_t I, J;

  SMOE_HOST_DEVICE void operator()(index_t idx) const {
    const index_t grp = idx / (I * J), i = (idx / J) % I, j = idx % J;
    const index_t begin = offsets ? offsets[grp] : 0, end = offsets ? offsets[grp + 1] : rows;
    using Acc = acc_t<TD>;
    Acc sum = 0;
    for (index_t r = begin; r < end; ++r) {
      const Acc av = a ? Acc(to_acc(a[(a_row ? a_row[r] : r) * lda + i])) : Acc(1);
      sum += av * Acc(to_acc(g[r * ldg + j]));
    }
    TD& out = d[idx];
    out = from_acc<TD>(Acc(to_acc(out)) + sum);
  }
};

}  // namespace smoe::cuda_kernels
