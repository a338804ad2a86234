#pragma once
// The linear routers' projection s = x·Wᵀ on the device (routing/linear_scores.hpp's CUDA twin):
// x [T, d] of the activation type, W [E, d] and s [T, E] in the gate type (fp32, fp64 for double).
//   forward:   s = x·Wᵀ
//   backward:  W.grad += dsᵀ·x (per-element reductions over tokens in order), dx += ds·W
// x is read before dx is written, so dx may alias x.
#include "smoe/cuda/grouped_gemm.cuh"

namespace smoe::cuda_kernels {

template <class T, class G>
void linear_scores_forward(cuda_stream stream, ConstMatrixView<T, cuda> x, const G* weight, index_t E, G* scores) {
  const index_t d = x.cols;
  for_each_index(stream, x.rows * E,
                 RowGemm<T, G, G>{x.data, x.stride, nullptr, Strided<G>{weight, 0, 1, d}, nullptr, nullptr, 0, nullptr,
                                  scores, E, d, E, false});
}

// W.grad += dsᵀ·x: one element per thread, a reduction over tokens in order.
template <class T, class G>
void linear_scores_weight_grad(cuda_stream stream, ConstMatrixView<T, cuda> x, ConstMatrixView<G, cuda> ds,
                               G* weight_grad) {
  const index_t tokens = x.rows, d = x.cols, E = ds.cols;
  if (tokens == 0) return;
  for_each_index(stream, E * d,
                 GroupedOuterSum<G, T, G>{ds.data, ds.stride, nullptr, x.data, x.stride, nullptr, tokens, weight_grad, E, d});
}

// dx += ds·W.
template <class T, class G>
void linear_scores_input_grad(cuda_stream stream, ConstMatrixView<G, cuda> ds, const G* weight, MatrixView<T, cuda> dx) {
  const index_t tokens = dx.rows, d = dx.cols, E = ds.cols;
  for_each_index(stream, tokens * d,
                 RowGemm<G, G, T>{ds.data, ds.stride, nullptr, Strided<G>{weight, 0, d, 1}, nullptr, nullptr, 0, nullptr,
                                  dx.data, dx.stride, E, d, true});
}

template <class T, class G>
void linear_scores_backward(cuda_stream stream, ConstMatrixView<T, cuda> x, ConstMatrixView<G, cuda> ds, const G* weight,
                            G* weight_grad, MatrixView<T, cuda> dx) {
  if (x.rows == 0) return;
  linear_scores_weight_grad(stream, x, ds, weight_grad);
  linear_scores_input_grad(stream, ds, weight, dx);
}

}  // namespace smoe::cuda_kernels
