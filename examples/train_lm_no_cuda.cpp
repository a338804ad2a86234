// train_lm built without a CUDA backend (neither nvcc nor the host-emulated device build):
// --device cuda is refused.
#include "train_lm.hpp"

namespace train_lm {

int run_on_device(Options&) {
  throw usage_error("--device cuda needs train_lm built with the CUDA backend (SMOE_ENABLE_CUDA or SMOE_CUDA_EMULATION)");
}

}  // namespace train_lm
