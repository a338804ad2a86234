#pragma once
// Expert activations as policies over one row of pre-activations. `fan` is how many hidden
// pre-activations feed one hidden unit: 1 for elementwise activations, 2 for gated ones, whose
// pre-activation row is [gate half | up half] (so W1 is [d, fan·G]).
#include <cmath>

#include "smoe/core/config.hpp"

namespace smoe {

struct Relu {
  static constexpr index_t fan = 1;
  static constexpr const char* name = "relu";
  template <class T>
  static void forward(const T* pre, T* h, index_t G) {
    for (index_t i = 0; i < G; ++i) h[i] = pre[i] > T(0) ? pre[i] : T(0);
  }
  template <class T>
  static void backward(const T* pre, const T* dh, T* dpre, index_t G) {
    for (index_t i = 0; i < G; ++i) dpre[i] = pre[i] > T(0) ? dh[i] : T(0);
  }
};

// GELU in its exact form x·Φ(x) = x/2 · (1 + erf(x/√2)), not the tanh approximation.
struct Gelu {
  static constexpr index_t fan = 1;
  static constexpr const char* name = "gelu";
  template <class T>
  static void forward(const T* pre, T* h, index_t G) {
    for (index_t i = 0; i < G; ++i) h[i] = T(0.5) * pre[i] * (T(1) + std::erf(pre[i] * T(0.70710678118654752440)));
  }
  template <class T>
  static void backward(const T* pre, const T* dh, T* dpre, index_t G) {
    constexpr T inv_sqrt_2pi = T(0.3989422804014327);
    for (index_t i = 0; i < G; ++i) {
      const T x = pre[i];
      const T cdf = T(0.5) * (T(1) + std::erf(x * T(0.70710678118654752440)));
      dpre[i] = dh[i] * (cdf + x * inv_sqrt_2pi * std::exp(T(-0.5) * x * x));
    }
  }
};

// SwiGLU (Shazeer 2020): h = silu(a) ⊙ b with a = x·W1_gate, b = x·W1_up.
struct SwiGlu {
  static constexpr index_t fan = 2;
  static constexpr const char* name = "swiglu";
  template <class T>
  static void forward(const T* pre, T* h, index_t G) {
    const T *a = pre, *b = pre + G;
    for (index_t i = 0; i < G; ++i) h[i] = a[i] / (T(1) + std::exp(-a[i])) * b[i];
  }
  template <class T>
  static void backward(const T* pre, const T* dh, T* dpre, index_t G) {
    const T *a = pre, *b = pre + G;
    for (index_t i = 0; i < G; ++i) {
      const T sig = T(1) / (T(1) + std::exp(-a[i]));
      dpre[i] = dh[i] * b[i] * sig * (T(1) + a[i] * (T(1) - sig));
      dpre[G + i] = dh[i] * a[i] * sig;
    }
  }
};

template <class A>
concept Activation = requires(const float* cp, float* p, index_t n) {
  { A::fan } -> std::convertible_to<index_t>;
  A::forward(cp, p, n);
  A::backward(cp, cp, p, n);
};

}  // namespace smoe
