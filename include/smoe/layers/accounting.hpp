#pragma once
// Parameter and FLOP accounting for MoE layers, routers, expert pools and whole models.
//
// Every pool, experts handle and layer composite in smoe answers
//   index_t total_parameters() const           parameters it owns (shared ones: only the owner)
//   double  active_parameters_per_token() const parameters one token's forward arithmetic reads
//   double  flops_per_token() const             forward FLOPs per token, matrix products only,
//                                               2 per multiply-add (elementwise work counts 0)
// For Experts types, which do not know K, "per token" means per routed assignment (one slot).
// The free functions below give the same three numbers for any component: the member when it
// exists, otherwise a formula for the types that do not carry one:
//   MoE<R, X, ...>:        total = R + X,  active = R + K·X,  FLOPs = R + K·X
//   linear routers:        total = active = their parameters (E·d for TopKRouter), FLOPs = 2·E·d
//                          (a router without members is assumed linear in its parameters)
//   FeedForwardExperts:    total = E·P_e, per assignment P_e and F_e (experts/expert_pool.hpp)
// flops_per_token(layer, tokens_per_step) adds the per-step weight materialization of SaMoE's
// weight-space policy amortized over the tokens of the step.
//
// ModelAccounting sums a model and counts shared parameters once: add_layer() adds a layer's own
// parameters and its per-token numbers, add_shared() a pool's (or tied set's) parameters only —
// the layers that use it already report its active parameters and FLOPs per token.
#include <string_view>
#include <type_traits>

#include "smoe/core/parameter.hpp"
#include "smoe/experts/expert_pool.hpp"
#include "smoe/experts/feed_forward_experts.hpp"

namespace smoe {

namespace detail {
template <class C>
index_t owned_parameter_count(const C& c) {
  // for_each_parameter is not const in smoe; counting only reads the shapes.
  index_t n = 0;
  const_cast<C&>(c).for_each_parameter([&](std::string_view, auto& p) { n += p.value.size(); });
  return n;
}
template <class C>
concept HasAccounting = requires(const C& c) {
  { c.total_parameters() } -> std::convertible_to<index_t>;
  { c.active_parameters_per_token() } -> std::convertible_to<double>;
  { c.flops_per_token() } -> std::convertible_to<double>;
};
template <class C>
concept MoELike = requires(C& c) {
  c.router();
  c.experts();
  c.k();
};
template <class C>
struct is_feed_forward_experts : std::false_type {};
template <class T, Activation Act, class Backend>
struct is_feed_forward_experts<FeedForwardExperts<T, Act, Backend>> : std::true_type {};

// MoE<> has no const accessors yet.
template <class C>
auto& router_of(const C& c) {
  return const_cast<C&>(c).router();
}
template <class C>
auto& experts_of(const C& c) {
  return const_cast<C&>(c).experts();
}
}  // namespace detail

template <class C>
index_t total_parameters(const C& c);
template <class C>
double active_parameters_per_token(const C& c);
template <class C>
double flops_per_token(const C& c);

template <class C>
index_t total_parameters(const C& c) {
  if constexpr (detail::HasAccounting<C>) {
    return c.total_parameters();
  } else if constexpr (detail::MoELike<C>) {
    return total_parameters(detail::router_of(c)) + total_parameters(detail::experts_of(c));
  } else if constexpr (detail::is_feed_forward_experts<C>::value) {
    using Act = typename C::activation;
    return c.experts() * expert_parameters<Act>(c.d_model(), c.hidden(), c.has_bias());
  } else if constexpr (HasParameters<C>) {
    return detail::owned_parameter_count(c);  // a router
  } else {
    return 0;  // no parameters (e.g. a hash router)
  }
}

template <class C>
double active_parameters_per_token(const C& c) {
  if constexpr (detail::HasAccounting<C>) {
    return c.active_parameters_per_token();
  } else if constexpr (detail::MoELike<C>) {
    return active_parameters_per_token(detail::router_of(c)) +
           double(c.k()) * active_parameters_per_token(detail::experts_of(c));
  } else if constexpr (detail::is_feed_forward_experts<C>::value) {
    using Act = typename C::activation;
    return double(expert_parameters<Act>(c.d_model(), c.hidden(), c.has_bias()));
  } else if constexpr (HasParameters<C>) {
    return double(detail::owned_parameter_count(c));
  } else {
    return 0.0;
  }
}

template <class C>
double flops_per_token(const C& c) {
  if constexpr (detail::HasAccounting<C>) {
    return c.flops_per_token();
  } else if constexpr (detail::MoELike<C>) {
    return flops_per_token(detail::router_of(c)) + double(c.k()) * flops_per_token(detail::experts_of(c));
  } else if constexpr (detail::is_feed_forward_experts<C>::value) {
    using Act = typename C::activation;
    return expert_flops<Act>(c.d_model(), c.hidden());
  } else if constexpr (HasParameters<C>) {
    return 2.0 * double(detail::owned_parameter_count(c));  // linear in its parameters: 2·E·d
  } else {
    return 0.0;
  }
}

// FLOPs per forward that do not scale with the tokens: SaMoE's weight-space materialization.
template <class C>
double materialization_flops(const C& c) {
  if constexpr (requires { c.materialization_flops(); }) {
    return c.materialization_flops();
  } else if constexpr (detail::MoELike<C>) {
    return materialization_flops(detail::experts_of(c));
  } else {
    return 0.0;
  }
}

// flops_per_token(c) plus the per-step materialization amortized over `tokens_per_step` tokens.
template <class C>
double flops_per_token(const C& c, index_t tokens_per_step) {
  if (tokens_per_step < 1) fail("flops_per_token: tokens_per_step must be >= 1, got ", tokens_per_step);
  return flops_per_token(c) + materialization_flops(c) / double(tokens_per_step);
}

struct ModelAccounting {
  index_t total_parameters = 0;
  double active_parameters_per_token = 0;
  double flops_per_token = 0;
  double materialization_flops = 0;  // per step, not per token

  // A layer every token goes through: its own parameters and its per-token numbers.
  template <class Layer>
  ModelAccounting& add_layer(const Layer& layer) {
    total_parameters += smoe::total_parameters(layer);
    active_parameters_per_token += smoe::active_parameters_per_token(layer);
    flops_per_token += smoe::flops_per_token(layer);
    materialization_flops += smoe::materialization_flops(layer);
    return *this;
  }
  // A pool or tied set that layers share: counted once, its per-token use is in the layers.
  template <class Pool>
  ModelAccounting& add_shared(const Pool& pool) {
    total_parameters += smoe::total_parameters(pool);
    return *this;
  }
  // Anything else, e.g. attention: 4·d² parameters, all active, 8·d² FLOPs per token.
  ModelAccounting& add(index_t total, double active, double flops) {
    total_parameters += total;
    active_parameters_per_token += active;
    flops_per_token += flops;
    return *this;
  }
  // FLOPs per token with the materialization amortized over a step of `tokens_per_step` tokens.
  double flops_per_token_amortized(index_t tokens_per_step) const {
    if (tokens_per_step < 1) fail("ModelAccounting: tokens_per_step must be >= 1, got ", tokens_per_step);
    return flops_per_token + materialization_flops / double(tokens_per_step);
  }
};

}  // namespace smoe
