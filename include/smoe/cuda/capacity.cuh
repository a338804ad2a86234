#pragma once
// Expert capacity on the device (routing/capacity.hpp's apply_capacity): each expert keeps at most
// C = ceil(capacity_factor · T · K / E) assignments, the CPU's choice of which:
//   position priority: first choices of all tokens before second choices, then token order;
//   gate priority:     larger gate first, ties by position (the CPU's stable sort by gate).
// One sort of the T·K slots under the total order (expert, priority) (invalid and empty ids last,
// never dropped), then a slot is dropped when its rank within its expert is >= C. The number of
// dropped assignments stays on the device (a scalar) until the caller reads it: no host
// synchronisation. A NaN gate (which the CPU's stable sort leaves in an unspecified place) ranks
// after every number here.
#include <cstdint>

#include <thrust/binary_search.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/sort.h>

#include "smoe/cuda/device_tensor.cuh"
#include "smoe/routing/capacity.hpp"

namespace smoe {

namespace cuda_kernels {

// Slot a = t·K + j before slot b: smaller valid expert (empty/invalid last), then the priority.
template <class G>
struct CapacityOrder {
  const std::int32_t* ids;
  index_t ids_stride;
  const G* gates;
  index_t gates_stride, K, E;
  bool by_gate;
  SMOE_HOST_DEVICE std::int32_t expert(std::int32_t slot) const {
    const std::int32_t e = ids[(slot / K) * ids_stride + slot % K];
    return e >= 0 && e < E ? e : static_cast<std::int32_t>(E);
  }
  SMOE_HOST_DEVICE bool operator()(std::int32_t a, std::int32_t b) const {
    const std::int32_t ea = expert(a), eb = expert(b);
    if (ea != eb) return ea < eb;
    if (by_gate) {
      const G ga = gates[(a / K) * gates_stride + a % K], gb = gates[(b / K) * gates_stride + b % K];
      const bool na = ga == ga, nb = gb == gb;
      if (na != nb) return na;
      if (na && ga != gb) return ga > gb;
    }
    const index_t ja = a % K, jb = b % K;  // position: (choice, token)
    if (ja != jb) return ja < jb;
    return a < b;
  }
};

struct CapacityKeys {
  const std::int32_t* order;
  const std::int32_t* ids;
  index_t ids_stride, K, E;
  std::int32_t* keys;
  SMOE_HOST_DEVICE void operator()(index_t p) const {
    const std::int32_t slot = order[p];
    const std::int32_t e = ids[(slot / K) * ids_stride + slot % K];
    keys[p] = e >= 0 && e < E ? e : static_cast<std::int32_t>(E);
  }
};

struct CapacityCopy {
  const std::int32_t* ids;
  index_t ids_stride, K;
  std::int32_t* kept;
  SMOE_HOST_DEVICE void operator()(index_t i) const { kept[i] = ids[(i / K) * ids_stride + i % K]; }
};

// Drops the slots ranked >= C within their expert; starts[e] = first sorted position of expert e.
struct CapacityDrop {
  const std::int32_t *order, *keys, *starts;
  index_t E, C;
  std::int32_t* kept;
  SMOE_HOST_DEVICE void operator()(index_t p) const {
    const std::int32_t e = keys[p];
    if (e < E && p - starts[e] >= C) kept[order[p]] = -1;
  }
};

struct CapacityDropped {
  const std::int32_t* starts;  // [E + 1]
  index_t E, C;
  std::int32_t* dropped;
  SMOE_HOST_DEVICE void operator()(index_t) const {
    index_t sum = 0;
    for (index_t e = 0; e < E; ++e) {
      const index_t n = starts[e + 1] - starts[e];
      sum += n > C ? n - C : 0;
    }
    *dropped = static_cast<std::int32_t>(sum);
  }
};

}  // namespace cuda_kernels

// Device scratch and result of apply_capacity.
struct CapacityWorkspace {
  Tensor<std::int32_t, cuda> order, keys, starts;
  Tensor<std::int32_t, cuda> dropped;  // [1]: assignments dropped by the last call
  void set_stream(cuda_stream s) {
    for (auto* t : {&order, &keys, &starts, &dropped}) t->set_stream(s);
  }
};

// Writes ids [T, K] into `kept` with over-capacity assignments set to −1 and the number dropped
// into work.dropped, on `stream`. With the policy disabled, kept = ids and nothing is dropped.
template <class G>
void apply_capacity(const CapacityPolicy& capacity, index_t experts, ConstMatrixView<std::int32_t, cuda> ids,
                    ConstMatrixView<G, cuda> gates, Tensor<std::int32_t, cuda>& kept, CapacityWorkspace& work,
                    cuda_stream stream) {
  using namespace cuda_kernels;
  const char* ctx = "apply_capacity<cuda>";
  capacity.validate(ctx);
  expect_shape(ctx, "gates", gates, ids.rows, ids.cols);
  const index_t tokens = ids.rows, K = ids.cols, n = tokens * K;
  if (n > index_t{INT32_MAX}) fail(ctx, ": tokens·k must fit int32, got ", n);
  kept.set_stream(stream);
  work.set_stream(stream);
  kept.resize({tokens, K});
  work.dropped.resize({1});
  work.dropped.fill(0);
  for_each_index(stream, n, CapacityCopy{ids.data, ids.stride, K, kept.data()});
  if (!capacity.enabled() || n == 0) return;
  const index_t C = capacity.capacity(tokens, K, experts);
  work.order.resize({n});
  work.keys.resize({n});
  work.starts.resize({experts + 1});
  for_each_index(stream, n, Iota{work.order.data()});
  thrust::sort(policy(stream), work.order.data(), work.order.data() + n,
               CapacityOrder<G>{ids.data, ids.stride, gates.data, gates.stride, K, experts,
                                capacity.priority == CapacityPolicy::Priority::gate});
  for_each_index(stream, n, CapacityKeys{work.order.data(), ids.data, ids.stride, K, experts, work.keys.data()});
  thrust::lower_bound(policy(stream), work.keys.data(), work.keys.data() + n, thrust::counting_iterator<std::int32_t>(0),
                      thrust::counting_iterator<std::int32_t>(static_cast<std::int32_t>(experts + 1)),
                      work.starts.data());
  for_each_index(stream, n, CapacityDrop{work.order.data(), work.keys.data(), work.starts.data(), experts, C, kept.data()});
  for_each_index(stream, 1, CapacityDropped{work.starts.data(), experts, C, work.dropped.data()});
}

}  // namespace smoe
