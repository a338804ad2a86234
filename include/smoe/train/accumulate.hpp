#pragma once
// Gradient accumulation: M micro-batches give the update of one batch of all their tokens.
// Gradients accumulate (backward adds into Parameter::grad), so accumulation is: zero_grad once,
// forward + backward each micro-batch, then one optimizer step. What has to be right is the scale.
//
// For a token-mean loss L = (1/N) Σ_t ℓ_t over the N tokens of the batch, micro-batch i holding
// n_i tokens (Σ n_i = N) must contribute (n_i / N) times the gradient of its own mean loss:
//   (a) seed each micro-batch's backward with dy_i = micro_batch_weight(n_i, N) · ∂mean_i/∂y
//       (the per-token gradient ∂ℓ_t/∂y divided by N, not by n_i); any micro-batch sizes; or
//   (b) backward each micro-batch's own mean loss, then scale_gradients(model, 1.0 / M) once:
//       exact for M micro-batches of equal size (this is what dividing the loss by the number of
//       accumulation steps does in a PyTorch loop).
// Either way the accumulated gradient equals the full batch's, up to the rounding of a
// different summation order. Clip after accumulating, never per micro-batch.
//
// MoE auxiliary losses are batch statistics, not token means: Switch's E·Σ f_e·P_e is a product
// of two batch averages, sigma-MoE's entropy regularizer is the entropy of the batch-mean
// selection distribution and importance is a CV² over the batch, so the loss of the whole batch is
// not the weighted sum of the micro-batches' losses, and no scaling makes accumulation reproduce
// the full-batch aux gradient (z-loss, a token mean of (log Σ e^s)², is the exception). MoE::backward
// adds the aux gradient with weight 1 whatever dy is, so with (a) M micro-batches apply it M
// times; with (b) the result is the gradient of the mean of the micro-batches' aux losses, the
// usual convention, and the coefficient keeps its meaning.
#include <cmath>
#include <string_view>
#include <type_traits>

#include "smoe/core/error.hpp"
#include "smoe/core/parameter.hpp"
#include "smoe/train/gradient_ops.hpp"

namespace smoe {

// Multiplies every gradient of `model` by `factor` (rounded to the gradient's type).
template <HasParameters C>
void scale_gradients(C& model, double factor) {
  if (!std::isfinite(factor)) fail("scale_gradients: factor must be finite, got ", factor);
  model.for_each_parameter([&](std::string_view, auto& p) { gradient_ops_of<decltype(p.grad)>::scale(p.grad, factor); });
}

// n_i / N: the weight of a micro-batch of `micro_tokens` tokens in a batch of `batch_tokens`.
inline double micro_batch_weight(index_t micro_tokens, index_t batch_tokens) {
  if (batch_tokens < 1) fail("micro_batch_weight: batch_tokens must be >= 1, got ", batch_tokens);
  if (micro_tokens < 0 || micro_tokens > batch_tokens)
    fail("micro_batch_weight: micro_tokens must be in [0, batch_tokens = ", batch_tokens, "], got ", micro_tokens);
  return double(micro_tokens) / double(batch_tokens);
}

}  // namespace smoe
