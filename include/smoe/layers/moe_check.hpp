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
  using type = WeightedSum<typename X::scalar_type>;
};
template <class X>
using default_combiner_t = typename default_combiner<X>::type;

// True when every part names the scalar type of X, or when a part has none (reported elsewhere).
template <class X, class... Parts>
constexpr bool same_scalar_type() {
  if constexpr ((requires { typename X::scalar_type; } && ... && requires { typename Parts::scalar_type; }))
    return (std::is_same_v<typename Parts::scalar_type, typename X::scalar_type> && ...);
  else
    return true;
}
}  // namespace detail

template <class R, class X, class C, class... Losses>
constexpr bool check_moe() {
  constexpr bool parts =
      check_router<R>() && check_experts<X>() && check_combiner<C>() && (check_balance_loss<Losses>() && ...);
  static_assert(detail::same_scalar_type<X, R, C, Losses...>(),
                "smoe::MoE: the router, experts, combiner and losses must have the same `scalar_type`");
  static_assert(!Experts<X> || HasParameters<X>,
                "smoe::MoE: the experts need `template <class F> void for_each_parameter(F&& f)`");
  return parts && detail::same_scalar_type<X, R, C, Losses...>();
}

}  // namespace smoe
