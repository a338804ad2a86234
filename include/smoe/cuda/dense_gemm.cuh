#pragma once
// A dense GEMM on the device, row-major: C [M, N] (+)= op(A)·op(B), op(A) [M, K], op(B) [K, N].
//   A stored [M, K] (lda), or [K, M] when trans_a;  B stored [K, N] (ldb), or [N, K] when trans_b.
// On a GPU it is cuBLAS (cublasGemmEx: bf16/fp16/fp32 inputs with fp32 accumulation, fp64 for
// double; tensor cores for the 16-bit types); the host-emulated build and GemmPath::portable run
// the portable twins of cuda/grouped_gemm.cuh (RowGemm for op(A) = A, GroupedOuterSum for Aᵀ·B),
// which the `[gpu]` test compares cuBLAS with. cuBLAS is deterministic run to run on one GPU model
// (one stream, the default workspace). The smoe::cuda CMake target links cuBLAS.
//
// One cuBLAS handle per host thread, created on first use, set to the call's stream each call.
#include <string>
#include <type_traits>

#include "smoe/cuda/grouped_gemm.cuh"
#include "smoe/cuda/tensor_core_gemm.cuh"

#if !defined(SMOE_CUDA_EMULATION)
#include <cublas_v2.h>
#endif

namespace smoe::cuda_kernels {

#if !defined(SMOE_CUDA_EMULATION)
inline void check_cublas(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw cuda_error(std::string("smoe cuda: ") + what + ": cuBLAS status " + std::to_string(int(status)));
}

// The calling thread's cuBLAS handle (destroyed with the thread).
inline cublasHandle_t cublas_handle() {
  struct Handle {
    cublasHandle_t h = nullptr;
    Handle() { check_cublas(cublasCreate(&h), "cublasCreate"); }
    ~Handle() { cublasDestroy(h); }
  };
  thread_local Handle handle;
  return handle.h;
}

template <class T>
constexpr cudaDataType_t cuda_data_type() {
  if constexpr (std::is_same_v<T, bf16>)
    return CUDA_R_16BF;
  else if constexpr (std::is_same_v<T, fp16>)
    return CUDA_R_16F;
  else if constexpr (std::is_same_v<T, double>)
    return CUDA_R_64F;
  else
    return CUDA_R_32F;
}
#endif

template <class T, class TC>
void dense_gemm(cuda_stream stream, index_t M, index_t N, index_t K, const T* a, index_t lda, bool trans_a, const T* b,
                index_t ldb, bool trans_b, TC* c, index_t ldc, bool accumulate, GemmPath path = GemmPath::fastest) {
  static_assert(std::is_same_v<TC, T> || std::is_same_v<TC, acc_t<T>>, "dense_gemm: C is T or T's accumulator type");
  if (M <= 0 || N <= 0) return;
#if !defined(SMOE_CUDA_EMULATION)
  if (path == GemmPath::fastest) {
    using Scalar = acc_t<T>;
    const Scalar alpha = 1, beta = accumulate ? 1 : 0;
    cublasHandle_t h = cublas_handle();
    check_cublas(cublasSetStream(h, stream), "cublasSetStream");
    // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: B first.
    check_cublas(cublasGemmEx(h, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, int(N), int(M),
                              int(K), &alpha, b, cuda_data_type<T>(), int(ldb), a, cuda_data_type<T>(), int(lda), &beta, c,
                              cuda_data_type<TC>(), int(ldc),
                              std::is_same_v<T, double> ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 "cublasGemmEx");
    return;
  }
#else
  (void)path;
#endif
  if (!trans_a) {
    // B(k, n) = B[k·ldb + n], or B[n·ldb + k] when transposed.
    const Strided<T> bs{b, 0, trans_b ? 1 : ldb, trans_b ? ldb : 1};
    for_each_index(stream, M * N,
                   RowGemm<T, T, TC>{a, lda, nullptr, bs, nullptr, nullptr, 0, nullptr, c, ldc, K, N, accumulate});
    return;
  }
  if (trans_b || ldc != N) fail("dense_gemm: the portable Aᵀ·B needs B untransposed and C dense (ldc = N)");
  if (!accumulate) fill(c, M * N, from_acc<TC>(0), stream);
  // C[i, j] += Σ_r A[r, i]·B[r, j] over the K stored rows of A and B.
  for_each_index(stream, M * N, GroupedOuterSum<T, T, TC>{a, lda, nullptr, b, ldb, nullptr, K, c, M, N});
}

}  // namespace smoe::cuda_kernels
