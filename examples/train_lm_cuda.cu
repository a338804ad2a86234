#include "train_lm_cuda.cpp"  // the nvcc build of train_lm --device cuda
