#pragma once
// TopKRouter<T, Gate, cuda>: the linear top-k router of routing/topk_router.hpp on the device.
// Activations x are T (fp32, bf16, fp16, fp64); the weight "weight" [E, d], logits and gates are
// fp32 (fp64 for T = double) whatever T is, as routing is precision-sensitive. The gate policies
// (SoftmaxGate, SigmoidGate, a user's) are the CPU's own __host__ __device__ code, and expert
// dropout draws from the same counter-based RNG: same seed and step → same selection as the CPU.
//   forward:  logits = x·Wᵀ (cuda/linear_scores.cuh), then per token: top-k (with dropout) and gates.
//   backward: d_logits += ∂gates/∂logits · d_gates (gate policy), W.grad += d_logitsᵀ·x (a
//             per-element reduction over tokens in order), dx += d_logits·W.
#include <cstdint>
#include <string_view>

#include "smoe/core/parameter.hpp"
#include "smoe/core/rng.hpp"
#include "smoe/cuda/device_tensor.cuh"
#include "smoe/cuda/linear_scores.cuh"
#include "smoe/cuda/topk.cuh"
#include "smoe/cuda/routing.cuh"
#include "smoe/routing/routing.hpp"
#include "smoe/routing/topk_router.hpp"

namespace smoe {

namespace cuda_kernels {

// ExpertDropout::mask's draw: the same (seed, global token, expert, step) → the same mask.
struct DroppedExperts {
  double rate;
  std::uint64_t seed, step, token;  // token: the global index (ExpertDropout::first_token + t)
  index_t experts;
  SMOE_HOST_DEVICE bool operator()(index_t e) const {
    return uniform01(seed, token * static_cast<std::uint64_t>(experts) + static_cast<std::uint64_t>(e), step) < rate;
  }
};

template <class G, class Gate>
struct SelectAndGate {
  Gate gate;
  const G* logits;
  std::int32_t* ids;
  G* gates;
  index_t E, K;
  bool drop;
  double rate;
  std::uint64_t seed, step, first_token;
  SMOE_HOST_DEVICE void operator()(index_t t) const {
    const G* s = logits + t * E;
    std::int32_t* id = ids + t * K;
    if (drop)
      topk_row(s, E, K, id, DroppedExperts{rate, seed, step, first_token + static_cast<std::uint64_t>(t), E});
    else
      topk_row(s, E, K, id, NotRemoved{});
    gate.forward(s, E, id, K, gates + t * K);
  }
};

template <class G, class Gate>
struct GateBackward {
  Gate gate;
  const G* logits;
  const std::int32_t* ids;
  const G* gates;
  const G* d_gates;
  index_t d_gates_stride;
  G* d_logits;
  index_t d_logits_stride, E, K;
  SMOE_HOST_DEVICE void operator()(index_t t) const {
    gate.backward(logits + t * E, E, ids + t * K, K, gates + t * K, d_gates + t * d_gates_stride,
                  d_logits + t * d_logits_stride);
  }
};

}  // namespace cuda_kernels

template <class T, class Gate>
class TopKRouter<T, Gate, cuda> {
  static_assert(check_gate_policy<Gate, acc_t<T>>());

 public:
  using scalar_type = T;
  using gate_type = acc_t<T>;
  using backend = cuda;
  using G = gate_type;
  static constexpr const char* name = "TopKRouter<cuda>";

  explicit TopKRouter(TopKRouterConfig config, Gate gate = {}, cuda_stream stream = {})
      : config_((config.validate(name), config)), gate_(gate), stream_(stream) {
    if (config.k > cuda_kernels::max_topk)
      fail(name, ": k must be <= ", cuda_kernels::max_topk, " on the CUDA backend, got ", config.k);
    if (config.bias) fail(name, ": a router logit bias is CPU-only so far, got bias = true");
    weight_ = Parameter<G, cuda>({config.experts, config.d_model});
    set_stream(stream);
  }

  index_t experts() const { return config_.experts; }
  index_t k() const { return config_.k; }
  index_t d_model() const { return config_.d_model; }
  const TopKRouterConfig& config() const { return config_; }
  const Gate& gate() const { return gate_; }
  Parameter<G, cuda>& weight() { return weight_; }
  std::uint64_t step() const { return step_; }
  void set_step(std::uint64_t s) { step_ = s; }
  cuda_stream stream() const { return stream_; }
  void set_stream(cuda_stream s) {
    stream_ = s;
    weight_.value.set_stream(s);
    weight_.grad.set_stream(s);
  }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("weight"), weight_);
  }
  template <class F>
  void for_each_counter(F&& f) {
    f(std::string_view("step"), step_);
  }

  void forward(ConstMatrixView<T, cuda> x, Routing<G, cuda>& out, Mode mode) {
    using namespace cuda_kernels;
    expect_shape(name, "x", x, x.rows, d_model());
    const index_t tokens = x.rows, E = experts(), K = k();
    prepare_routing(out, tokens, E, K, stream_);
    linear_scores_forward(stream_, x, weight_.value.data(), E, out.logits.data());
    const bool drop = mode == Mode::train && config_.expert_dropout.enabled();
    for_each_index(stream_, tokens,
                   SelectAndGate<G, Gate>{gate_, out.logits.data(), out.experts.data(), out.gates.data(), E, K, drop,
                                          config_.expert_dropout.rate, config_.expert_dropout.seed, step_,
                                          config_.expert_dropout.first_token});
    if (mode == Mode::train) ++step_;
  }

  void backward(ConstMatrixView<T, cuda> x, const Routing<G, cuda>& r, ConstMatrixView<G, cuda> d_gates,
                MatrixView<G, cuda> d_logits, MatrixView<T, cuda> dx) {
    using namespace cuda_kernels;
    const index_t tokens = x.rows, E = experts(), K = k(), d = d_model();
    expect_shape(name, "d_gates", d_gates, tokens, K);
    expect_shape(name, "d_logits", d_logits, tokens, E);
    expect_shape(name, "dx", dx, tokens, d);
    if (tokens == 0) return;
    for_each_index(stream_, tokens,
                   GateBackward<G, Gate>{gate_, r.logits.data(), r.experts.data(), r.gates.data(), d_gates.data,
                                         d_gates.stride, d_logits.data, d_logits.stride, E, K});
    linear_scores_backward(stream_, x, ConstMatrixView<G, cuda>(d_logits), weight_.value.data(), weight_.grad.data(), dx);
  }

 private:
  TopKRouterConfig config_;
  Gate gate_;
  cuda_stream stream_;
  Parameter<G, cuda> weight_;
  std::uint64_t step_ = 0;
};

}  // namespace smoe
