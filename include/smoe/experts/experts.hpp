#pragma once
// The Experts concept: a pool of E experts evaluated over a Dispatch. Experts see only the
// dispatch (which tokens, in which slots), never the router.
//   forward(x [T, d], dispatch, ys [A, d])     ys[s] = expert(slot s)(x[slot_token[s]]), ungated
//   backward(x, dispatch, dys [A, d], dx [T, d])
//                                              accumulates parameter gradients; WRITES
//                                              dx[t] = Σ_k ∂/∂x of slot (t, k), 0 for unrouted tokens
#include <concepts>

#include "smoe/core/dispatch.hpp"

namespace smoe {

// The dispatch experts read: in their backend's memory, gates of their gate type (core/config.hpp).
template <class X>
using dispatch_of_t = Dispatch<gate_type_of_t<X>, backend_of_t<X>>;

template <class X>
concept Experts = requires(X& x, const X& cx, ConstMatrixView<typename X::scalar_type, backend_of_t<X>> in,
                           const dispatch_of_t<X>& dispatch, MatrixView<typename X::scalar_type, backend_of_t<X>> out) {
  { cx.experts() } -> std::convertible_to<index_t>;
  { cx.d_model() } -> std::convertible_to<index_t>;
  x.forward(in, dispatch, out);
  x.backward(in, dispatch, in, out);
};

// Optionally, experts whose per-slot outputs are cheap to read again (rows of a table) may compute
// their gate-weighted sum directly:
//   forward_weighted(x, dispatch, y [T, d])       y[t] = Σ_k gate(t, k) · out(slot(t, k))
//   backward_weighted(x, dispatch, dy, d_gates [T, K], dx)
//                                                 WRITES d_gates(t, k) = <dy[t], out(slot(t, k))>
//                                                 (0 for empty slots) and dx; accumulates parameters
// MoE<> with the WeightedSum combiner then uses them and keeps no [A, d] per-slot buffers.
template <class X>
concept WeightedExperts =
    Experts<X> && requires(X& x, ConstMatrixView<typename X::scalar_type> in,
                           const Dispatch<typename X::scalar_type>& dispatch, MatrixView<typename X::scalar_type> out) {
      x.forward_weighted(in, dispatch, out);
      x.backward_weighted(in, dispatch, in, out, out);
    };

}  // namespace smoe
