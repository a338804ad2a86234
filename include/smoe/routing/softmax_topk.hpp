#pragma once
// Softmax top-k gating.
//   renormalize = false: gate_k = softmax(s)[e_k] over all E experts ("softmax before top-k";
//                        Switch Transformer, Fedus et al. 2022, with K = 1).
//   renormalize = true:  gate_k = softmax over the K selected logits only ("softmax after top-k";
//                        GShard/GLaM/Mixtral with K = 2). With K = 1 every gate is exactly 1.
#include <algorithm>
#include <cmath>

#include "smoe/routing/topk_router.hpp"

namespace smoe {

struct SoftmaxGate {
  bool renormalize = false;

  template <class T>
  SMOE_HOST_DEVICE void forward(const T* s, index_t E, const std::int32_t* ids, index_t K, T* gates) const {
    using std::exp;
    if (renormalize) {
      T m = s[ids[0]];  // the best selected logit
      T z = 0;
      for (index_t j = 0; j < K; ++j) z += exp(s[ids[j]] - m);
      for (index_t j = 0; j < K; ++j) gates[j] = exp(s[ids[j]] - m) / z;
    } else {
      const T m = max_of(s, E);
      T z = 0;
      for (index_t e = 0; e < E; ++e) z += exp(s[e] - m);
      for (index_t j = 0; j < K; ++j) gates[j] = exp(s[ids[j]] - m) / z;
    }
  }

  // Ids −1 (dropped by capacity) carry gate 0 and d_gate 0: they are skipped.
  template <class T>
  SMOE_HOST_DEVICE void backward(const T* s, index_t E, const std::int32_t* ids, index_t K, const T* gates,
                                 const T* d_gates, T* d_logits) const {
    using std::exp;
    T dot = 0;  // Σ_k gate_k · d_gate_k
    for (index_t j = 0; j < K; ++j) dot += gates[j] * d_gates[j];
    if (renormalize) {
      for (index_t j = 0; j < K; ++j)
        if (ids[j] >= 0) d_logits[ids[j]] += gates[j] * (d_gates[j] - dot);
      return;
    }
    const T m = max_of(s, E);
    T z = 0;
    for (index_t e = 0; e < E; ++e) z += exp(s[e] - m);
    for (index_t e = 0; e < E; ++e) d_logits[e] -= exp(s[e] - m) / z * dot;
    for (index_t j = 0; j < K; ++j)
      if (ids[j] >= 0) d_logits[ids[j]] += gates[j] * d_gates[j];
  }

 private:
  // The largest of s[0..n) as std::max_element finds it (NaN never replaces the first value).
  template <class T>
  SMOE_HOST_DEVICE static T max_of(const T* s, index_t n) {
    T m = s[0];
    for (index_t i = 1; i < n; ++i)
      if (m < s[i]) m = s[i];
    return m;
  }
};

template <class T, class Backend = cpu>
using SoftmaxTopK = TopKRouter<T, SoftmaxGate, Backend>;

}  // namespace smoe
