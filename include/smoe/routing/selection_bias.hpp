#pragma once
// SelectionBias: DeepSeek-V3's auxiliary-loss-free load balancing (DeepSeek-AI 2024, "DeepSeek-V3
// Technical Report", Sec. 2.1.2). A per-expert bias b [E] is added to the routing scores for the
// top-k SELECTION only; the gates are computed from the scores without it. After each training
// step the user calls
//   update(load, u):   b_e += u · sign(mean_load − load_e),   mean_load = (1/E) Σ_e load_e,  sign(0) = 0,
// with load_e the tokens routed to expert e (e.g. MoEOutput::stats.tokens_per_expert, or a
// router's load() of the last forward), so overloaded experts become less likely to be picked.
// The paper's u ("bias update speed") is 0.001 for most of training.
//
// The bias is not a gradient-trained parameter: routers do not visit it in for_each_parameter
// (an optimizer must not touch it) but in for_each_buffer, as state a checkpoint saves.
#include <cmath>
#include <cstdint>
#include <span>

#include "smoe/core/error.hpp"
#include "smoe/core/tensor.hpp"

namespace smoe {

template <class T>
struct SelectionBias {
  Tensor<T> values;  // b [E], zero at construction

  SelectionBias() = default;
  explicit SelectionBias(index_t experts) : values({experts}) { values.zero(); }

  index_t experts() const { return values.size(); }
  T operator[](index_t e) const { return values[e]; }

  // b_e += u · sign(mean_load − load_e). The sign is taken on Σ load − E · load_e, exact in integers.
  void update(std::span<const index_t> tokens_per_expert, double u) {
    const char* context = "SelectionBias::update";
    const index_t E = experts();
    if (static_cast<index_t>(tokens_per_expert.size()) != E)
      fail(context, ": tokens_per_expert must have ", E, " entries (one per expert), got ", tokens_per_expert.size());
    if (!(u >= 0.0) || !std::isfinite(u)) fail(context, ": u (update speed) must be finite and >= 0, got ", u);
    index_t total = 0;
    for (index_t e = 0; e < E; ++e) {
      if (tokens_per_expert[e] < 0)
        fail(context, ": tokens_per_expert[", e, "] must be >= 0, got ", tokens_per_expert[e]);
      total += tokens_per_expert[e];
    }
    for (index_t e = 0; e < E; ++e) {
      const index_t diff = total - E * tokens_per_expert[e];  // E · (mean_load − load_e)
      if (diff > 0) values[e] += T(u);
      if (diff < 0) values[e] -= T(u);
    }
  }
};

}  // namespace smoe
