#pragma once
// Dispatch<T, cuda>: the CSR-by-expert routing layout of core/dispatch.hpp in device memory, built
// without host synchronisation. The number of assignments A is data-dependent and stays on the
// device (offsets[E]); buffers are sized for the T·K slots a batch can have, and slot rows past A
// are padding that no kernel reads (slot_token -1, slot_expert E).
//
//   offsets [E+1]     int32 cumulative ends (offsets[0] = 0), as torch._grouped_mm
//   slot_token [T·K]  token of each slot          slot_gate [T·K]   gate of each slot
//   slot_expert [T·K] expert of each slot         token_slot [T·K]  slot of (t, k) or -1
//
// Built by a stable sort of the flat assignments by expert id, so within an expert the slots
// follow (token, k) order: the same layout as the CPU's counting sort, for any schedule.
#include <cstdint>
#include <type_traits>

#include <thrust/binary_search.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/sort.h>

#include "smoe/core/dispatch.hpp"
#include "smoe/cuda/device_tensor.cuh"

namespace smoe {

template <class T>
struct Dispatch<T, cuda> {
  using space = cuda;
  index_t tokens = 0;
  index_t k = 0;
  index_t experts = 0;
  Tensor<std::int32_t, cuda> offsets;
  Tensor<std::int32_t, cuda> slot_token;
  Tensor<std::int32_t, cuda> slot_expert;
  Tensor<T, cuda> slot_gate;
  Tensor<std::int32_t, cuda> token_slot;
  // Ids outside [-1, E) seen by the last build (device flag, 0 or 1): they are treated as empty;
  // the layers' validation mode reports them.
  Tensor<std::int32_t, cuda> invalid_ids;
  Tensor<std::int32_t, cuda> sort_keys, sort_order;  // build scratch, kept to avoid reallocation

  // Rows of the per-slot buffers (T·K): an upper bound on the assignments, known on the host.
  index_t slots() const { return tokens * k; }
  // Pointer to offsets[E], the assignment count on the device.
  const std::int32_t* assignments_device() const { return offsets.data() + experts; }
  void set_stream(cuda_stream s) {
    for (auto* t : {&offsets, &slot_token, &slot_expert, &token_slot, &invalid_ids, &sort_keys, &sort_order})
      t->set_stream(s);
    slot_gate.set_stream(s);
  }
};

namespace cuda_kernels {

struct DispatchKeys {
  const std::int32_t* ids;
  index_t id_stride, k, experts;
  std::int32_t* keys;
  std::int32_t* order;
  std::int32_t* invalid;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    const std::int32_t e = ids[(i / k) * id_stride + i % k];
    const bool valid = e >= 0 && e < experts;
    if (!valid && e != -1) *invalid = 1;  // every writer stores the same value: no race on the result
    keys[i] = valid ? e : static_cast<std::int32_t>(experts);
    order[i] = static_cast<std::int32_t>(i);
  }
};

template <class T>
struct DispatchSlots {
  const std::int32_t* keys;   // sorted expert of each slot (E: padding)
  const std::int32_t* order;  // flat assignment (t·K + j) of each slot
  const T* gates;
  index_t gate_stride, k, experts;
  std::int32_t* slot_token;
  std::int32_t* slot_expert;
  T* slot_gate;
  std::int32_t* token_slot;
  SMOE_HOST_DEVICE void operator()(index_t s) const {
    const std::int32_t a = order[s];
    const index_t t = a / k, j = a % k;
    if (keys[s] < experts) {
      slot_token[s] = static_cast<std::int32_t>(t);
      slot_expert[s] = keys[s];
      slot_gate[s] = gates[t * gate_stride + j];
      token_slot[a] = static_cast<std::int32_t>(s);
    } else {
      slot_token[s] = -1;
      slot_expert[s] = static_cast<std::int32_t>(experts);
      slot_gate[s] = T(0);
      token_slot[a] = -1;
    }
  }
};

}  // namespace cuda_kernels

// Builds `out` on `stream` from ids [T, K] (expert id, or -1 for an empty assignment) and gates
// [T, K], both device views. Shapes are checked on the host; ids are not (that would need their
// values): ids outside [-1, E) become empty assignments and raise out.invalid_ids.
template <class T>
void build_dispatch(ConstMatrixView<std::int32_t, cuda> ids, std::type_identity_t<ConstMatrixView<T, cuda>> gates,
                    index_t experts, Dispatch<T, cuda>& out, cuda_stream stream) {
  using namespace cuda_kernels;
  const char* ctx = "build_dispatch";
  if (experts < 1) fail(ctx, ": experts must be >= 1, got ", experts);
  expect_shape(ctx, "gates", gates, ids.rows, ids.cols);
  const index_t n = ids.rows * ids.cols;
  if (n > index_t{INT32_MAX}) fail(ctx, ": tokens·k must fit int32 offsets, got ", n);
  out.set_stream(stream);
  out.tokens = ids.rows;
  out.k = ids.cols;
  out.experts = experts;
  out.offsets.resize({experts + 1});
  for (auto* t : {&out.slot_token, &out.slot_expert, &out.token_slot}) t->resize({n});
  out.slot_gate.resize({n});
  out.invalid_ids.resize({1});
  out.invalid_ids.zero();
  auto &keys = out.sort_keys, &order = out.sort_order;
  keys.resize({n});
  order.resize({n});
  for_each_index(stream, n, DispatchKeys{ids.data, ids.stride, out.k, experts, keys.data(), order.data(),
                                         out.invalid_ids.data()});
  thrust::stable_sort_by_key(policy(stream), keys.data(), keys.data() + n, order.data());
  fill(out.offsets.data(), 1, std::int32_t{0}, stream);
  // offsets[e + 1] = number of sorted keys <= e
  thrust::upper_bound(policy(stream), keys.data(), keys.data() + n, thrust::counting_iterator<std::int32_t>(0),
                      thrust::counting_iterator<std::int32_t>(static_cast<std::int32_t>(experts)),
                      out.offsets.data() + 1);
  for_each_index(stream, n,
                 DispatchSlots<T>{keys.data(), order.data(), gates.data, gates.stride, out.k, experts,
                                  out.slot_token.data(), out.slot_expert.data(), out.slot_gate.data(),
                                  out.token_slot.data()});
}

// The dispatch on the host (synchronizes), padding removed: for tests and routing statistics.
template <class T>
Dispatch<T> to_host(const Dispatch<T, cuda>& d) {
  Dispatch<T> h;
  h.tokens = d.tokens;
  h.k = d.k;
  h.experts = d.experts;
  const auto offsets = to_host(d.offsets);
  h.offsets.assign(offsets.data(), offsets.data() + offsets.size());
  const std::size_t a = h.offsets.empty() ? 0 : static_cast<std::size_t>(h.offsets.back());
  const auto slot_token = to_host(d.slot_token);
  const auto slot_gate = to_host(d.slot_gate);
  const auto token_slot = to_host(d.token_slot);
  h.slot_token.assign(slot_token.data(), slot_token.data() + a);
  h.slot_gate.assign(slot_gate.data(), slot_gate.data() + a);
  h.token_slot.assign(token_slot.data(), token_slot.data() + token_slot.size());
  return h;
}

}  // namespace smoe
