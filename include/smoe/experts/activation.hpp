#pragma once
// Expert activations as policies over one row of pre-activations. `fan` is how many hidden
// pre-activations feed one hidden unit: 1 for elementwise activations, 2 for gated ones, whose
// pre-activation row is [gate half | up half] (so W1 is [d, fan·G]).
// Each policy defines one hidden unit i of a row (`unit`, `unit_backward`, callable on the host and
// the device, so the CUDA backend shares the math) and the row loops the CPU kernels call.
#include <cmath>

#include "smoe/core/config.hpp"

namespace smoe {

struct Relu {
  static constexpr index_t fan = 1;
  static constexpr const char* name = "relu";
  template <class T>
  SMOE_HOST_DEVICE static T unit(const T* pre, index_t i, index_t) {
    return pre[i] > T(0) ? pre[i] : T(0);
  }
  template <class T>
  SMOE_HOST_DEVICE static void unit_backward(const T* pre, index_t i, index_t, T dh, T* dpre) {
    dpre[i] = pre[i] > T(0) ? dh : T(0);
  }
  template <class T>
  static void forward(const T* pre, T* h, index_t G) {
    for (index_t i = 0; i < G; ++i) h[i] = unit(pre, i, G);
  }
  template <class T>
  static void backward(const T* pre, const T* dh, T* dpre, index_t G) {
    for (index_t i = 0; i < G; ++i) unit_backward(pre, i, G, dh[i], dpre);
  }
};

// GELU in its exact form x·Φ(x) = x/2 · (1 + erf(x/√2)), not the tanh approximation.
struct Gelu {
  static constexpr index_t fan = 1;
  static constexpr const char* name = "gelu";
  template <class T>
  SMOE_HOST_DEVICE static T unit(const T* pre, index_t i, index_t) {
    using std::erf;
    return T(0.5) * pre[i] * (T(1) + erf(pre[i] * T(0.70710678118654752440)));
  }
  template <class T>
  SMOE_HOST_DEVICE static void unit_backward(const T* pre, index_t i, index_t, T dh, T* dpre) {
    using std::erf, std::exp;
    const T x = pre[i];
    const T cdf = T(0.5) * (T(1) + erf(x * T(0.70710678118654752440)));
    dpre[i] = dh * (cdf + x * T(0.3989422804014327) * exp(T(-0.5) * x * x));  // 1/√(2π)
  }
  template <class T>
  static void forward(const T* pre, T* h, index_t G) {
    for (index_t i = 0; i < G; ++i) h[i] = unit(pre, i, G);
  }
  template <class T>
  static void backward(const T* pre, const T* dh, T* dpre, index_t G) {
    for (index_t i = 0; i < G; ++i) unit_backward(pre, i, G, dh[i], dpre);
  }
};

// SwiGLU (Shazeer 2020): h = silu(a) ⊙ b with a = x·W1_gate, b = x·W1_up.
struct SwiGlu {
  static constexpr index_t fan = 2;
  static constexpr const char* name = "swiglu";
  template <class T>
  SMOE_HOST_DEVICE static T unit(const T* pre, index_t i, index_t G) {
    using std::exp;
    const T a = pre[i], b = pre[G + i];
    return a / (T(1) + exp(-a)) * b;
  }
  template <class T>
  SMOE_HOST_DEVICE static void unit_backward(const T* pre, index_t i, index_t G, T dh, T* dpre) {
    using std::exp;
    const T a = pre[i], b = pre[G + i];
    const T sig = T(1) / (T(1) + exp(-a));
    dpre[i] = dh * b * sig * (T(1) + a * (T(1) - sig));
    dpre[G + i] = dh * a * sig;
  }
  template <class T>
  static void forward(const T* pre, T* h, index_t G) {
    for (index_t i = 0; i < G; ++i) h[i] = unit(pre, i, G);
  }
  template <class T>
  static void backward(const T* pre, const T* dh, T* dpre, index_t G) {
    for (index_t i = 0; i < G; ++i) unit_backward(pre, i, G, dh[i], dpre);
  }
};

// GPT-OSS's clamped SwiGLU (OpenAI 2025, gpt-oss; HF transformers GptOssExperts):
//   g = min(a, 7),  u = clamp(b, −7, 7),  h = (u + 1) · g · σ(1.702 · g),
// with a = x·W1_gate (+ bias), b = x·W1_up (+ bias) in the [gate half | up half] layout (the HF
// checkpoint interleaves them; the loader separates the columns). A clamped input has zero gradient.
struct ClampedSwiGlu {
  static constexpr index_t fan = 2;
  static constexpr const char* name = "clamped_swiglu";
  static constexpr double limit = 7.0, alpha = 1.702;
  template <class T>
  SMOE_HOST_DEVICE static T unit(const T* pre, index_t i, index_t G) {
    using std::exp;
    const T g = pre[i] > T(limit) ? T(limit) : pre[i];
    const T u = pre[G + i] > T(limit) ? T(limit) : (pre[G + i] < T(-limit) ? T(-limit) : pre[G + i]);
    return (u + T(1)) * g / (T(1) + exp(-T(alpha) * g));
  }
  template <class T>
  SMOE_HOST_DEVICE static void unit_backward(const T* pre, index_t i, index_t G, T dh, T* dpre) {
    using std::exp;
    const T a = pre[i], b = pre[G + i];
    const T g = a > T(limit) ? T(limit) : a;
    const T u = b > T(limit) ? T(limit) : (b < T(-limit) ? T(-limit) : b);
    const T sig = T(1) / (T(1) + exp(-T(alpha) * g));
    dpre[i] = a > T(limit) ? T(0) : dh * (u + T(1)) * sig * (T(1) + T(alpha) * g * (T(1) - sig));
    dpre[G + i] = (b > T(limit) || b < T(-limit)) ? T(0) : dh * g * sig;
  }
  template <class T>
  static void forward(const T* pre, T* h, index_t G) {
    for (index_t i = 0; i < G; ++i) h[i] = unit(pre, i, G);
  }
  template <class T>
  static void backward(const T* pre, const T* dh, T* dpre, index_t G) {
    for (index_t i = 0; i < G; ++i) unit_backward(pre, i, G, dh[i], dpre);
  }
};

template <class A>
concept Activation = requires(const float* cp, float* p, index_t n) {
  { A::fan } -> std::convertible_to<index_t>;
  A::forward(cp, p, n);
  A::backward(cp, cp, p, n);
};

// An activation the CUDA backend can run: one hidden unit at a time, on the host and the device.
template <class A>
concept UnitActivation = Activation<A> && requires(const float* cp, float* p, float v, index_t n) {
  { A::unit(cp, n, n) } -> std::convertible_to<float>;
  A::unit_backward(cp, n, n, v, p);
};

}  // namespace smoe
