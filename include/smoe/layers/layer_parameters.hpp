#pragma once
// Layer-level parameter visiting for layers over a shared expert pool.
//
// A MoE<> layer names its parts "router.…" and "experts.…". Experts over a shared pool own no
// expert weight (the pool's owner visits those once), but SaMoE's handle owns the layer's
// combination logits, which are a parameter of the layer, not of its experts: checkpoints name
// them "layers.{l}.combine", not "layers.{l}.experts.combine". Such experts expose
// `for_each_layer_parameter(f)`, and
//
//   for_each_layer_parameter(layer, f)
//
// visits layer.for_each_parameter(f) and then those, unprefixed. Models and MoEStack visit each
// MoE layer through it (a plain layer.for_each_parameter(f) would miss "combine"). Composites
// around MoE<> (ResidualMoE, SharedExpertsMoE) use it for their inner layer, so their own
// for_each_parameter is complete.
#include <type_traits>
#include <utility>

#include "smoe/core/parameter.hpp"

namespace smoe {

template <class X>
concept HasLayerParameters = requires(X& x, detail::ParameterProbe f) { x.for_each_layer_parameter(f); };

template <HasParameters Layer, class F>
void for_each_layer_parameter(Layer& layer, F&& f) {
  layer.for_each_parameter(f);
  if constexpr (requires { layer.experts(); }) {
    using X = std::remove_reference_t<decltype(layer.experts())>;
    if constexpr (HasLayerParameters<X>) layer.experts().for_each_layer_parameter(f);
  }
}

}  // namespace smoe
