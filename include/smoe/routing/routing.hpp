#pragma once
// Routing: what a router produces for a batch of tokens, and the Router concept every router
// (built in or the user's own) satisfies to plug into MoE<>.
//
// Contract of a router R with scalar type T, for x [T, d]:
//   forward(x, routing, mode)   fills routing.logits [T, E] (raw scores the balance losses read;
//                               may be [T, 0] for routers without logits), routing.experts [T, K]
//                               (id in [0, E), or -1 for an empty assignment) and routing.gates [T, K].
//   backward(x, routing, d_gates [T, K], d_logits [T, E], dx [T, d])
//                               d_logits holds the losses' gradient on entry; the router adds the
//                               gates' contribution (skipping ids −1), accumulates its parameter gradients and ADDS its
//                               input gradient into dx.
// Optionally `T aux_loss() const`: a router-owned loss (coefficient included) of the last forward,
// for losses that need the router's internals (noisy top-k's load loss); the router's backward
// then includes its gradient, and MoE<> adds it to the layer's aux loss.
#include <concepts>
#include <cstdint>

#include "smoe/core/config.hpp"
#include "smoe/core/tensor.hpp"

namespace smoe {

template <class T>
struct Routing {
  Tensor<T> logits;
  Tensor<std::int32_t> experts;
  Tensor<T> gates;
  index_t dropped = 0;  // assignments a capacity limit removed in this forward

  index_t tokens() const { return experts.rank() == 2 ? experts.dim(0) : 0; }
  index_t k() const { return experts.rank() == 2 ? experts.dim(1) : 0; }
};

template <class R>
concept Router = requires(R& r, const R& cr, ConstMatrixView<typename R::scalar_type> x,
                          Routing<typename R::scalar_type>& routing, ConstMatrixView<typename R::scalar_type> d_gates,
                          MatrixView<typename R::scalar_type> grad, Mode mode) {
  { cr.experts() } -> std::convertible_to<index_t>;
  { cr.k() } -> std::convertible_to<index_t>;
  { cr.d_model() } -> std::convertible_to<index_t>;
  r.forward(x, routing, mode);
  r.backward(x, std::as_const(routing), d_gates, grad, grad);
};

template <class R>
concept HasRouterLoss = requires(const R& r) {
  { r.aux_loss() } -> std::convertible_to<typename R::scalar_type>;
};

}  // namespace smoe
