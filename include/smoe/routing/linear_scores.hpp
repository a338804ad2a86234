#pragma once
// LinearScores: the projection s = x·Wᵀ (W "weight" [E, d]) that the linear routers score tokens
// with, forward per token block and backward, on the CPU GEMM kernel (cpu/gemm_kernel.hpp).
//
// Forward: `prepare(W)` once per forward keeps Wᵀ [d, E], then every token block runs one
// single-threaded GEMM s_block = x_block·Wᵀ inside the router's own parallel token loop (where it
// also selects and gates the block while its scores are in cache).
// Backward: W.grad += dsᵀ·x by column blocks of W (each element sums over all tokens in order),
// then dx += ds·W by token blocks. x is read before dx is written, so dx may alias x.
// Results do not depend on the thread count.
#include "smoe/core/tensor.hpp"
#include "smoe/cpu/eigen.hpp"
#include "smoe/cpu/gemm_kernel.hpp"
#include "smoe/cpu/parallel.hpp"

namespace smoe {

template <class T>
class LinearScores {
 public:
  void prepare(ConstMatrixView<T> weight) { cpu_kernels::transpose<T>(weight, weight_t_); }

  // s_block [n, E] = x_block [n, d] · Wᵀ, with the W of the last prepare().
  void forward_block(ConstMatrixView<T> x_block, MatrixView<T> s_block) const {
    cpu_kernels::gemm(x_block, cpu_kernels::Op::none, std::as_const(weight_t_).matrix(), cpu_kernels::Op::none,
                      s_block);
  }

  // Gradients of s = x·Wᵀ for ds [T, E]: weight_grad [E, d] += dsᵀ·x, then dx [T, d] += ds·W.
  static void backward(ConstMatrixView<T> x, ConstMatrixView<T> ds, ConstMatrixView<T> weight,
                       MatrixView<T> weight_grad, MatrixView<T> dx) {
    accumulate_weight_grad(x, ds, weight_grad);
    accumulate_input_grad(ds, weight, dx);
  }
  // weight_grad [E, d] += dsᵀ·x, by column blocks of the weight.
  static void accumulate_weight_grad(ConstMatrixView<T> x, ConstMatrixView<T> ds, MatrixView<T> weight_grad) {
    using namespace cpu_kernels;
    const index_t tokens = x.rows, E = weight_grad.rows;
    if (tokens == 0) return;
    parallel_for_blocks(x.cols, column_block, [&](index_t first, index_t last) {
      gemm(ds, Op::transpose, ConstMatrixView<T>(x.data + first, tokens, last - first, x.stride), Op::none,
           MatrixView<T>(weight_grad.data + first, E, last - first, weight_grad.stride),
           GemmEpilogue<T>{.accumulate = true});
    });
  }
  // dx [T, d] += ds·W, by token blocks.
  static void accumulate_input_grad(ConstMatrixView<T> ds, ConstMatrixView<T> weight, MatrixView<T> dx) {
    using namespace cpu_kernels;
    parallel_for_blocks(ds.rows, token_block, [&](index_t first, index_t last) {
      gemm(ds.rows_range(first, last), Op::none, weight, Op::none, dx.rows_range(first, last),
           GemmEpilogue<T>{.accumulate = true});
    });
  }

 private:
  static constexpr index_t token_block = 128, column_block = 128;
  Tensor<T> weight_t_;  // Wᵀ [d, E] of the last prepare()
};

}  // namespace smoe
