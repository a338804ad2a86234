#pragma once
// WeightedSum<T, cuda>: y[t] = Σ_k gate[t, k] · ys[slot(t, k)], per output element as a gather over
// the token's k slots (no scatter, no atomics: deterministic), empty assignments skipped.
//   backward: dys[s] = gate[s] · dy[token(s)],  d_gates[t, k] = <dy[t], ys[slot(t, k)]>.
// Gates are fp32 (fp64 for T = double); the sums run in that type.
#include <cstdint>

#include "smoe/combine/weighted_sum.hpp"
#include "smoe/cuda/dispatch.cuh"

namespace smoe {

namespace cuda_kernels {

// out[t, c] (+)= Σ_k w(t, k) · src[slot(t, k), c], w = the slot's gate (or 1 when gates is null).
template <class T, class G>
struct SlotSum {
  const T* src;
  index_t src_stride;
  const std::int32_t* token_slot;
  const G* slot_gate;  // null: unweighted
  T* out;
  index_t out_stride, K, d;
  bool accumulate;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    const index_t t = i / d, c = i % d;
    using Acc = acc_t<T>;
    Acc sum = 0;
    for (index_t j = 0; j < K; ++j) {
      const std::int32_t s = token_slot[t * K + j];
      if (s < 0) continue;
      const Acc v = Acc(to_acc(src[s * src_stride + c]));
      sum += slot_gate ? Acc(slot_gate[s]) * v : v;
    }
    T& o = out[t * out_stride + c];
    o = from_acc<T>(accumulate ? Acc(to_acc(o)) + sum : sum);
  }
};

template <class T, class G>
struct GateGradient {
  const T* dy;
  index_t dy_stride;
  const T* ys;
  index_t ys_stride;
  const std::int32_t* token_slot;
  G* d_gates;
  index_t d_gates_stride, K, d;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    const index_t t = i / K, j = i % K;
    const std::int32_t s = token_slot[i];
    G sum = 0;
    if (s >= 0)
      for (index_t c = 0; c < d; ++c) sum += G(to_acc(dy[t * dy_stride + c])) * G(to_acc(ys[s * ys_stride + c]));
    d_gates[t * d_gates_stride + j] = sum;
  }
};

template <class T, class G>
struct ScaleSlots {
  const T* dy;
  index_t dy_stride;
  const std::int32_t* slot_token;
  const G* slot_gate;
  const std::int32_t* assignments;
  T* dys;
  index_t dys_stride, d;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    const index_t s = i / d, c = i % d;
    if (s >= *assignments) return;
    dys[s * dys_stride + c] = from_acc<T>(acc_t<T>(slot_gate[s]) * to_acc(dy[slot_token[s] * dy_stride + c]));
  }
};

}  // namespace cuda_kernels

template <class T>
struct WeightedSum<T, cuda> {
  using scalar_type = T;
  using gate_type = acc_t<T>;
  using backend = cuda;
  using G = gate_type;
  static constexpr const char* name = "WeightedSum<cuda>";

  // ys, dys: [dispatch.slots(), d] (rows past the assignment count are not read or written).
  void forward(const Dispatch<G, cuda>& dispatch, ConstMatrixView<T, cuda> ys, MatrixView<T, cuda> y) const {
    const index_t d = y.cols;
    expect_shape(name, "ys", ys, dispatch.slots(), d);
    expect_shape(name, "y", y, dispatch.tokens, d);
    cuda_kernels::for_each_index(dispatch.offsets.stream(), dispatch.tokens * d,
                                 cuda_kernels::SlotSum<T, G>{ys.data, ys.stride, dispatch.token_slot.data(),
                                                             dispatch.slot_gate.data(), y.data, y.stride, dispatch.k, d,
                                                             false});
  }

  void backward(const Dispatch<G, cuda>& dispatch, ConstMatrixView<T, cuda> ys, ConstMatrixView<T, cuda> dy,
                MatrixView<T, cuda> dys, MatrixView<G, cuda> d_gates) const {
    const index_t d = dy.cols, K = dispatch.k;
    const cuda_stream stream = dispatch.offsets.stream();
    expect_shape(name, "dy", dy, dispatch.tokens, ys.cols);
    expect_shape(name, "ys", ys, dispatch.slots(), d);
    expect_shape(name, "dys", dys, dispatch.slots(), d);
    expect_shape(name, "d_gates", d_gates, dispatch.tokens, K);
    // d_gates reads ys before dys is written, so dys may alias ys (as on the CPU).
    cuda_kernels::for_each_index(stream, dispatch.tokens * K,
                                 cuda_kernels::GateGradient<T, G>{dy.data, dy.stride, ys.data, ys.stride,
                                                                  dispatch.token_slot.data(), d_gates.data,
                                                                  d_gates.stride, K, d});
    cuda_kernels::for_each_index(stream, dispatch.slots() * d,
                                 cuda_kernels::ScaleSlots<T, G>{dy.data, dy.stride, dispatch.slot_token.data(),
                                                                dispatch.slot_gate.data(), dispatch.assignments_device(),
                                                                dys.data, dys.stride, d});
  }
};

}  // namespace smoe
