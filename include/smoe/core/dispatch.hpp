#pragma once
// Dispatch: the routing decision as CSR by expert. Every router ends here, and experts and the
// combiner only ever read this structure.
//
//   offsets [E+1]   slots of expert e are [offsets[e], offsets[e+1]); offsets[1..E] are the
//                   int32 cumulative ends used by torch._grouped_mm, ScatterMoE and DeepGEMM
//   slot_token [A]  token of each slot           slot_gate [A]  gate of each slot
//   token_slot [T*K] slot of assignment (t, k), -1 where the router left it empty (or dropped it)
//
// Built by a stable counting sort: within an expert, slots follow (token, k) order, so the
// layout is deterministic and independent of thread schedules. Dispatch<T, cuda>, the same
// layout in device memory, is built by the CUDA backend (smoe/cuda/dispatch.cuh).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>
#include <vector>

#include "smoe/core/view.hpp"

namespace smoe {

template <class T, class Space = cpu>
struct Dispatch {
  static_assert(std::is_same_v<Space, cpu>, "Dispatch<T, cuda> needs <smoe/cuda/dispatch.cuh>");
  using space = cpu;
  index_t tokens = 0;
  index_t k = 0;
  index_t experts = 0;
  std::vector<std::int32_t> offsets;
  std::vector<std::int32_t> slot_token;
  std::vector<T> slot_gate;
  std::vector<std::int32_t> token_slot;

  index_t assignments() const { return static_cast<index_t>(slot_token.size()); }
  index_t expert_begin(index_t e) const { return offsets[static_cast<std::size_t>(e)]; }
  index_t expert_end(index_t e) const { return offsets[static_cast<std::size_t>(e) + 1]; }
  index_t count(index_t e) const { return expert_end(e) - expert_begin(e); }
  std::int32_t slot(index_t t, index_t kk) const { return token_slot[static_cast<std::size_t>(t * k + kk)]; }
  // The expert that owns slot s (a binary search over the offsets).
  index_t expert_of_slot(index_t s) const {
    return static_cast<index_t>(std::upper_bound(offsets.begin() + 1, offsets.end(), static_cast<std::int32_t>(s)) -
                                (offsets.begin() + 1));
  }
  // Cumulative ends per expert [E], the grouped-GEMM convention.
  std::span<const std::int32_t> ends() const { return {offsets.data() + 1, static_cast<std::size_t>(experts)}; }
};

// Builds `out` from the router's choice: ids [T, K] (expert id, or -1 for an empty assignment)
// and gates [T, K]. Throws smoe::error on an id outside [-1, experts).
template <class T>
void build_dispatch(ConstMatrixView<std::int32_t> ids, ConstMatrixView<T> gates, index_t experts, Dispatch<T>& out) {
  const char* ctx = "build_dispatch";
  if (experts < 1) fail(ctx, ": experts must be >= 1, got ", experts);
  expect_shape(ctx, "gates", gates, ids.rows, ids.cols);
  const index_t tokens = ids.rows, k = ids.cols;
  // Slots are counted in int32 (the offsets convention of torch._grouped_mm, ScatterMoE, DeepGEMM).
  constexpr index_t max_slots = std::numeric_limits<std::int32_t>::max();
  if (experts > max_slots) fail(ctx, ": experts must be <= 2^31 - 1 (expert ids are int32), got ", experts);
  if (k > 0 && tokens > max_slots / k)
    fail(ctx, ": tokens × k = ", tokens, " × ", k, " must be <= 2^31 - 1 (dispatch offsets are int32)");
  out.tokens = tokens;
  out.k = k;
  out.experts = experts;
  out.offsets.assign(static_cast<std::size_t>(experts) + 1, 0);
  for (index_t t = 0; t < tokens; ++t)
    for (index_t j = 0; j < k; ++j) {
      const std::int32_t e = ids(t, j);
      if (e < -1 || e >= experts)
        fail(ctx, ": expert id at (token ", t, ", k ", j, ") must be in [-1, ", experts, "), got ", e);
      if (e >= 0) ++out.offsets[static_cast<std::size_t>(e) + 1];
    }
  for (index_t e = 0; e < experts; ++e) out.offsets[e + 1] += out.offsets[e];
  const std::size_t a = static_cast<std::size_t>(out.offsets[experts]);
  out.slot_token.resize(a);
  out.slot_gate.resize(a);
  out.token_slot.assign(static_cast<std::size_t>(tokens * k), -1);
  std::vector<std::int32_t> next(out.offsets.begin(), out.offsets.end() - 1);
  for (index_t t = 0; t < tokens; ++t)
    for (index_t j = 0; j < k; ++j) {
      const std::int32_t e = ids(t, j);
      if (e < 0) continue;
      const std::int32_t s = next[static_cast<std::size_t>(e)]++;
      out.slot_token[static_cast<std::size_t>(s)] = static_cast<std::int32_t>(t);
      out.slot_gate[static_cast<std::size_t>(s)] = gates(t, j);
      out.token_slot[static_cast<std::size_t>(t * k + j)] = s;
    }
}

}  // namespace smoe
