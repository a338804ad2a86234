// train_lm built without MPI (SMOE_WITH_MPI off or MPI not found): --expert-parallel is refused.
#include "train_lm.hpp"

namespace train_lm {

int run_expert_parallel(Options&) {
  throw usage_error("--expert-parallel needs train_lm built with MPI (SMOE_WITH_MPI and an MPI found by CMake)");
}

}  // namespace train_lm
