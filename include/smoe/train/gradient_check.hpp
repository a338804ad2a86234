#pragma once
// Finite-difference gradient checks: central differences of a scalar objective against the
// gradients backward computed, over every named parameter of a component
// (check_parameter_gradients) or over a whole layer's parameters and input (check_layer_gradients).
#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "smoe/core/config.hpp"
#include "smoe/core/parameter.hpp"

namespace smoe {

struct GradientCheckResult {
  double worst_error = 0;  // max over checked elements of |analytic − numeric| / max(1, |numeric|)
  std::string worst_parameter;
  index_t worst_index = -1;
  index_t checked = 0;
};

// `objective()` runs the forward pass and returns the scalar whose gradient is in p.grad. At most
// `max_per_parameter` elements of each parameter are checked (evenly spaced).
template <HasParameters C, class Objective>
GradientCheckResult check_parameter_gradients(C& component, Objective&& objective, double eps = 1e-6,
                                              index_t max_per_parameter = 64) {
  GradientCheckResult r;
  component.for_each_parameter([&](std::string_view name, auto& p) {
    const index_t n = p.value.size();
    const index_t step = std::max<index_t>(1, n / std::max<index_t>(1, max_per_parameter));
    for (index_t i = 0; i < n; i += step) {
      const auto saved = p.value[i];
      p.value[i] = saved + eps;
      const double plus = objective();
      p.value[i] = saved - eps;
      const double minus = objective();
      p.value[i] = saved;
      const double numeric = (plus - minus) / (2 * eps);
      const double err = std::abs(double(p.grad[i]) - numeric) / std::max(1.0, std::abs(numeric));
      ++r.checked;
      if (!(err <= r.worst_error)) {  // NaN counts as worst
        r.worst_error = std::isnan(err) ? INFINITY : err;
        r.worst_parameter = std::string(name);
        r.worst_index = i;
      }
    }
  });
  return r;
}

struct LayerGradientCheckResult {
  GradientCheckResult parameters;  // every parameter the layer visits
  double input_error = 0;          // the same measure over dx
  index_t input_index = -1;        // the element of x with the worst error
  index_t input_checked = 0;

  double worst_error() const { return std::max(parameters.worst_error, input_error); }
};

// The whole-layer check: a layer with `forward(x, y, mode)` and `backward(dy, dx)` (MoE<...> and
// every smoe layer) is checked on the objective
//   f(x, θ) = Σ y ⊙ dy + aux_loss        (aux_loss: when forward returns a struct that has one),
// whose gradient backward(dy) returns: every parameter's .grad (at most max_per_parameter evenly
// spaced elements of each) and every element of dx. x is perturbed in place and restored. The
// forward must be deterministic in `mode` (Mode::eval, or training without random draws).
template <class Layer, class T>
LayerGradientCheckResult check_layer_gradients(Layer& layer, Tensor<T>& x, const Tensor<T>& dy,
                                               Mode mode = Mode::eval, double eps = 1e-6,
                                               index_t max_per_parameter = 2000) {
  const index_t tokens = x.dim(0), d = x.dim(1);
  Tensor<T> y({tokens, d}), dx({tokens, d});
  const auto objective = [&] {
    double f = 0;
    if constexpr (std::is_void_v<decltype(layer.forward(std::as_const(x).matrix(), y.matrix(), mode))>) {
      layer.forward(std::as_const(x).matrix(), y.matrix(), mode);
    } else {
      const auto out = layer.forward(std::as_const(x).matrix(), y.matrix(), mode);
      if constexpr (requires { out.aux_loss; }) f = double(out.aux_loss);
    }
    for (index_t i = 0; i < y.size(); ++i) f += double(y[i]) * double(dy[i]);
    return f;
  };
  zero_grad(layer);
  objective();
  layer.backward(dy.matrix(), dx.matrix());
  LayerGradientCheckResult r;
  r.parameters = check_parameter_gradients(layer, objective, eps, max_per_parameter);
  for (index_t i = 0; i < x.size(); ++i) {
    const T saved = x[i];
    x[i] = T(saved + eps);
    const double plus = objective();
    x[i] = T(saved - eps);
    const double minus = objective();
    x[i] = saved;
    const double numeric = (plus - minus) / (2 * eps);
    const double err = std::abs(double(dx[i]) - numeric) / std::max(1.0, std::abs(numeric));
    ++r.input_checked;
    if (!(err <= r.input_error)) {  // NaN counts as worst
      r.input_error = std::isnan(err) ? INFINITY : err;
      r.input_index = i;
    }
  }
  return r;
}

}  // namespace smoe
