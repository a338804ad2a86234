#pragma once
// check_moe<R, X, C, Losses...>(): what MoE<> asks of its parts, as static_asserts whose message
// names the concept and the missing or ill-typed member on the first error line of the compiler
// output (concept constraints on MoE's template parameters would instead report a "template
// constraint failure" and bury the member in notes).
#include <type_traits>

#include "smoe/combine/weighted_sum.hpp"
#include "smoe/core/parameter.hpp"
#include "smoe/experts/experts.hpp"
#include "smoe/losses/balance_loss.hpp"
#include "smoe/routing/routing.hpp"

namespace smoe {

namespace detail {
template <class X>
struct default_combiner {
  using type = WeightedSum<float>;  // X is no Experts type: check_experts reports it
};
template <class X>
  requires requires { typename X::scalar_type; }
struct default_combiner<X> {
  using type = WeightedSum<typename X::scalar_type, backend_of_t<X>>;
};
template <class X>
using default_combiner_t = typename default_combiner<X>::type;

// True when router and combiner have the scalar (activation) type of X, they and the losses its gate
// type (core/config.hpp: the same type on the CPU), or when a part has none (reported elsewhere).
template <class X, class R, class C, class... Losses>
constexpr bool same_scalar_type() {
  constexpr bool named = requires { typename X::scalar_type; } && requires { typename R::scalar_type; } &&
                         requires { typename C::scalar_type; } && (requires { typename Losses::scalar_type; } && ...);
  if constexpr (named) {
    using G = gate_type_of_t<X>;
    return std::is_same_v<typename R::scalar_type, typename X::scalar_type> &&
           std::is_same_v<typename C::scalar_type, typename X::scalar_type> &&
           std::is_same_v<gate_type_of_t<R>, G> && std::is_same_v<gate_type_of_t<C>, G> &&
           (std::is_same_v<typename Losses::scalar_type, G> && ...);
  } else {
    return true;
  }
}

// True when every part has the backend (memory space) of X.
template <class X, class... Parts>
constexpr bool same_backend() {
  return (std::is_same_v<backend_of_t<Parts>, backend_of_t<X>> && ...);
}
}  // namespace detail

template <class R, class X, class C, class... Losses>
constexpr bool check_moe() {
  constexpr bool parts =
      check_router<R>() && check_experts<X>() && check_combiner<C>() && (check_balance_loss<Losses>() && ...);
  static_assert(detail::same_backend<X, R, C, Losses...>(),
                "smoe::MoE: the router, experts, combiner and losses must have the same backend (smoe::cpu or smoe::cuda)");
  static_assert(detail::same_scalar_type<X, R, C, Losses...>(),
                "smoe::MoE: the router, experts, combiner and losses must have the same `scalar_type`");
  static_assert(!Experts<X> || HasParameters<X>,
                "smoe::MoE: the experts need `template <class F> void for_each_parameter(F&& f)`");
  return parts && detail::same_backend<X, R, C, Losses...>() && detail::same_scalar_type<X, R, C, Losses...>();
}

}  // namespace smoe
