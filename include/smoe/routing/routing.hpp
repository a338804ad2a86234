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

// Space = cuda: the same fields in device memory (CUDA backend; gates and logits in fp32 there).
template <class T, class Space = cpu>
struct Routing {
  Tensor<T, Space> logits;
  Tensor<std::int32_t, Space> experts;
  Tensor<T, Space> gates;
  index_t dropped = 0;  // assignments a capacity limit removed in this forward

  index_t tokens() const { return experts.rank() == 2 ? experts.dim(0) : 0; }
  index_t k() const { return experts.rank() == 2 ? experts.dim(1) : 0; }
};

// The routing a router fills: in its backend's memory, gates of its gate type (core/config.hpp).
template <class R>
using routing_of_t = Routing<gate_type_of_t<R>, backend_of_t<R>>;

template <class R>
concept Router = requires(R& r, const R& cr, ConstMatrixView<typename R::scalar_type, backend_of_t<R>> x,
                          routing_of_t<R>& routing, ConstMatrixView<gate_type_of_t<R>, backend_of_t<R>> d_gates,
                          MatrixView<gate_type_of_t<R>, backend_of_t<R>> d_logits,
                          MatrixView<typename R::scalar_type, backend_of_t<R>> dx, Mode mode) {
  { cr.experts() } -> std::convertible_to<index_t>;
  { cr.k() } -> std::convertible_to<index_t>;
  { cr.d_model() } -> std::convertible_to<index_t>;
  r.forward(x, routing, mode);
  r.backward(x, std::as_const(routing), d_gates, d_logits, dx);
};

template <class R>
concept HasRouterLoss = requires(const R& r) {
  { r.aux_loss() } -> std::convertible_to<typename R::scalar_type>;
};

}  // namespace smoe
