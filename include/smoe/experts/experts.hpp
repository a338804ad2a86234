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

// check_experts<X>(): Experts<X> with one static_assert per requirement (a first error line that
// names the concept and the member; MoE<> calls it).
template <class X>
constexpr bool check_experts() {
  static_assert(requires { typename X::scalar_type; }, "smoe::Experts: missing member type `scalar_type` (float or double)");
  if constexpr (requires { typename X::scalar_type; }) {
    using T = typename X::scalar_type;
    using S = backend_of_t<X>;
    using D = dispatch_of_t<X>;
    static_assert(requires(const X& x) { { x.experts() } -> std::convertible_to<index_t>; },
                  "smoe::Experts: missing or ill-typed member `index_t experts() const`");
    static_assert(requires(const X& x) { { x.d_model() } -> std::convertible_to<index_t>; },
                  "smoe::Experts: missing or ill-typed member `index_t d_model() const`");
    static_assert(requires(X& x, ConstMatrixView<T, S> in, const D& dispatch, MatrixView<T, S> ys) {
                    x.forward(in, dispatch, ys);
                  },
                  "smoe::Experts: missing or ill-typed member "
                  "`void forward(ConstMatrixView<T> x, const Dispatch<T>& dispatch, MatrixView<T> ys)`");
    static_assert(requires(X& x, ConstMatrixView<T, S> in, const D& dispatch, ConstMatrixView<T, S> dys,
                           MatrixView<T, S> dx) { x.backward(in, dispatch, dys, dx); },
                  "smoe::Experts: missing or ill-typed member `void backward(ConstMatrixView<T> x, const Dispatch<T>& "
                  "dispatch, ConstMatrixView<T> dys, MatrixView<T> dx)`");
  }
  return Experts<X>;
}

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
