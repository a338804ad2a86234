#pragma once
// sigma-MoE gating (Csordás et al. 2023, Sec. 5): gate_k = sigmoid(s[e_k]), no renormalization,
// so a token's gates need not sum to 1 and each expert's contribution is judged on its own.
#include <cmath>

#include "smoe/routing/topk_router.hpp"

namespace smoe {

struct SigmoidGate {
  template <class T>
  SMOE_HOST_DEVICE void forward(const T* s, index_t, const std::int32_t* ids, index_t K, T* gates) const {
    using std::exp;
    for (index_t j = 0; j < K; ++j) gates[j] = T(1) / (T(1) + exp(-s[ids[j]]));
  }
  template <class T>
  SMOE_HOST_DEVICE void backward(const T*, index_t, const std::int32_t* ids, index_t K, const T* gates, const T* d_gates,
                T* d_logits) const {
    for (index_t j = 0; j < K; ++j)
      if (ids[j] >= 0) d_logits[ids[j]] += d_gates[j] * gates[j] * (T(1) - gates[j]);
  }
};

template <class T, class Backend = cpu>
using SigmoidTopK = TopKRouter<T, SigmoidGate, Backend>;

}  // namespace smoe
