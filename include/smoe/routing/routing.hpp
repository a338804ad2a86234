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

// check_router<R>(): Router<R> with one static_assert per requirement, so that a type which does not
// fit fails on a first error line naming the concept and the member (MoE<> calls it).
template <class R>
constexpr bool check_router() {
  static_assert(requires { typename R::scalar_type; }, "smoe::Router: missing member type `scalar_type` (float or double)");
  if constexpr (requires { typename R::scalar_type; }) {
    using T = typename R::scalar_type;
    using G = gate_type_of_t<R>;  // T, but fp32 routing for the CUDA backend's 16-bit routers
    using S = backend_of_t<R>;
    static_assert(requires(const R& r) { { r.experts() } -> std::convertible_to<index_t>; },
                  "smoe::Router: missing or ill-typed member `index_t experts() const`");
    static_assert(requires(const R& r) { { r.k() } -> std::convertible_to<index_t>; },
                  "smoe::Router: missing or ill-typed member `index_t k() const`");
    static_assert(requires(const R& r) { { r.d_model() } -> std::convertible_to<index_t>; },
                  "smoe::Router: missing or ill-typed member `index_t d_model() const`");
    static_assert(requires(R& r, ConstMatrixView<T, S> x, Routing<G, S>& out, Mode mode) { r.forward(x, out, mode); },
                  "smoe::Router: missing or ill-typed member "
                  "`void forward(ConstMatrixView<T> x, Routing<T>& out, Mode mode)`");
    static_assert(requires(R& r, ConstMatrixView<T, S> x, const Routing<G, S>& routing, ConstMatrixView<G, S> d_gates,
                           MatrixView<G, S> d_logits, MatrixView<T, S> dx) { r.backward(x, routing, d_gates, d_logits, dx); },
                  "smoe::Router: missing or ill-typed member `void backward(ConstMatrixView<T> x, const Routing<T>& "
                  "routing, ConstMatrixView<T> d_gates, MatrixView<T> d_logits, MatrixView<T> dx)`");
  }
  return Router<R>;
}

template <class R>
concept HasRouterLoss = requires(const R& r) {
  { r.aux_loss() } -> std::convertible_to<typename R::scalar_type>;
};

}  // namespace smoe
