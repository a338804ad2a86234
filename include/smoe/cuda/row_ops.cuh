#pragma once
// RowOps<cuda> (layers/row_ops.hpp): out = a + b and out = a over the rows of device
// matrices, for the composites written once for both backends (TransformerBlock, MoEStack).
#include <span>

#include "smoe/cuda/device_tensor.cuh"
#include "smoe/cuda/execution.cuh"
#include "smoe/cuda/numeric.cuh"
#include "smoe/layers/row_ops.hpp"

namespace smoe {

namespace cuda_kernels {

// out = a + b, or out = a when b is null.
template <class T>
struct AddRows {
  const T* a;
  const T* b;
  T* out;
  index_t lda, ldb, ldo, cols;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    const index_t r = i / cols, c = i % cols;
    out[r * ldo + c] = b ? from_acc<T>(to_acc(a[r * lda + c]) + to_acc(b[r * ldb + c])) : a[r * lda + c];
  }
};

}  // namespace cuda_kernels

template <>
struct RowOps<cuda> {
  template <class T>
  static void add(ConstMatrixView<T, cuda> a, ConstMatrixView<T, cuda> b, MatrixView<T, cuda> out, cuda_stream stream) {
    expect_shape("RowOps<cuda>::add", "b", b, a.rows, a.cols);
    expect_shape("RowOps<cuda>::add", "out", out, a.rows, a.cols);
    cuda_kernels::for_each_index(stream, a.rows * a.cols,
                                 cuda_kernels::AddRows<T>{a.data, b.data, out.data, a.stride, b.stride, out.stride, a.cols});
  }
  template <class T>
  static void copy(ConstMatrixView<T, cuda> a, MatrixView<T, cuda> out, cuda_stream stream) {
    expect_shape("RowOps<cuda>::copy", "out", out, a.rows, a.cols);
    cuda_kernels::for_each_index(stream, a.rows * a.cols,
                                 cuda_kernels::AddRows<T>{a.data, nullptr, out.data, a.stride, 0, out.stride, a.cols});
  }
};

template <>
struct Upload<cuda> {
  template <class U>
  static void copy(std::span<const U> values, Tensor<U, cuda>& out, cuda_stream stream) {
    out.set_stream(stream);
    out.resize({index_t(values.size())});
    cuda_kernels::copy_bytes(out.data(), values.data(), sizeof(U) * values.size(), stream);
    synchronize(stream);  // the host values may not outlive the call
  }
};

}  // namespace smoe
