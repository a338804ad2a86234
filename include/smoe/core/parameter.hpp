#pragma once
// Named parameters with gradients. Every trainable component exposes
// `for_each_parameter(f)` calling `f(name, Parameter<T>&)` for each of its tensors, with names
// such as "router.weight" or "experts.w1", so optimizers, checkpoints and gradient checks are
// written once for every component.
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "smoe/core/tensor.hpp"

namespace smoe {

// Space = cuda keeps both on the device (the CUDA backend's components).
template <class T, class Space = cpu>
struct Parameter {
  Tensor<T, Space> value;
  Tensor<T, Space> grad;  // same shape as value; backward accumulates into it

  Parameter() = default;
  explicit Parameter(std::vector<index_t> shape) : value(shape), grad(shape) {
    value.zero();
    grad.zero();
  }
  void zero_grad() { grad.zero(); }
};

// A visitor that prepends `prefix` to the names it forwards: how composites name their parts.
template <class F>
auto with_prefix(std::string prefix, F& f) {
  return [prefix = std::move(prefix), &f](std::string_view name, auto& parameter) {
    f(prefix + std::string(name), parameter);
  };
}

namespace detail {
struct ParameterProbe {
  template <class P>
  void operator()(std::string_view, P&) const {}
};
}  // namespace detail

template <class C>
concept HasParameters = requires(C& c, detail::ParameterProbe f) { c.for_each_parameter(f); };

// How a parameter's gradient relates to those of the other ranks of a distributed run (dist/):
//   replicated  every rank holds a copy and its gradient from its own tokens: data parallelism
//               sums or averages it over ranks (allreduce_gradients)
//   sharded     a part only this rank holds (an expert-parallel layer's experts): its gradient is
//               already complete, from every rank's tokens
//   reduced     a replicated copy whose gradient the layer already summed over ranks in backward
// A component says which with `GradientSharding sharding(std::string_view name) const`; without
// it every parameter is replicated (gradient_sharding).
enum class GradientSharding { replicated, sharded, reduced };

template <class C>
GradientSharding gradient_sharding(const C& component, std::string_view name) {
  if constexpr (requires { component.sharding(name); }) return component.sharding(name);
  else return GradientSharding::replicated;
}

template <HasParameters C>
void zero_grad(C& component) {
  component.for_each_parameter([](std::string_view, auto& p) { p.zero_grad(); });
}

template <HasParameters C>
index_t parameter_count(C& component) {
  index_t n = 0;
  component.for_each_parameter([&](std::string_view, auto& p) { n += p.value.size(); });
  return n;
}

}  // namespace smoe
