#pragma once
// MoE<Router, Experts, Combiner, Losses...>: a sparse mixture-of-experts feed-forward layer.
//
//   forward:  routing = Router(x) → Dispatch (CSR by expert) → ys = Experts(x, dispatch)
//             → y = Combiner(dispatch, ys);  aux_loss = Σ_i coef_i · Loss_i(routing)
//   backward: dy → Combiner⁻¹ (dys, d_gates) → Experts⁻¹ (dx, expert grads)
//             → Losses (d_logits, d_gates) → Router⁻¹ (router grads, dx += ...)
//
// backward(dy) returns the gradient of Σ(y ⊙ dy) + aux_loss: the aux loss enters the objective
// with weight 1 (its coefficients are inside). Parameter gradients accumulate; call zero_grad.
// Like an autograd framework's saved tensors, x is not copied: the memory forward read must hold
// the same values until backward.
#include <cstdint>
#include <string_view>
#include <tuple>
#include <vector>

#include "smoe/combine/weighted_sum.hpp"
#include "smoe/core/buffer.hpp"
#include "smoe/core/dispatch.hpp"
#include "smoe/core/parameter.hpp"
#include "smoe/core/validate.hpp"
#include "smoe/experts/experts.hpp"
#include "smoe/layers/moe_check.hpp"
#include "smoe/layers/routing_stats.hpp"
#include "smoe/layers/timing.hpp"
#include "smoe/losses/balance_loss.hpp"
#include "smoe/routing/capacity.hpp"
#include "smoe/routing/routing.hpp"

namespace smoe {

template <class T>
struct MoEOutput {
  T aux_loss = 0;               // Σ coef_i · loss_i + router_loss
  std::vector<T> loss_values;   // loss_i without its coefficient, in template order
  T router_loss = 0;            // the router's own loss, coefficient included (HasRouterLoss)
  RoutingStats stats;
};

// The parts are checked by static_asserts (layers/moe_check.hpp) rather than constraints here, so a
// part that does not fit is named with its missing member on the first error line. This is the CPU
// layer; MoE of cuda parts is the CUDA backend's specialization (smoe/cuda/moe.cuh).
template <class R, class X, class C = detail::default_combiner_t<X>, class... Losses>
class MoE {
  static_assert(check_moe<R, X, C, Losses...>());

 public:
  using scalar_type = typename X::scalar_type;
  using T = scalar_type;
  static constexpr const char* name = "MoE";

  // Validate inputs for NaN/Inf (forward x, backward dy); on by default in debug builds.
  bool validate_inputs = validate_by_default;
  // Expert capacity for token-choice routers; dropless by default.
  CapacityPolicy capacity{};

  MoE(R router, X experts, C combiner = {}, Losses... losses)
      : router_(std::move(router)), experts_(std::move(experts)), combiner_(std::move(combiner)), losses_(losses...) {
    expect_equal(name, "router.experts() (= experts.experts())", experts_.experts(), router_.experts());
    expect_equal(name, "router.d_model() (= experts.d_model())", experts_.d_model(), router_.d_model());
  }

  index_t d_model() const { return experts_.d_model(); }
  index_t n_experts() const { return experts_.experts(); }
  index_t k() const { return router_.k(); }
  R& router() { return router_; }
  const R& router() const { return router_; }
  X& experts() { return experts_; }
  const X& experts() const { return experts_; }
  C& combiner() { return combiner_; }
  std::tuple<Losses...>& losses() { return losses_; }
  const Routing<T>& routing() const { return routing_; }
  const Dispatch<T>& dispatch() const { return dispatch_; }
  // The router's ids with capacity-dropped assignments set to −1: what the experts computed.
  const Tensor<std::int32_t>& dispatched_experts() const { return dispatched_; }
  // Per-stage wall times are added to *t from now on (null: off, the default; no cost when off).
  void set_times(MoETimes* t) { times_ = t; }

  template <class F>
  void for_each_parameter(F&& f) {
    if constexpr (HasParameters<R>) router_.for_each_parameter(with_prefix("router.", f));
    experts_.for_each_parameter(with_prefix("experts.", f));
  }
  // Non-trained state of the parts (core/buffer.hpp): buffers such as a selection bias, and the
  // step counters of stochastic routers.
  template <class F>
  void for_each_buffer(F&& f) {
    if constexpr (HasBuffers<R>) router_.for_each_buffer(with_prefix("router.", f));
    if constexpr (HasBuffers<X>) experts_.for_each_buffer(with_prefix("experts.", f));
  }
  template <class F>
  void for_each_counter(F&& f) {
    if constexpr (HasCounters<R>) router_.for_each_counter(with_prefix("router.", f));
  }

  MoEOutput<T> forward(ConstMatrixView<T> x, MatrixView<T> y, Mode mode = Mode::eval) {
    const index_t tokens = x.rows, d = d_model(), E = n_experts(), K = k();
    expect_shape(name, "x", x, tokens, d);
    expect_shape(name, "y", y, tokens, d);
    if (validate_inputs) check_finite(name, "x", x);
    if constexpr (requires { R::token_choice; })
      if (!R::token_choice && capacity.enabled())
        fail(name, ": capacity applies to token-choice routers; ", R::name, " sets its own capacity");
    x_ = x;
    has_forward_ = true;

    {
      const ScopedTimer timer = stage(&MoETimes::router_forward);
      router_.forward(x_, routing_, mode);
    }
    expect_shape(name, "router output experts", ConstMatrixView<std::int32_t>(routing_.experts.matrix()), tokens, K);
    expect_shape(name, "router output gates", ConstMatrixView<T>(routing_.gates.matrix()), tokens, K);
    {
      const ScopedTimer timer = stage(&MoETimes::dispatch_forward);
      routing_.dropped = apply_capacity(capacity, E, routing_, dispatched_);
      build_dispatch(std::as_const(dispatched_).matrix(), std::as_const(routing_.gates).matrix(), E, dispatch_);
    }
    if constexpr (fused_combine) {
      const ScopedTimer timer = stage(&MoETimes::experts_forward);
      experts_.forward_weighted(x_, dispatch_, y);
    } else {
      ys_.resize({dispatch_.assignments(), d});
      {
        const ScopedTimer timer = stage(&MoETimes::experts_forward);
        experts_.forward(x_, dispatch_, ys_.matrix());
      }
      const ScopedTimer timer = stage(&MoETimes::combine_forward);
      combiner_.forward(dispatch_, ys_.matrix(), y);
    }

    const ScopedTimer timer = stage(&MoETimes::losses_forward);
    MoEOutput<T> out;
    std::apply([&](auto&... loss) { ((out.loss_values.push_back(loss.forward(routing_, E))), ...); }, losses_);
    std::size_t i = 0;
    std::apply([&](auto&... loss) { ((out.aux_loss += T(loss.coef) * out.loss_values[i++]), ...); }, losses_);
    if constexpr (HasRouterLoss<R>) {
      out.router_loss = router_.aux_loss();
      out.aux_loss += out.router_loss;
    }
    out.stats = compute_routing_stats(routing_, dispatch_);
    return out;
  }

  void backward(ConstMatrixView<T> dy, MatrixView<T> dx) {
    const index_t tokens = dispatch_.tokens, d = d_model(), E = n_experts(), K = k();
    if (!has_forward_) fail(name, ": backward called before forward");
    expect_shape(name, "dy", dy, tokens, d);
    expect_shape(name, "dx", dx, tokens, d);
    if (validate_inputs) check_finite(name, "dy", dy);
    d_gates_.resize({tokens, K});
    // [T, E] for routers with logits; [T, 0] for those without (hash, product keys): nothing flows there.
    d_logits_.resize({tokens, routing_.logits.rank() == 2 ? routing_.logits.dim(1) : 0});
    d_logits_.zero();
    if constexpr (fused_combine) {
      const ScopedTimer timer = stage(&MoETimes::experts_backward);
      experts_.backward_weighted(x_, dispatch_, dy, d_gates_.matrix(), dx);
    } else {
      const ScopedTimer timer = stage(&MoETimes::combine_backward);
      dys_.resize({dispatch_.assignments(), d});
      combiner_.backward(dispatch_, ys_.matrix(), dy, dys_.matrix(), d_gates_.matrix());
    }
    {
      const ScopedTimer timer = stage(&MoETimes::losses_backward);
      std::apply([&](auto&... loss) { (loss.backward(routing_, E, d_logits_.matrix(), d_gates_.matrix()), ...); },
                 losses_);
    }
    if constexpr (!fused_combine) {
      const ScopedTimer timer = stage(&MoETimes::experts_backward);
      experts_.backward(x_, dispatch_, dys_.matrix(), dx);
    }
    const ScopedTimer timer = stage(&MoETimes::router_backward);
    router_.backward(x_, routing_, d_gates_.matrix(), d_logits_.matrix(), dx);
  }

 private:
  ScopedTimer stage(double MoETimes::*slot) const { return ScopedTimer(times_ ? &(times_->*slot) : nullptr); }

  // Experts that sum their own gated outputs (WeightedExperts) with the plain weighted sum.
  static constexpr bool fused_combine = WeightedExperts<X> && std::is_same_v<C, WeightedSum<T>>;

  R router_;
  X experts_;
  C combiner_;
  std::tuple<Losses...> losses_;
  ConstMatrixView<T> x_;  // the forward input (not copied)
  bool has_forward_ = false;
  MoETimes* times_ = nullptr;  // opt-in per-stage wall times (layers/timing.hpp)
  Routing<T> routing_;
  Tensor<std::int32_t> dispatched_;
  Dispatch<T> dispatch_;
  Tensor<T> ys_;                         // per-slot expert outputs (unless fused_combine)
  Tensor<T> dys_, d_gates_, d_logits_;   // backward scratch
};

}  // namespace smoe
