#pragma once
// Named buffers: non-trained state that a checkpoint must save but an optimizer must never touch
// (e.g. GroupTopKRouter's selection bias). A component with buffers provides
// `for_each_buffer(f)` calling `f(name, Tensor<T>&)`; composites prefix the names with
// with_prefix, as for parameters. Buffer and parameter names share one namespace in a checkpoint.
#include <cstdint>
#include <string_view>

#include "smoe/core/tensor.hpp"

namespace smoe {

namespace detail {
struct BufferProbe {
  template <class B>
  void operator()(std::string_view, B&) const {}
};
}  // namespace detail

template <class C>
concept HasBuffers = requires(C& c, detail::BufferProbe f) { c.for_each_buffer(f); };

// Visits the buffers of `component`, or nothing when it has none.
template <class C, class F>
void for_each_buffer_of(C& component, F&& f) {
  if constexpr (HasBuffers<C>) component.for_each_buffer(f);
}

// Named counters: integer state that makes a run reproducible, such as the training-step counter
// from which a stochastic router draws its dropout or noise. `for_each_counter(f)` calls
// `f(name, std::uint64_t&)`; a checkpoint saves and restores them so a resumed run continues the
// same random sequence.
namespace detail {
struct CounterProbe {
  void operator()(std::string_view, std::uint64_t&) const {}
};
}  // namespace detail

template <class C>
concept HasCounters = requires(C& c, detail::CounterProbe f) { c.for_each_counter(f); };

template <class C, class F>
void for_each_counter_of(C& component, F&& f) {
  if constexpr (HasCounters<C>) component.for_each_counter(f);
}

}  // namespace smoe
