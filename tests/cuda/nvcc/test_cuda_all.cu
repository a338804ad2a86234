// Every CUDA test source (../CMakeLists.txt lists them) as one nvcc translation unit.
#include "test_cuda_backend.cpp"
#include "test_cuda_pools.cpp"
#include "test_cuda_gemm_graph.cpp"
#include "test_cuda_transformer_block.cpp"
#include "test_cuda_attention.cpp"
#include "test_cuda_transformer_layers.cpp"
#include "test_cuda_model.cpp"
#include "test_cuda_routers.cpp"
