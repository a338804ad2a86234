#include "cuda_quickstart.cpp"  // the nvcc build of the CUDA quick start
