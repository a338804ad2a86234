#pragma once
// TopKRouter: the linear token-choice router shared by softmax and sigmoid gating.
//   logits s = x Wᵀ (+ b, "bias" [E], when config.bias: GPT-OSS's router),  ids = top-k of s (expert dropout during training),
//   gates = Gate policy applied to s at the selected ids.
// Selection on the logits equals selection on sigmoid(s) or softmax(s): both are monotone.
#include <cstdint>
#include <string_view>
#include <type_traits>
#include <vector>

#include "smoe/core/parameter.hpp"
#include "smoe/cpu/parallel.hpp"
#include "smoe/routing/expert_dropout.hpp"
#include "smoe/routing/linear_scores.hpp"
#include "smoe/routing/routing.hpp"
#include "smoe/routing/topk_select.hpp"

namespace smoe {

struct TopKRouterConfig {
  index_t d_model = 0;
  index_t experts = 0;
  index_t k = 1;
  ExpertDropout expert_dropout{};
  bool bias = false;  // a trained logit bias "bias" [E] (GPT-OSS); it enters selection and gates

  void validate(const char* context) const {
    if (d_model < 1) fail(context, ": d_model must be >= 1, got ", d_model);
    if (experts < 1) fail(context, ": experts must be >= 1, got ", experts);
    if (k < 1 || k > experts) fail(context, ": k must be in [1, experts = ", experts, "], got ", k);
    expert_dropout.validate(context);
  }
};

// Gate policies provide, for one token (logits [E], selected ids [K]), as functions callable on the
// host and the device (SMOE_HOST_DEVICE) so both backends share them:
//   forward(logits, E, ids, K, gates)                               gates [K]
//   backward(logits, E, ids, K, gates, d_gates, d_logits)          d_logits [E] += ∂gates/∂logits · d_gates
template <class G, class T>
concept GatePolicy = requires(const G& g, const T* cp, T* p, const std::int32_t* ids, index_t n) {
  g.forward(cp, n, ids, n, p);
  g.backward(cp, n, ids, n, cp, cp, p);
};

// check_gate_policy<G, T>(): GatePolicy<G, T> with one static_assert per member (TopKRouter calls it).
template <class G, class T>
constexpr bool check_gate_policy() {
  static_assert(requires(const G& g, const T* logits, index_t n, const std::int32_t* ids, T* gates) {
                  g.forward(logits, n, ids, n, gates);
                },
                "smoe::GatePolicy: missing or ill-typed member `void forward(const T* logits, index_t E, "
                "const std::int32_t* ids, index_t K, T* gates) const`");
  static_assert(requires(const G& g, const T* logits, index_t n, const std::int32_t* ids, const T* gates,
                         const T* d_gates, T* d_logits) { g.backward(logits, n, ids, n, gates, d_gates, d_logits); },
                "smoe::GatePolicy: missing or ill-typed member `void backward(const T* logits, index_t E, const "
                "std::int32_t* ids, index_t K, const T* gates, const T* d_gates, T* d_logits) const`");
  return GatePolicy<G, T>;
}

// TopKRouter<T, Gate, cuda> is the CUDA backend's (smoe/cuda/topk_router.cuh).
template <class T, class Gate, class Backend = cpu>
class TopKRouter {
  static_assert(std::is_same_v<Backend, cpu>, "TopKRouter<T, Gate, cuda> needs <smoe/cuda/topk_router.cuh>");
  static_assert(check_gate_policy<Gate, T>());

 public:
  using scalar_type = T;
  using backend = cpu;
  static constexpr const char* name = "TopKRouter";

  explicit TopKRouter(TopKRouterConfig config, Gate gate = {})
      : config_((config.validate(name), config)), gate_(gate), weight_({config.experts, config.d_model}) {
    if (config.bias) bias_ = Parameter<T>({config.experts});
  }

  index_t experts() const { return config_.experts; }
  index_t k() const { return config_.k; }
  index_t d_model() const { return config_.d_model; }
  const TopKRouterConfig& config() const { return config_; }
  const Gate& gate() const { return gate_; }
  Parameter<T>& weight() { return weight_; }
  Parameter<T>& bias() { return bias_; }  // empty unless config.bias
  // Training steps taken: the expert-dropout masks of step s depend on (seed, s) only.
  std::uint64_t step() const { return step_; }
  void set_step(std::uint64_t s) { step_ = s; }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("weight"), weight_);
    if (config_.bias) f(std::string_view("bias"), bias_);
  }
  // The step counter (a checkpoint restores it so a resumed run draws the same random numbers).
  template <class F>
  void for_each_counter(F&& f) {
    f(std::string_view("step"), step_);
  }

  void forward(ConstMatrixView<T> x, Routing<T>& out, Mode mode) {
    using namespace cpu_kernels;
    expect_shape(name, "x", x, x.rows, d_model());
    const index_t tokens = x.rows, E = experts(), K = k();
    out.logits.resize({tokens, E});
    out.experts.resize({tokens, K});
    out.gates.resize({tokens, K});
    const bool drop = mode == Mode::train && config_.expert_dropout.enabled();
    const std::uint64_t step = step_;
    scores_.prepare(std::as_const(weight_.value).matrix());
    // One token block per task: its logits GEMM, then selection and gates while the logits are in cache.
    parallel_for_blocks(tokens, token_block, [&](index_t first, index_t last) {
      scores_.forward_block(x.rows_range(first, last), out.logits.matrix().rows_range(first, last));
      std::vector<std::uint8_t> removed(drop ? static_cast<std::size_t>(E) : 0);
      for (index_t t = first; t < last; ++t) {
        const T* s = out.logits.data() + t * E;
        std::int32_t* ids = out.experts.data() + t * K;
        if (config_.bias)
          for (index_t e = 0; e < E; ++e) out.logits[t * E + e] += bias_.value[e];
        if (drop) config_.expert_dropout.mask(step, t, E, removed.data());
        select_topk(s, E, K, ids, drop ? removed.data() : nullptr);
        gate_.forward(s, E, ids, K, out.gates.data() + t * K);
      }
    });
    if (mode == Mode::train) ++step_;
  }

  void backward(ConstMatrixView<T> x, const Routing<T>& r, ConstMatrixView<T> d_gates, MatrixView<T> d_logits,
                MatrixView<T> dx) {
    using namespace cpu_kernels;
    const index_t tokens = x.rows, E = experts(), K = k();
    expect_shape(name, "d_gates", d_gates, tokens, K);
    expect_shape(name, "d_logits", d_logits, tokens, E);
    expect_shape(name, "dx", dx, tokens, d_model());
    if (tokens == 0) return;
    parallel_for_blocks(tokens, token_block, [&](index_t first, index_t last) {
      for (index_t t = first; t < last; ++t)
        gate_.backward(r.logits.data() + t * E, E, r.experts.data() + t * K, K, r.gates.data() + t * K,
                       d_gates.row(t), d_logits.row(t));
    });
    if (config_.bias)  // ∂s/∂b = 1: the bias gradient sums d_logits over tokens, in token order
      for (index_t t = 0; t < tokens; ++t)
        for (index_t e = 0; e < E; ++e) bias_.grad[e] += d_logits(t, e);
    LinearScores<T>::backward(x, ConstMatrixView<T>(d_logits), std::as_const(weight_.value).matrix(),
                              weight_.grad.matrix(), dx);
  }

 private:
  static constexpr index_t token_block = 128;

  TopKRouterConfig config_;
  Gate gate_;
  Parameter<T> weight_, bias_;
  LinearScores<T> scores_;
  std::uint64_t step_ = 0;
};

}  // namespace smoe
