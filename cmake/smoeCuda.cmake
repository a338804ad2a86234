# The CUDA backend's targets (docs/cuda.md).
#
# smoe::cuda           for .cu files compiled by nvcc: C++20, relaxed constexpr, Eigen kept host-only
#                      (EIGEN_NO_CUDA: the CPU headers the layers share stay plain host code);
#                      links the CUDA runtime and cuBLAS.
# smoe_cuda_emulated   the host-emulated device build: the same headers compiled by the host compiler
#                      over Thrust's OpenMP device system (device memory is host memory).
# smoe_cuda_warnings   warnings for the project's own nvcc targets (errors with SMOE_WERROR, as
#                      smoe_warnings).

if(SMOE_ENABLE_CUDA)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES "80;90")
  endif()
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  add_library(smoe_cuda INTERFACE)
  add_library(smoe::cuda ALIAS smoe_cuda)
  target_link_libraries(smoe_cuda INTERFACE smoe CUDA::cudart CUDA::cublas)  # cuBLAS: cuda/dense_gemm.cuh
  # CMake 3.25 has no CUDA20 dialect flags: pass the standard ourselves.
  target_compile_options(smoe_cuda INTERFACE $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20 --expt-relaxed-constexpr>)
  target_compile_definitions(smoe_cuda INTERFACE EIGEN_NO_CUDA)

  add_library(smoe_cuda_warnings INTERFACE)
  # Without --Werror all-warnings a host function called from device code is only a warning: the
  # project's scripts and CI set SMOE_WERROR.
  if(SMOE_WERROR)
    target_compile_options(smoe_cuda_warnings INTERFACE
                           $<$<COMPILE_LANGUAGE:CUDA>:--Werror all-warnings -Xcompiler=-Wall,-Wextra,-Werror>
                           $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Werror>)
  else()
    target_compile_options(smoe_cuda_warnings INTERFACE $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra>
                           $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra>)
  endif()
  message(STATUS "smoe: CUDA backend with ${CMAKE_CUDA_COMPILER} for architectures ${CMAKE_CUDA_ARCHITECTURES}")
endif()

if(SMOE_CUDA_EMULATION)
  find_package(CUDAToolkit REQUIRED)
  # Thrust's OpenMP system where OpenMP is found, else its sequential C++ system (same results).
  find_package(OpenMP COMPONENTS CXX)
  add_library(smoe_cuda_emulated INTERFACE)
  add_library(smoe::cuda_emulated ALIAS smoe_cuda_emulated)
  set(_smoe_cccl_dirs)
  foreach(dir IN LISTS CUDAToolkit_INCLUDE_DIRS)
    if(EXISTS ${dir}/cccl)
      list(APPEND _smoe_cccl_dirs ${dir}/cccl)
    endif()
  endforeach()
  # SYSTEM: the toolkit's headers are not held to our warning flags.
  target_include_directories(smoe_cuda_emulated SYSTEM INTERFACE ${_smoe_cccl_dirs} ${CUDAToolkit_INCLUDE_DIRS})
  if(OpenMP_CXX_FOUND)
    target_link_libraries(smoe_cuda_emulated INTERFACE smoe OpenMP::OpenMP_CXX)
    target_compile_definitions(smoe_cuda_emulated INTERFACE SMOE_CUDA_EMULATION
                               THRUST_DEVICE_SYSTEM=THRUST_DEVICE_SYSTEM_OMP)
  else()
    target_link_libraries(smoe_cuda_emulated INTERFACE smoe)
    target_compile_definitions(smoe_cuda_emulated INTERFACE SMOE_CUDA_EMULATION
                               THRUST_DEVICE_SYSTEM=THRUST_DEVICE_SYSTEM_CPP)
  endif()
  message(STATUS "smoe: host-emulated CUDA build over ${_smoe_cccl_dirs}")
endif()
