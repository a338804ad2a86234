#pragma once
// Routing<G, cuda>: what a device router fills (routing/routing.hpp's fields in device memory).
#include "smoe/cuda/device_tensor.cuh"
#include "smoe/routing/routing.hpp"

namespace smoe {

// Readies `out` for a device router's forward on `stream`: logits [tokens, logit_cols] (0 for
// routers without logits), experts and gates [tokens, K], nothing dropped.
template <class G>
void prepare_routing(Routing<G, cuda>& out, index_t tokens, index_t logit_cols, index_t K, cuda_stream stream) {
  out.logits.set_stream(stream);
  out.gates.set_stream(stream);
  out.experts.set_stream(stream);
  out.logits.resize({tokens, logit_cols});
  out.experts.resize({tokens, K});
  out.gates.resize({tokens, K});
  out.dropped = 0;
}

}  // namespace smoe
