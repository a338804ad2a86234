// train_lm --device cuda: the trainer of train_lm.hpp over the CUDA backend's components. Compiled
// by nvcc (train_lm_cuda.cu: the GPU) or by the host compiler as the host-emulated device build.
#include <smoe/cuda.cuh>

#include "train_lm.hpp"

namespace train_lm {

int run_on_device(Options& o) { return dispatch<smoe::cuda>(o); }

}  // namespace train_lm
