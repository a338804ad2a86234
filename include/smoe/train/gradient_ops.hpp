#pragma once
// The per-tensor work of gradient clipping and scaling (train/clip.hpp, train/accumulate.hpp), by
// memory space: GradientOps<cpu> here, GradientOps<cuda> in cuda/gradient_ops.cuh. Sums run in
// double in storage order, so a norm does not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "smoe/core/tensor.hpp"

namespace smoe {

template <class Space>
struct GradientOps;

template <>
struct GradientOps<cpu> {
  // Σ (g / divisor)² and max |g| over the tensor (NaN never wins the max; the sum carries it).
  template <class U>
  static void sum_squares(const Tensor<U>& g, double divisor, double& sum, double& largest) {
    for (index_t i = 0; i < g.size(); ++i) {
      const double v = double(g[i]) / divisor;
      sum += v * v;
      largest = std::max(largest, std::abs(double(g[i])));
    }
  }
  // g ← g · factor, the factor rounded to the gradient's type first (as PyTorch).
  template <class U>
  static void scale(Tensor<U>& g, double factor) {
    const U s = U(factor);
    for (index_t i = 0; i < g.size(); ++i) g[i] *= s;
  }
};

template <class Tensor_>
using gradient_ops_of = GradientOps<typename std::remove_cvref_t<Tensor_>::space>;

}  // namespace smoe
