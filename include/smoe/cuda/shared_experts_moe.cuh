#pragma once
// SharedExpertsMoE<Layer, Act> of a CUDA layer: layers/shared_experts_moe.hpp on the device
// (DeepSeekMoE's shared experts, y = MoE(x) + Σ_{j<N_s} FFN^shared_j(x)), same parameters
// ("shared.w1" [N_s, d, fan·G_s], ...) and semantics. The shared experts are a
// FeedForwardExperts<T, Act, cuda> (the parameters) run by the grouped GEMM of cuda/grouped_ffn.cuh
// over a device dispatch that sends every token to each of them, built on the device; their outputs are added per token over its N_s slots (a gather, no atomics),
// and their input gradient is added to the inner layer's in the same way. Runs on the inner layer's
// stream; nothing waits for the host.
#include <cstdint>
#include <string_view>

#include "smoe/cuda/feed_forward_experts.cuh"
#include "smoe/cuda/moe.cuh"
#include "smoe/layers/shared_experts_moe.hpp"

namespace smoe {

namespace cuda_kernels {

// ids[t, j] = j, gates[t, j] = 1: every token to every one of the N_s experts.
template <class G>
struct EveryTokenToEveryExpert {
  std::int32_t* ids;
  G* gates;
  index_t n_experts;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    ids[i] = std::int32_t(i % n_experts);
    gates[i] = G(1);
  }
};

}  // namespace cuda_kernels

template <class Layer, Activation Act>
  requires std::same_as<typename Layer::backend, cuda>
class SharedExpertsMoE<Layer, Act> {
 public:
  using scalar_type = typename Layer::scalar_type;
  using T = scalar_type;
  using gate_type = typename Layer::gate_type;
  using G = gate_type;
  using backend = cuda;
  static constexpr const char* name = "SharedExpertsMoE<cuda>";

  SharedExpertsMoE(Layer moe, SharedExpertsConfig c)
      : moe_(std::move(moe)),
        config_((c.validate(name), c)),
        shared_(FeedForwardConfig{.d_model = moe_.d_model(), .experts = c.experts, .hidden = c.hidden, .bias = c.bias}) {
    if (c.sigmoid_gate) fail(name, ": the sigmoid shared-expert gate is CPU-only so far, got sigmoid_gate = true");
    set_stream(moe_.stream());
  }

  index_t d_model() const { return moe_.d_model(); }
  index_t k() const { return moe_.k(); }
  index_t shared_experts() const { return config_.experts; }
  Layer& moe() { return moe_; }
  const Layer& moe() const { return moe_; }
  auto& router() { return moe_.router(); }
  FeedForwardExperts<T, Act, cuda>& shared() { return shared_; }
  const SharedExpertsConfig& config() const { return config_; }

  cuda_stream stream() const { return moe_.stream(); }
  void set_stream(cuda_stream s) {
    moe_.set_stream(s);
    shared_.set_stream(s);
    dispatch_.set_stream(s);
    ids_.set_stream(s);
    gates_.set_stream(s);
    for (auto* t : {&ys_, &dys_}) t->set_stream(s);
    shared_cache_.set_stream(s);
  }

  template <class F>
  void for_each_parameter(F&& f) {
    for_each_layer_parameter(moe_, f);
    shared_.for_each_parameter(with_prefix("shared.", f));
  }

  MoEDeviceOutput<G> forward(ConstMatrixView<T, cuda> x, MatrixView<T, cuda> y, Mode mode = Mode::eval) {
    using namespace cuda_kernels;
    const index_t tokens = x.rows, d = d_model(), Ns = shared_experts();
    expect_shape(name, "x", x, tokens, d);
    expect_shape(name, "y", y, tokens, d);
    const MoEDeviceOutput<G> out = moe_.forward(x, y, mode);
    if (dispatch_.tokens != tokens || dispatch_.experts != Ns) {  // rebuilt when T changes
      ids_.resize({tokens, Ns});
      gates_.resize({tokens, Ns});
      for_each_index(stream(), tokens * Ns, EveryTokenToEveryExpert<G>{ids_.data(), gates_.data(), Ns});
      build_dispatch(std::as_const(ids_).matrix(), std::as_const(gates_).matrix(), Ns, dispatch_, stream());
    }
    ys_.resize({dispatch_.slots(), d});
    grouped_ffn_forward<T, Act>(stream(), x, dispatch_, shared_.weights(), shape(), ys_.matrix(), shared_cache_,
                                shared_.gemm_path());
    for_each_index(stream(), tokens * d,
                   SlotSum<T, G>{ys_.data(), d, dispatch_.token_slot.data(), nullptr, y.data, y.stride, Ns, d, true});
    x_ = x;
    has_forward_ = true;
    return out;
  }

  void backward(ConstMatrixView<T, cuda> dy, MatrixView<T, cuda> dx) {
    using namespace cuda_kernels;
    if (!has_forward_) fail(name, ": backward called before forward");
    const index_t tokens = x_.rows, d = d_model();
    expect_shape(name, "dy", dy, tokens, d);
    expect_shape(name, "dx", dx, tokens, d);
    moe_.backward(dy, dx);
    // Ungated: every slot's output gradient is its token's dy (the dispatch's gates are 1).
    dys_.resize({dispatch_.slots(), d});
    for_each_index(stream(), dispatch_.slots() * d,
                   ScaleSlots<T, G>{dy.data, dy.stride, dispatch_.slot_token.data(), dispatch_.slot_gate.data(),
                                    dispatch_.assignments_device(), dys_.data(), d, d});
    grouped_ffn_backward<T, Act>(stream(), x_, dispatch_, shared_.weights(), shared_.gradients(),
                                 shape(), std::as_const(dys_).matrix(), dx, shared_cache_,
                                 shared_.gemm_path(), /*accumulate_dx=*/true);
  }

  // The inner layer's losses and routing statistics of the last forward (each waits for the stream).
  MoEOutput<G> read_losses() const { return moe_.read_losses(); }
  RoutingStats routing_stats() const { return moe_.routing_stats(); }

  // Accounting as the CPU composite's.
  index_t total_parameters() const { return smoe::total_parameters(moe_) + shared_parameters(); }
  double active_parameters_per_token() const {
    return smoe::active_parameters_per_token(moe_) + double(shared_parameters());
  }
  double flops_per_token() const {
    return smoe::flops_per_token(moe_) + double(shared_experts()) * expert_flops<Act>(d_model(), config_.hidden);
  }

 private:
  cuda_kernels::GroupedFFNShape shape() const { return {d_model(), config_.hidden}; }
  index_t shared_parameters() const {
    return shared_experts() * expert_parameters<Act>(d_model(), config_.hidden, config_.bias);
  }

  Layer moe_;
  SharedExpertsConfig config_;
  FeedForwardExperts<T, Act, cuda> shared_;
  ConstMatrixView<T, cuda> x_;  // the forward input (not copied)
  bool has_forward_ = false;
  Tensor<std::int32_t, cuda> ids_;
  Tensor<G, cuda> gates_;
  Dispatch<G, cuda> dispatch_;  // every token to every shared expert
  Tensor<T, cuda> ys_, dys_;
  cuda_kernels::GroupedFFNDeviceCache<T> shared_cache_;  // the shared experts' forward cache
};

}  // namespace smoe
