// Every CUDA test source (../CMakeLists.txt lists them) as one nvcc translation unit.
#include "test_cuda_backend.cpp"
#include "test_cuda_routers.cpp"
