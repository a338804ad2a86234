#pragma once
// BASE router (Lewis et al. 2021, "BASE Layers: Simplifying Training of Large, Sparse Models"):
//   logits s = x Wᵀ (W: "weight" [E, d]), one expert per token (K = 1)
//   Mode::train: a_t from the exact balanced linear assignment maximizing Σ_t s[t, a_t], every
//                expert receiving T/E of the T tokens of one forward (linear_assignment.hpp; when
//                E does not divide T, ⌊T/E⌋ or ⌈T/E⌉ with the ⌈T/E⌉ experts chosen by the
//                optimization; T < E: T distinct experts)
//   Mode::eval:  a_t = argmax_e s[t, e] (greedy, ties to the smaller expert id)
//   gate = sigmoid(s[t, a_t])  (the paper's σ(h_t · w_{a_t}))
// The assignment is piecewise constant: gradient flows through the gate only (and the balance
// losses). The paper adds the gated expert output to the residual stream, h_t + σ(·) f_{a_t}(h_t);
// smoe's layer returns the gated expert output and the caller adds the residual.
#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>

#include "smoe/core/parameter.hpp"
#include "smoe/routing/linear_assignment.hpp"
#include "smoe/routing/routing.hpp"
#include "smoe/routing/sigmoid_topk.hpp"

namespace smoe {

struct BaseRouterConfig {
  index_t d_model = 0;
  index_t experts = 0;

  void validate(const char* context) const {
    if (d_model < 1) fail(context, ": d_model must be >= 1, got ", d_model);
    if (experts < 1) fail(context, ": experts must be >= 1, got ", experts);
  }
};

// BaseRouter<T, cuda> is the CUDA backend's (smoe/cuda/base_router.cuh).
template <class T, class Backend = cpu>
class BaseRouter {
  static_assert(std::is_same_v<Backend, cpu>, "BaseRouter<T, cuda> needs <smoe/cuda/base_router.cuh>");

 public:
  using scalar_type = T;
  using backend = cpu;
  static constexpr const char* name = "BaseRouter";
  // Training balances the experts exactly by itself: MoE<> refuses a capacity limit on top.
  static constexpr bool token_choice = false;

  explicit BaseRouter(BaseRouterConfig config)
      : config_((config.validate(name), config)),
        linear_({.d_model = config.d_model, .experts = config.experts, .k = 1}) {}

  index_t experts() const { return config_.experts; }
  index_t k() const { return 1; }
  index_t d_model() const { return config_.d_model; }
  const BaseRouterConfig& config() const { return config_; }
  Parameter<T>& weight() { return linear_.weight(); }

  template <class F>
  void for_each_parameter(F&& f) {
    linear_.for_each_parameter(f);
  }

  void forward(ConstMatrixView<T> x, Routing<T>& out, Mode mode) {
    expect_shape(name, "x", x, x.rows, d_model());
    // The projection, greedy top-1 and sigmoid gate are exactly SigmoidTopK's with K = 1.
    linear_.forward(x, out, Mode::eval);
    if (mode != Mode::train) return;
    const index_t tokens = x.rows, E = experts();
    solver_.solve(std::as_const(out.logits).matrix(),
                  std::span<std::int32_t>(out.experts.data(), static_cast<std::size_t>(tokens)));
    for (index_t t = 0; t < tokens; ++t)
      SigmoidGate{}.forward(out.logits.data() + t * E, E, out.experts.data() + t, 1, out.gates.data() + t);
  }

  void backward(ConstMatrixView<T> x, const Routing<T>& r, ConstMatrixView<T> d_gates, MatrixView<T> d_logits,
                MatrixView<T> dx) {
    const index_t tokens = x.rows;
    expect_shape(name, "x", x, tokens, d_model());
    expect_shape(name, "d_gates", d_gates, tokens, 1);
    expect_shape(name, "d_logits", d_logits, tokens, experts());
    expect_shape(name, "dx", dx, tokens, d_model());
    linear_.backward(x, r, d_gates, d_logits, dx);
  }

 private:
  BaseRouterConfig config_;
  SigmoidTopK<T> linear_;
  LinearAssignment solver_;
};

}  // namespace smoe
