#pragma once
// GradientOps<cuda>: train/gradient_ops.hpp's per-tensor work for device gradients, so
// clip_grad_norm, grad_norm and scale_gradients take models of smoe::cuda components. The sums run
// in double as a Thrust reduction (a fixed tree: bitwise-equal reruns; the order differs from the
// CPU's sequential sum by rounding only). Each sum returns to the host, so measuring a norm waits
// for the stream once per parameter tensor; scaling does not wait.
#include <thrust/functional.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/transform_reduce.h>

#include "smoe/cuda/device_tensor.cuh"
#include "smoe/train/gradient_ops.hpp"

namespace smoe {

namespace cuda_kernels {

template <class U>
struct ScaledSquare {
  const U* g;
  double divisor;
  SMOE_HOST_DEVICE double operator()(index_t i) const {
    const double v = double(to_acc(g[i])) / divisor;
    return v * v;
  }
};

template <class U>
struct AbsoluteValue {
  const U* g;
  SMOE_HOST_DEVICE double operator()(index_t i) const {
    const double v = double(to_acc(g[i]));
    return v < 0 ? -v : v;
  }
};

template <class U>
struct ScaleBy {
  U* g;
  U factor;
  SMOE_HOST_DEVICE void operator()(index_t i) const { g[i] = from_acc<U>(to_acc(g[i]) * to_acc(factor)); }
};

}  // namespace cuda_kernels

template <>
struct GradientOps<cuda> {
  template <class U>
  static void sum_squares(const Tensor<U, cuda>& g, double divisor, double& sum, double& largest) {
    if (g.size() == 0) return;
    const auto policy = cuda_kernels::policy(g.stream());
    const thrust::counting_iterator<index_t> first(0), last(g.size());
    sum += thrust::transform_reduce(policy, first, last, cuda_kernels::ScaledSquare<U>{g.data(), divisor}, 0.0,
                                    thrust::plus<double>());
    const double m = thrust::transform_reduce(policy, first, last, cuda_kernels::AbsoluteValue<U>{g.data()}, 0.0,
                                              thrust::maximum<double>());
    largest = m > largest ? m : largest;  // NaN never wins
  }
  template <class U>
  static void scale(Tensor<U, cuda>& g, double factor) {
    cuda_kernels::for_each_index(g.stream(), g.size(),
                                 cuda_kernels::ScaleBy<U>{g.data(), from_acc<U>(static_cast<acc_t<U>>(factor))});
  }
};

}  // namespace smoe
