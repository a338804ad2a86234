#pragma once
// FeedForwardExperts<T, Act, cuda>: the E two-layer experts of experts/feed_forward_experts.hpp on
// the device, same parameters and names ("w1" [E, d, fan·G], "w2" [E, G, d], "b1", "b2"), dtype T
// (fp32, bf16, fp16, fp64) with fp32 accumulation (fp64 for double).
//   forward:  pre = x[slot_token]·W1[e] + b1[e]   (tokens gathered in the GEMM's loads)
//             h = act(pre);  ys = h·W2[e] + b2[e]
//   backward: dh = dys·W2[e]ᵀ;  dpre = act'(pre)·dh;  W2.grad[e] += hᵀ·dys;  W1.grad[e] += x[slots]ᵀ·dpre
//             (per-expert reductions over its slots in slot order, no atomics);  dx[t] = Σ_k dpre·W1ᵀ
//             summed per token over its k slots.
// On a GPU, bf16/fp16 GEMMs run on tensor cores (cuda/tensor_core_gemm.cuh); fp32/fp64, the
// emulated build and GemmPath::portable use the portable RowGemm / GroupedOuterSum functors.
#include <string_view>

#include "smoe/core/parameter.hpp"
#include "smoe/cuda/dispatch.cuh"
#include "smoe/cuda/grouped_gemm.cuh"
#include "smoe/cuda/tensor_core_gemm.cuh"
#include "smoe/cuda/weighted_sum.cuh"
#include "smoe/experts/feed_forward_experts.hpp"

namespace smoe {

namespace cuda_kernels {

template <class T, class Act>
struct ActivationForward {
  const T* pre;
  T* h;
  const std::int32_t* assignments;
  index_t G;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    const index_t s = i / G, u = i % G;
    if (s >= *assignments) return;
    using Acc = acc_t<T>;
    const T* row = pre + s * Act::fan * G;
    Acc v[2] = {to_acc(row[u]), Act::fan == 2 ? to_acc(row[G + u]) : Acc(0)};
    h[i] = from_acc<T>(Act::unit(v, 0, 1));
  }
};

template <class T, class Act>
struct ActivationBackward {
  const T* pre;
  const T* dh;
  T* dpre;
  const std::int32_t* assignments;
  index_t G;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    const index_t s = i / G, u = i % G;
    if (s >= *assignments) return;
    using Acc = acc_t<T>;
    const index_t F = Act::fan * G;
    Acc v[2] = {to_acc(pre[s * F + u]), Act::fan == 2 ? to_acc(pre[s * F + G + u]) : Acc(0)};
    Acc dv[2] = {0, 0};
    Act::unit_backward(v, 0, 1, Acc(to_acc(dh[i])), dv);
    dpre[s * F + u] = from_acc<T>(dv[0]);
    if constexpr (Act::fan == 2) dpre[s * F + G + u] = from_acc<T>(dv[1]);
  }
};

}  // namespace cuda_kernels

template <class T, Activation Act>
class FeedForwardExperts<T, Act, cuda> {
  static_assert(UnitActivation<Act>, "FeedForwardExperts<T, Act, cuda>: Act needs the per-unit `unit` and "
                                     "`unit_backward` (experts/activation.hpp) to run on the device");

 public:
  using scalar_type = T;
  using gate_type = acc_t<T>;
  using backend = cuda;
  using activation = Act;
  static constexpr const char* name = "FeedForwardExperts<cuda>";

  explicit FeedForwardExperts(FeedForwardConfig c, cuda_stream stream = {}) : config_((c.validate(name), c)) {
    w1_ = Parameter<T, cuda>({c.experts, c.d_model, Act::fan * c.hidden});
    w2_ = Parameter<T, cuda>({c.experts, c.hidden, c.d_model});
    if (c.bias) {
      b1_ = Parameter<T, cuda>({c.experts, Act::fan * c.hidden});
      b2_ = Parameter<T, cuda>({c.experts, c.d_model});
    }
    set_stream(stream);
  }

  index_t experts() const { return config_.experts; }
  index_t d_model() const { return config_.d_model; }
  index_t hidden() const { return config_.hidden; }
  bool has_bias() const { return config_.bias; }
  const FeedForwardConfig& config() const { return config_; }
  Parameter<T, cuda>& w1() { return w1_; }
  Parameter<T, cuda>& w2() { return w2_; }
  Parameter<T, cuda>& b1() { return b1_; }
  Parameter<T, cuda>& b2() { return b2_; }
  // GemmPath::portable runs the portable GEMMs on a GPU too (the tensor-core kernels' reference).
  void set_gemm_path(cuda_kernels::GemmPath path) { gemm_path_ = path; }
  cuda_stream stream() const { return stream_; }
  void set_stream(cuda_stream s) {
    stream_ = s;
    tile_offsets_.set_stream(s);
    for (auto* p : {&w1_, &w2_, &b1_, &b2_}) {
      p->value.set_stream(s);
      p->grad.set_stream(s);
    }
    for (auto* t : {&pre_, &h_, &dh_, &dpre_, &dxs_}) t->set_stream(s);
  }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("w1"), w1_);
    f(std::string_view("w2"), w2_);
    if (config_.bias) {
      f(std::string_view("b1"), b1_);
      f(std::string_view("b2"), b2_);
    }
  }

  // ys: [dispatch.slots(), d]; rows past the assignment count are left as they are.
  void forward(ConstMatrixView<T, cuda> x, const Dispatch<gate_type, cuda>& dispatch, MatrixView<T, cuda> ys) {
    using namespace cuda_kernels;
    check(x, dispatch);
    expect_shape(name, "ys", ys, dispatch.slots(), d_model());
    const index_t S = dispatch.slots(), d = d_model(), G = hidden(), F = Act::fan * G;
    const std::int32_t* count = dispatch.assignments_device();
    pre_.resize({S, F});
    h_.resize({S, G});
    gemm(dispatch, RowGemm<T, T, T>{x.data, x.stride, dispatch.slot_token.data(), Strided<T>{w1_.value.data(), d * F, F, 1},
                                    dispatch.slot_expert.data(), bias1(), F, count, pre_.data(), F, d, F, false});
    for_each_index(stream_, S * G, ActivationForward<T, Act>{pre_.data(), h_.data(), count, G});
    gemm(dispatch, RowGemm<T, T, T>{h_.data(), G, nullptr, Strided<T>{w2_.value.data(), G * d, d, 1},
                                    dispatch.slot_expert.data(), bias2(), d, count, ys.data, ys.stride, G, d, false});
  }

  void backward(ConstMatrixView<T, cuda> x, const Dispatch<gate_type, cuda>& dispatch, ConstMatrixView<T, cuda> dys,
                MatrixView<T, cuda> dx) {
    using namespace cuda_kernels;
    check(x, dispatch);
    expect_shape(name, "dys", dys, dispatch.slots(), d_model());
    expect_shape(name, "dx", dx, x.rows, d_model());
    if (pre_.rank() != 2 || pre_.dim(0) != dispatch.slots())
      fail(name, ": backward needs the forward of the same dispatch first");
    const index_t S = dispatch.slots(), d = d_model(), G = hidden(), F = Act::fan * G, E = experts();
    const std::int32_t* count = dispatch.assignments_device();
    const std::int32_t* offsets = dispatch.offsets.data();
    dh_.resize({S, G});
    dpre_.resize({S, F});
    dxs_.resize({S, d});
    // dh = dys·W2[e]ᵀ: B(k = c, n = g) = W2[e][g, c]
    gemm(dispatch, RowGemm<T, T, T>{dys.data, dys.stride, nullptr, Strided<T>{w2_.value.data(), G * d, 1, d},
                                    dispatch.slot_expert.data(), nullptr, 0, count, dh_.data(), G, d, G, false});
    for_each_index(stream_, S * G, ActivationBackward<T, Act>{pre_.data(), dh_.data(), dpre_.data(), count, G});
    grouped_outer_sum(stream_, GroupedOuterSum<T, T, T>{h_.data(), G, nullptr, dys.data, dys.stride, offsets, 0,
                                                        w2_.grad.data(), G, d}, E, gemm_path_);
    grouped_outer_sum(stream_, GroupedOuterSum<T, T, T>{x.data, x.stride, dispatch.slot_token.data(), dpre_.data(), F,
                                                        offsets, 0, w1_.grad.data(), d, F}, E, gemm_path_);
    if (config_.bias) {
      grouped_outer_sum(stream_, GroupedOuterSum<T, T, T>{nullptr, 0, nullptr, dys.data, dys.stride, offsets, 0,
                                                          b2_.grad.data(), 1, d}, E, gemm_path_);
      grouped_outer_sum(stream_, GroupedOuterSum<T, T, T>{nullptr, 0, nullptr, dpre_.data(), F, offsets, 0,
                                                          b1_.grad.data(), 1, F}, E, gemm_path_);
    }
    // dxs = dpre·W1[e]ᵀ: B(k = f, n = c) = W1[e][c, f]; then dx[t] = Σ_k dxs[slot(t, k)]
    gemm(dispatch, RowGemm<T, T, T>{dpre_.data(), F, nullptr, Strided<T>{w1_.value.data(), d * F, 1, F},
                                    dispatch.slot_expert.data(), nullptr, 0, count, dxs_.data(), d, F, d, false});
    for_each_index(stream_, x.rows * d,
                   SlotSum<T, gate_type>{dxs_.data(), d, dispatch.token_slot.data(), nullptr, dx.data, dx.stride,
                                         dispatch.k, d});
  }

 private:
  void check(ConstMatrixView<T, cuda> x, const Dispatch<gate_type, cuda>& dispatch) const {
    expect_shape(name, "x", x, dispatch.tokens, d_model());
    expect_equal(name, "dispatch.experts", experts(), dispatch.experts);
  }
  void gemm(const Dispatch<gate_type, cuda>& dispatch, const cuda_kernels::RowGemm<T, T, T>& p) {
    tile_offsets_.resize({experts() + 1});
    cuda_kernels::grouped_row_gemm(stream_, p, dispatch.slots(), dispatch.offsets.data(), experts(),
                                   tile_offsets_.data(), gemm_path_);
  }
  const T* bias1() const { return config_.bias ? b1_.value.data() : nullptr; }
  const T* bias2() const { return config_.bias ? b2_.value.data() : nullptr; }

  FeedForwardConfig config_;
  cuda_stream stream_{};
  Parameter<T, cuda> w1_, w2_, b1_, b2_;
  Tensor<T, cuda> pre_, h_, dh_, dpre_, dxs_;  // forward cache [S, F], [S, G]; backward scratch
  Tensor<std::int32_t, cuda> tile_offsets_;     // [E + 1] scratch of the tensor-core GEMMs
  cuda_kernels::GemmPath gemm_path_ = cuda_kernels::GemmPath::fastest;
};

}  // namespace smoe
