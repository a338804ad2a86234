#pragma once
// Global gradient-norm clipping, as torch.nn.utils.clip_grad_norm_(parameters, max_norm) with
// norm_type = 2 (Pascanu et al. 2013, "On the difficulty of training recurrent neural networks"):
//   norm  = sqrt(Σ over every parameter, every element of grad²)
//   scale = min(1, max_norm / (norm + 1e-6))        every grad ← grad · scale
// The norm is summed in double, parameter by parameter in visiting order and element by element
// in storage order, so it is deterministic and independent of the thread count. A gradient too
// large to square in double is measured again scaled by its largest |g|, so a finite gradient
// never reports an infinite norm.
//
// Unlike PyTorch's default (error_if_nonfinite=False, which multiplies every grad by NaN), a NaN
// or infinite norm is only reported: the gradients are left unscaled and ClipResult::finite() is
// false, so the caller can skip the step (or stop) instead of writing NaN into the weights.
#include <algorithm>
#include <cmath>
#include <string_view>
#include <type_traits>

#include "smoe/core/error.hpp"
#include "smoe/core/parameter.hpp"
#include "smoe/train/gradient_ops.hpp"

namespace smoe {

struct ClipResult {
  double norm = 0;   // global L2 norm of the gradients before clipping (NaN/Inf if any is not finite)
  double scale = 1;  // the factor applied to every gradient (1: none)

  bool finite() const { return std::isfinite(norm); }
  bool clipped() const { return scale < 1; }
};

// The global L2 norm of every gradient of `model`, in double.
template <HasParameters C>
double grad_norm(C& model) {
  double sum = 0, largest = 0;
  model.for_each_parameter(
      [&](std::string_view, auto& p) { gradient_ops_of<decltype(p.grad)>::sum_squares(p.grad, 1.0, sum, largest); });
  if (std::isinf(sum) && std::isfinite(largest) && largest > 0) {
    sum = 0;  // only overflowed squares get here: sum (g / largest)² instead
    double unused = 0;
    model.for_each_parameter([&](std::string_view, auto& p) {
      gradient_ops_of<decltype(p.grad)>::sum_squares(p.grad, largest, sum, unused);
    });
    return largest * std::sqrt(sum);
  }
  return std::sqrt(sum);
}

namespace detail {
// Scales every gradient by min(1, max_norm / (norm + 1e-6)), given the norm.
template <HasParameters C>
ClipResult clip_to_norm(C& model, double norm, double max_norm) {
  if (!(max_norm > 0.0)) fail("clip_grad_norm: max_norm must be > 0, got ", max_norm);
  ClipResult r;
  r.norm = norm;
  if (!r.finite()) return r;
  const double coef = max_norm / (r.norm + 1e-6);
  if (coef < 1.0) {
    r.scale = coef;
    // As PyTorch: the grad times the factor rounded to the grad's type.
    model.for_each_parameter([&](std::string_view, auto& p) { gradient_ops_of<decltype(p.grad)>::scale(p.grad, coef); });
  }
  return r;
}
}  // namespace detail

// Scales every gradient of `model` so that the global L2 norm is at most about max_norm (see the
// header comment); returns the norm before clipping. max_norm may be +inf (measure only).
template <HasParameters C>
[[nodiscard]] ClipResult clip_grad_norm(C& model, double max_norm) {
  return detail::clip_to_norm(model, grad_norm(model), max_norm);
}

}  // namespace smoe
