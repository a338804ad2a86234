#pragma once
// The opt-in input checks of the CUDA layers (their `validate_inputs`): each copies the input to
// the host and waits for the stream, so forward and backward call it only when asked to.
#include <utility>
#include <vector>

#include "smoe/core/validate.hpp"
#include "smoe/cuda/device_tensor.cuh"

namespace smoe::cuda_kernels {

// Throws smoe::error naming the first non-finite element of a device matrix: one copy to the host
// (and one wait for the stream), then the host's check_finite (core/validate.hpp).
template <class T>
void check_finite(const char* context, const char* name, ConstMatrixView<T, cuda> m, cuda_stream stream) {
  if (m.empty()) return;
  const index_t span = (m.rows - 1) * m.stride + m.cols;
  std::vector<T> raw(static_cast<std::size_t>(span));
  copy_bytes(raw.data(), m.data, sizeof(T) * raw.size(), stream);
  synchronize(stream);
  Tensor<acc_t<T>> host({m.rows, m.cols});
  for (index_t r = 0; r < m.rows; ++r)
    for (index_t c = 0; c < m.cols; ++c) host[r * m.cols + c] = to_acc(raw[r * m.stride + c]);
  smoe::check_finite(context, name, std::as_const(host).matrix());
}

}  // namespace smoe::cuda_kernels
