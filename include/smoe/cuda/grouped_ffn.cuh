#pragma once
// The grouped GEMM of two-layer experts over a Dispatch on the device, forward and backward, for
// any weights the caller points it at (cpu/grouped_ffn.hpp's CUDA twin: an expert set's own
// parameters, a set tied across layers, members of a SaMoE pool or weights materialized from it):
//   forward:  pre = x[slot_token]·W1[e] + b1[e]   (tokens gathered in the GEMM's loads)
//             h = act(pre);  ys = h·W2[e] + b2[e]
//   backward: dh = dys·W2[e]ᵀ;  dpre = act'(pre)·dh;  gW2[e] += hᵀ·dys;  gW1[e] += x[slots]ᵀ·dpre
//             (per-expert reductions over its slots in slot order, no atomics);
//             dx[t] (+)= Σ_k dpre·W1ᵀ summed per token over its k slots.
// Weights and gradients are device pointers in ExpertWeights / ExpertGradients (the CPU's layout:
// w1 [E, d, fan·G], w2 [E, G, d], b1 [E, fan·G], b2 [E, d]; null biases are skipped). On a GPU,
// bf16/fp16 GEMMs run on tensor cores (cuda/tensor_core_gemm.cuh); fp32/fp64, the emulated build
// and GemmPath::portable use the portable RowGemm / GroupedOuterSum functors.
#include <cstdint>

#include "smoe/cpu/grouped_ffn.hpp"
#include "smoe/cuda/device_tensor.cuh"
#include "smoe/cuda/dispatch.cuh"
#include "smoe/cuda/grouped_gemm.cuh"
#include "smoe/cuda/tensor_core_gemm.cuh"
#include "smoe/cuda/weighted_sum.cuh"

namespace smoe::cuda_kernels {

using cpu_kernels::ExpertGradients;
using cpu_kernels::ExpertWeights;
using cpu_kernels::GroupedFFNShape;

// h = act(pre) per hidden unit of the rows [0, *assignments) (every row when assignments is null);
// pre rows hold fan·G values (SwiGLU: gate half, then up half).
template <class T, class Act>
struct ActivationForward {
  const T* pre;
  T* h;
  const std::int32_t* assignments;
  index_t G;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    const index_t s = i / G, u = i % G;
    if (assignments && s >= *assignments) return;
    using Acc = acc_t<T>;
    const T* row = pre + s * Act::fan * G;
    Acc v[2] = {to_acc(row[u]), Act::fan == 2 ? to_acc(row[G + u]) : Acc(0)};
    h[i] = from_acc<T>(Act::unit(v, 0, 1));
  }
};

// dpre = act'(pre)·dh, the same rows.
template <class T, class Act>
struct ActivationBackward {
  const T* pre;
  const T* dh;
  T* dpre;
  const std::int32_t* assignments;
  index_t G;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    const index_t s = i / G, u = i % G;
    if (assignments && s >= *assignments) return;
    using Acc = acc_t<T>;
    const index_t F = Act::fan * G;
    Acc v[2] = {to_acc(pre[s * F + u]), Act::fan == 2 ? to_acc(pre[s * F + G + u]) : Acc(0)};
    Acc dv[2] = {0, 0};
    Act::unit_backward(v, 0, 1, Acc(to_acc(dh[i])), dv);
    dpre[s * F + u] = from_acc<T>(dv[0]);
    if constexpr (Act::fan == 2) dpre[s * F + G + u] = from_acc<T>(dv[1]);
  }
};

// What forward keeps for backward ([S, fan·G] pre-activations, [S, G] hidden), backward's scratch
// and the tensor-core GEMMs' tile offsets: device buffers on one stream.
template <class T>
struct GroupedFFNDeviceCache {
  Tensor<T, cuda> pre, h, dh, dpre, dxs;
  Tensor<std::int32_t, cuda> tile_offsets;  // [E + 1]
  void set_stream(cuda_stream s) {
    for (auto* t : {&pre, &h, &dh, &dpre, &dxs}) t->set_stream(s);
    tile_offsets.set_stream(s);
  }
  // Whether forward ran on a dispatch of `slots` slots (the check backward makes).
  bool holds(index_t slots) const { return pre.rank() == 2 && pre.dim(0) == slots; }
};

template <class T>
void grouped_ffn_gemm(cuda_stream stream, const Dispatch<acc_t<T>, cuda>& dispatch, const RowGemm<T, T, T>& p,
                      GroupedFFNDeviceCache<T>& cache, GemmPath path) {
  cache.tile_offsets.resize({dispatch.experts + 1});
  grouped_row_gemm(stream, p, dispatch.slots(), dispatch.offsets.data(), dispatch.experts, cache.tile_offsets.data(),
                   path);
}

// ys [dispatch.slots(), d]: rows past the assignment count are left as they are.
template <class T, class Act>
void grouped_ffn_forward(cuda_stream stream, ConstMatrixView<T, cuda> x, const Dispatch<acc_t<T>, cuda>& dispatch,
                         ExpertWeights<T> w, GroupedFFNShape shape, MatrixView<T, cuda> ys, GroupedFFNDeviceCache<T>& cache,
                         GemmPath path) {
  const index_t S = dispatch.slots(), d = shape.d_model, G = shape.hidden, F = Act::fan * G;
  const std::int32_t* count = dispatch.assignments_device();
  cache.pre.resize({S, F});
  cache.h.resize({S, G});
  grouped_ffn_gemm(stream, dispatch,
                   RowGemm<T, T, T>{x.data, x.stride, dispatch.slot_token.data(), Strided<T>{w.w1, d * F, F, 1},
                                    dispatch.slot_expert.data(), w.b1, F, count, cache.pre.data(), F, d, F, false},
                   cache, path);
  for_each_index(stream, S * G, ActivationForward<T, Act>{cache.pre.data(), cache.h.data(), count, G});
  grouped_ffn_gemm(stream, dispatch,
                   RowGemm<T, T, T>{cache.h.data(), G, nullptr, Strided<T>{w.w2, G * d, d, 1}, dispatch.slot_expert.data(),
                                    w.b2, d, count, ys.data, ys.stride, G, d, false},
                   cache, path);
}

// Accumulates into g; writes dx (adds to it with accumulate_dx). Needs the forward of the same
// dispatch in `cache`.
template <class T, class Act>
void grouped_ffn_backward(cuda_stream stream, ConstMatrixView<T, cuda> x, const Dispatch<acc_t<T>, cuda>& dispatch,
                          ExpertWeights<T> w, ExpertGradients<T> g, GroupedFFNShape shape, ConstMatrixView<T, cuda> dys,
                          MatrixView<T, cuda> dx, GroupedFFNDeviceCache<T>& cache, GemmPath path, bool accumulate_dx = false) {
  const index_t S = dispatch.slots(), d = shape.d_model, G = shape.hidden, F = Act::fan * G, E = dispatch.experts;
  const std::int32_t* count = dispatch.assignments_device();
  const std::int32_t* offsets = dispatch.offsets.data();
  cache.dh.resize({S, G});
  cache.dpre.resize({S, F});
  cache.dxs.resize({S, d});
  // dh = dys·W2[e]ᵀ: B(k = c, n = u) = W2[e][u, c]
  grouped_ffn_gemm(stream, dispatch,
                   RowGemm<T, T, T>{dys.data, dys.stride, nullptr, Strided<T>{w.w2, G * d, 1, d}, dispatch.slot_expert.data(),
                                    nullptr, 0, count, cache.dh.data(), G, d, G, false},
                   cache, path);
  for_each_index(stream, S * G, ActivationBackward<T, Act>{cache.pre.data(), cache.dh.data(), cache.dpre.data(), count, G});
  grouped_outer_sum(stream, GroupedOuterSum<T, T, T>{cache.h.data(), G, nullptr, dys.data, dys.stride, offsets, 0, g.w2, G, d},
                    E, path);
  grouped_outer_sum(stream, GroupedOuterSum<T, T, T>{x.data, x.stride, dispatch.slot_token.data(), cache.dpre.data(), F,
                                                     offsets, 0, g.w1, d, F},
                    E, path);
  if (g.b2) grouped_outer_sum(stream, GroupedOuterSum<T, T, T>{nullptr, 0, nullptr, dys.data, dys.stride, offsets, 0, g.b2, 1, d}, E, path);
  if (g.b1) grouped_outer_sum(stream, GroupedOuterSum<T, T, T>{nullptr, 0, nullptr, cache.dpre.data(), F, offsets, 0, g.b1, 1, F}, E, path);
  // dxs = dpre·W1[e]ᵀ: B(k = f, n = c) = W1[e][c, f]; then dx[t] (+)= Σ_k dxs[slot(t, k)]
  grouped_ffn_gemm(stream, dispatch,
                   RowGemm<T, T, T>{cache.dpre.data(), F, nullptr, Strided<T>{w.w1, d * F, 1, F}, dispatch.slot_expert.data(),
                                    nullptr, 0, count, cache.dxs.data(), d, F, d, false},
                   cache, path);
  for_each_index(stream, x.rows * d,
                 SlotSum<T, acc_t<T>>{cache.dxs.data(), d, dispatch.token_slot.data(), nullptr, dx.data, dx.stride,
                                      dispatch.k, d, accumulate_dx});
}

}  // namespace smoe::cuda_kernels
