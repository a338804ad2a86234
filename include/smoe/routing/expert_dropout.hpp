#pragma once
// sigma-MoE expert dropout (Csordás et al. 2023, Eq. 22): during training each expert is removed
// from a token's candidates with probability `rate`, independently per (token, expert); the gates
// of the experts that remain are not rescaled. A removed expert ranks below every remaining one,
// so it is chosen only when fewer than K remain (the reference code's fill with score 0 for
// sigmoid gives the same order), and selection never produces an invalid id.
#include <cstdint>

#include "smoe/core/error.hpp"
#include "smoe/core/rng.hpp"

namespace smoe {

struct ExpertDropout {
  double rate = 0.0;       // delta in the paper; 0 disables
  std::uint64_t seed = 0;  // masks are a function of (seed, step, token, expert)
  // The global index of this process's token 0. Expert parallelism splits one batch over ranks;
  // rank r sets the index of its first token in the concatenated batch, so every token keeps the
  // mask it has when one process runs the whole batch.
  std::uint64_t first_token = 0;

  void validate(const char* context) const {
    if (!(rate >= 0.0 && rate < 1.0)) fail(context, ": expert_dropout must be in [0, 1), got ", rate);
  }
  bool enabled() const { return rate > 0.0; }
  // Fills mask[0..experts) for `token` at training step `step`: 1 = removed.
  void mask(std::uint64_t step, index_t token, index_t experts, std::uint8_t* out) const {
    for (index_t e = 0; e < experts; ++e)
      out[e] = uniform01(seed, (first_token + static_cast<std::uint64_t>(token)) * static_cast<std::uint64_t>(experts) +
                                   static_cast<std::uint64_t>(e),
                         step) < rate
                   ? 1
                   : 0;
  }
};

}  // namespace smoe
