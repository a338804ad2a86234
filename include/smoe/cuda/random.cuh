#pragma once
// Random device tensors from the counter-based RNG (core/rng.hpp), generated on the device: element
// i of fill_normal(t, std, seed) is std·standard_normal(seed, i, stream), the same value the CPU's
// Philox gives, so large layers are initialized without host memory or copies.
#include <cstdint>

#include "smoe/core/rng.hpp"
#include "smoe/cuda/device_tensor.cuh"

namespace smoe {

namespace cuda_kernels {
template <class T>
struct NormalFill {
  T* data;
  double std;
  std::uint64_t seed, stream;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    data[i] = from_acc<T>(static_cast<acc_t<T>>(std * standard_normal(seed, static_cast<std::uint64_t>(i), stream)));
  }
};
}  // namespace cuda_kernels

template <class T>
void fill_normal(Tensor<T, cuda>& t, double std, std::uint64_t seed, std::uint64_t stream = 0) {
  cuda_kernels::for_each_index(t.stream(), t.size(), cuda_kernels::NormalFill<T>{t.data(), std, seed, stream});
}

}  // namespace smoe
