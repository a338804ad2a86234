#pragma once
// Finite-difference gradient check over every named parameter of a component: central
// differences of a scalar objective against the gradients backward accumulated.
#include <cmath>
#include <functional>
#include <string>
#include <string_view>

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

}  // namespace smoe
