#pragma once
// A gate policy for TopKRouter: softmax over the K selected logits at a temperature tau.
#include <cmath>
#include <cstdint>

#include <smoe/routing/topk_router.hpp>

namespace extending {

// example-begin gate
// gate_j = exp(s_j / tau) / Σ_i exp(s_i / tau) over the K selected logits s_j = s[ids[j]].
struct TemperatureGate {
  double tau = 1.0;

  template <class T>
  void forward(const T* s, smoe::index_t, const std::int32_t* ids, smoe::index_t K, T* gates) const {
    T z = 0;  // ids[0] is the largest selected logit: subtract it for a stable exp
    for (smoe::index_t j = 0; j < K; ++j) z += gates[j] = std::exp((s[ids[j]] - s[ids[0]]) / T(tau));
    for (smoe::index_t j = 0; j < K; ++j) gates[j] /= z;
  }
  // d_logits[ids[j]] += Σ_i d_gates[i] ∂gate_i/∂s_j = gate_j (d_gate_j − Σ_i gate_i d_gate_i) / tau
  template <class T>
  void backward(const T*, smoe::index_t, const std::int32_t* ids, smoe::index_t K, const T* gates,
                const T* d_gates, T* d_logits) const {
    T dot = 0;
    for (smoe::index_t j = 0; j < K; ++j) dot += gates[j] * d_gates[j];
    for (smoe::index_t j = 0; j < K; ++j)
      if (ids[j] >= 0) d_logits[ids[j]] += gates[j] * (d_gates[j] - dot) / T(tau);  // −1: empty
  }
};
// example-end gate

}  // namespace extending
