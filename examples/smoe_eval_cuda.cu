#include "smoe_eval_cuda.cpp"  // the nvcc build of the CUDA backend part of smoe_eval
