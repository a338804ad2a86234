#pragma once
// The FeedForward concept: what a transformer block's feed-forward layer must provide, and the
// adapter that calls any of them the same way.
//
//   typename F::scalar_type;  f.d_model()
//   f.forward(x [T, d], y [T, d], mode)  or  f.forward(x, y)
//   f.backward(dy [T, d], dx [T, d])     accumulates parameter gradients, WRITES dx
//
// A three-argument forward may return a result; if it has `aux_loss` (MoE<>'s MoEOutput does),
// that loss is part of the training objective with weight 1 (its coefficients inside), and
// backward must already include its gradient, as MoE::backward does. If it also has `stats`
// (RoutingStats), they are passed on for logging. DenseMLP (forward(x, y)) and every MoE<>
// (dense routers, product-key memory, shared pools) are FeedForward; so is a user's layer with
// these members. Like MoE<>, a feed-forward layer may keep a view of x instead of a copy: the
// caller keeps x alive and unchanged until backward (TransformerBlock owns that buffer).
#include <concepts>
#include <optional>
#include <type_traits>
#include <utility>

#include "smoe/core/config.hpp"
#include "smoe/core/view.hpp"
#include "smoe/layers/routing_stats.hpp"

namespace smoe {

// The views are in F's memory space (backend_of_t<F>: smoe::cpu unless F says otherwise).
template <class F>
concept FeedForward = requires(F& f, const F& cf, ConstMatrixView<typename F::scalar_type, backend_of_t<F>> x,
                               MatrixView<typename F::scalar_type, backend_of_t<F>> y, Mode mode) {
  { cf.d_model() } -> std::convertible_to<index_t>;
  f.backward(x, y);
  requires(requires { f.forward(x, y, mode); } || requires { f.forward(x, y); });
};

// What a block reports from its feed-forward layer: the aux loss (0 for layers without one) and
// the routing statistics of layers that route.
template <class T>
struct FeedForwardOutput {
  T aux_loss = 0;
  std::optional<RoutingStats> stats;
};

// Whether F's forward takes a Mode (MoE<> does; training enables its stochastic parts).
template <class F>
concept FeedForwardWithMode = requires(F& f, ConstMatrixView<typename F::scalar_type, backend_of_t<F>> x,
                                       MatrixView<typename F::scalar_type, backend_of_t<F>> y, Mode mode) {
  f.forward(x, y, mode);
};

// Runs f.forward and collects what it reports (a host value: a device layer's aux loss, a device
// pointer, stays on the device and is not collected).
template <FeedForward F>
FeedForwardOutput<typename F::scalar_type> feed_forward(F& f,
                                                        ConstMatrixView<typename F::scalar_type, backend_of_t<F>> x,
                                                        MatrixView<typename F::scalar_type, backend_of_t<F>> y,
                                                        Mode mode) {
  using T = typename F::scalar_type;
  FeedForwardOutput<T> out;
  if constexpr (FeedForwardWithMode<F>) {
    using R = decltype(f.forward(x, y, mode));
    if constexpr (std::is_void_v<R>) {
      f.forward(x, y, mode);
    } else {
      auto r = f.forward(x, y, mode);
      if constexpr (requires { r.aux_loss; } && !std::is_pointer_v<decltype(r.aux_loss)>) out.aux_loss = T(r.aux_loss);
      if constexpr (requires { RoutingStats(std::move(r.stats)); }) out.stats = std::move(r.stats);
    }
  } else {
    (void)mode;
    f.forward(x, y);
  }
  return out;
}

}  // namespace smoe
