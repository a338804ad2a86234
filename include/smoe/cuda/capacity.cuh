#pragma once
// Expert capacity on the device (routing/capacity.hpp's apply_capacity): each expert keeps at most
// C = ceil(capacity_factor · T · K / E) assignments, the others become −1 in a copy of the ids,
// with the CPU's priorities: position (first choices of all tokens, then second choices, then token
// order) or gate (larger gate first, ties by position). Sync-free: the priority order is a stable
// sort on the device, a second stable sort groups it by expert without changing the order within
// an expert, and an assignment is kept when its rank within its expert is below C. The number
// dropped stays on the device (`dropped` [1]).
#include <cstdint>

#include <thrust/binary_search.h>
#include <thrust/sort.h>

#include "smoe/cuda/device_tensor.cuh"
#include "smoe/routing/capacity.hpp"

namespace smoe {

namespace cuda_kernels {

// order[i] = (i % T)·K + i / T: the (k, t)-major position order.
struct PositionOrder {
  std::int32_t* order;
  index_t tokens, K;
  SMOE_HOST_DEVICE void operator()(index_t i) const { order[i] = std::int32_t((i % tokens) * K + i / tokens); }
};

// key[i] = the expert of assignment order[i] (E for empty or invalid ids: they sort last, never kept).
struct ExpertOfOrder {
  const std::int32_t* ids;
  const std::int32_t* order;
  std::int32_t* key;
  index_t E;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    const std::int32_t e = ids[order[i]];
    key[i] = e >= 0 && e < E ? e : std::int32_t(E);
  }
};

// key[i] = −gate of assignment order[i] (a stable ascending sort puts larger gates first).
template <class G>
struct NegatedGate {
  const G* gates;
  const std::int32_t* order;
  G* key;
  SMOE_HOST_DEVICE void operator()(index_t i) const { key[i] = -gates[order[i]]; }
};

// After grouping: position p holds expert key[p]; its rank is p − (first position of that expert).
struct DropOverCapacity {
  const std::int32_t* key;  // sorted experts [n]
  const std::int32_t* order;
  const std::int32_t* first;  // first position of each expert [E + 1] (lower_bound)
  std::int32_t* kept;
  index_t E, capacity;
  SMOE_HOST_DEVICE void operator()(index_t p) const {
    const std::int32_t e = key[p];
    if (e >= E) return;
    if (p - first[e] >= capacity) kept[order[p]] = -1;
  }
};

// dropped[0] = Σ_e max(0, count_e − C).
struct CountDropped {
  const std::int32_t* first;  // [E + 1]: first[E] = the valid assignments
  std::int32_t* dropped;
  index_t E, capacity;
  SMOE_HOST_DEVICE void operator()(index_t) const {
    std::int32_t n = 0;
    for (index_t e = 0; e < E; ++e) {
      const index_t count = first[e + 1] - first[e];
      n += std::int32_t(count > capacity ? count - capacity : 0);
    }
    *dropped = n;
  }
};

}  // namespace cuda_kernels

// Device scratch of apply_capacity, reused across calls.
struct CapacityScratch {
  Tensor<std::int32_t, cuda> order, key, first;
  Tensor<float, cuda> gate_key;
  Tensor<double, cuda> gate_key64;
  void set_stream(cuda_stream s) {
    for (auto* t : {&order, &key, &first}) t->set_stream(s);
    gate_key.set_stream(s);
    gate_key64.set_stream(s);
  }
};

// kept = ids with over-capacity assignments set to −1; dropped[0] = how many (device scalars).
template <class G>
void apply_capacity(const CapacityPolicy& capacity_policy, index_t experts, const Routing<G, cuda>& r,
                    Tensor<std::int32_t, cuda>& kept, Tensor<std::int32_t, cuda>& dropped, CapacityScratch& scratch,
                    cuda_stream stream) {
  using namespace cuda_kernels;
  capacity_policy.validate("apply_capacity<cuda>");
  const index_t tokens = r.experts.rank() == 2 ? r.experts.dim(0) : 0, K = r.experts.rank() == 2 ? r.experts.dim(1) : 0;
  const index_t n = tokens * K, E = experts;
  kept.resize({tokens, K});
  copy_bytes(kept.data(), r.experts.data(), sizeof(std::int32_t) * std::size_t(n), stream);
  dropped.resize({1});
  dropped.zero();
  if (!capacity_policy.enabled() || n == 0) return;
  const index_t C = capacity_policy.capacity(tokens, K, E);
  auto& order = scratch.order;
  auto& key = scratch.key;
  order.resize({n});
  key.resize({n});
  for_each_index(stream, n, PositionOrder{order.data(), tokens, K});
  if (capacity_policy.priority == CapacityPolicy::Priority::gate) {
    auto& gate_key = [&]() -> Tensor<G, cuda>& {
      if constexpr (std::is_same_v<G, double>)
        return scratch.gate_key64;
      else
        return scratch.gate_key;
    }();
    gate_key.resize({n});
    for_each_index(stream, n, NegatedGate<G>{r.gates.data(), order.data(), gate_key.data()});
    thrust::stable_sort_by_key(cuda_kernels::policy(stream), gate_key.data(), gate_key.data() + n, order.data());
  }
  for_each_index(stream, n, ExpertOfOrder{r.experts.data(), order.data(), key.data(), E});
  thrust::stable_sort_by_key(cuda_kernels::policy(stream), key.data(), key.data() + n, order.data());
  scratch.first.resize({E + 1});
  thrust::lower_bound(cuda_kernels::policy(stream), key.data(), key.data() + n,
                      thrust::counting_iterator<std::int32_t>(0), thrust::counting_iterator<std::int32_t>(std::int32_t(E + 1)),
                      scratch.first.data());
  for_each_index(stream, n, DropOverCapacity{key.data(), order.data(), scratch.first.data(), kept.data(), E, C});
  for_each_index(stream, 1, CountDropped{scratch.first.data(), dropped.data(), E, C});
}

}  // namespace smoe
