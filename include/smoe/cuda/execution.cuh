#pragma once
// The CUDA backend's execution shim: streams, stream-ordered allocation, copies between memory
// spaces, and the Thrust policy every device algorithm runs under. Everything else in smoe/cuda/
// is Thrust algorithms and __host__ __device__ functors written against this file, so the same
// sources build two ways:
//   nvcc                 the CUDA runtime; the policy is thrust::cuda::par_nosync on the caller's
//                        stream with a stream-ordered allocator, so no algorithm waits for the GPU.
//   SMOE_CUDA_EMULATION  the host compiler over Thrust's OpenMP system (or its sequential C++ system
//                        without OpenMP): the host-emulated device build that CI tests. Device
//                        memory is host memory, a stream is a tag without effect, copies are memcpy.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#include <thrust/execution_policy.h>
#include <thrust/fill.h>
#include <thrust/for_each.h>
#include <thrust/iterator/counting_iterator.h>

#include "smoe/core/config.hpp"
#include "smoe/core/error.hpp"

#if defined(SMOE_CUDA_EMULATION)
#if THRUST_DEVICE_SYSTEM != THRUST_DEVICE_SYSTEM_OMP && THRUST_DEVICE_SYSTEM != THRUST_DEVICE_SYSTEM_CPP
#error "SMOE_CUDA_EMULATION needs THRUST_DEVICE_SYSTEM=THRUST_DEVICE_SYSTEM_OMP (or _CPP); the smoe::cuda_emulated CMake target sets both"
#endif
#elif defined(__CUDACC__)
#include <cuda_runtime.h>
#include <thrust/system/cuda/execution_policy.h>
#else
#error "smoe/cuda/ headers are compiled by nvcc, or by the host compiler with SMOE_CUDA_EMULATION (docs/cuda.md)"
#endif

namespace smoe {

#if defined(SMOE_CUDA_EMULATION)
// An emulated stream: work runs in call order on the host, so a stream is only a name.
using cuda_stream = struct emulated_stream*;
inline constexpr bool cuda_emulated = true;
#else
using cuda_stream = cudaStream_t;
inline constexpr bool cuda_emulated = false;
#endif

// A CUDA runtime failure (no device, out of memory, a failed launch): not the caller's bad input,
// so not smoe::error.
class cuda_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace cuda_kernels {

#if !defined(SMOE_CUDA_EMULATION)
inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw cuda_error(std::string("smoe cuda: ") + what + ": " + cudaGetErrorName(status) + " (" +
                     cudaGetErrorString(status) + ")");
}

// Temporary storage of Thrust algorithms, allocated in stream order: cudaMalloc/cudaFree would
// synchronize the device inside every sort.
struct StreamAllocator {
  using value_type = char;
  cudaStream_t stream;
  char* allocate(std::ptrdiff_t bytes) {
    void* p = nullptr;
    check(cudaMallocAsync(&p, static_cast<std::size_t>(bytes), stream), "cudaMallocAsync (thrust temporary)");
    return static_cast<char*>(p);
  }
  void deallocate(char* p, std::size_t) { cudaFreeAsync(p, stream); }
};
#endif

// The policy for algorithms on `stream`. Returned as a prvalue holding its allocator by value
// (a policy built from an lvalue allocator keeps a reference that would dangle here).
inline auto policy([[maybe_unused]] cuda_stream stream) {
#if defined(SMOE_CUDA_EMULATION)
  return thrust::device;
#else
  return thrust::cuda::par_nosync(StreamAllocator{stream}).on(stream);
#endif
}

// f(i) for i in [0, n) on the device: the one loop construct of the backend's elementwise work.
template <class F>
void for_each_index(cuda_stream stream, index_t n, const F& f) {
  if (n <= 0) return;
  thrust::for_each_n(policy(stream), thrust::counting_iterator<index_t>(0), n, f);
}

// Device memory for n elements, in stream order. The emulated build fills it with 0xFF bytes
// (NaN for every float type, -1 for integers) so that a kernel that leaves an element unwritten is
// caught by the comparisons with the CPU.
inline void* allocate_bytes(std::size_t bytes, [[maybe_unused]] cuda_stream stream) {
  if (bytes == 0) return nullptr;
#if defined(SMOE_CUDA_EMULATION)
  void* p = ::operator new(bytes, std::align_val_t{256});
  std::memset(p, 0xFF, bytes);
  return p;
#else
  void* p = nullptr;
  check(cudaMallocAsync(&p, bytes, stream), "cudaMallocAsync");
  return p;
#endif
}

inline void free_bytes(void* p, [[maybe_unused]] cuda_stream stream) noexcept {
  if (p == nullptr) return;
#if defined(SMOE_CUDA_EMULATION)
  ::operator delete(p, std::align_val_t{256});
#else
  cudaFreeAsync(p, stream);  // no throw from destructors; a failure here surfaces at the next call
#endif
}

// Copies `bytes` between any two memory spaces, ordered on `stream`. A copy to host memory is
// complete only after synchronize(stream).
inline void copy_bytes(void* dst, const void* src, std::size_t bytes, [[maybe_unused]] cuda_stream stream) {
  if (bytes == 0) return;
#if defined(SMOE_CUDA_EMULATION)
  std::memcpy(dst, src, bytes);
#else
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream), "cudaMemcpyAsync");
#endif
}

// out[i] = i: the identity permutation that index sorts start from.
struct Iota {
  std::int32_t* out;
  SMOE_HOST_DEVICE void operator()(index_t i) const { out[i] = static_cast<std::int32_t>(i); }
};

template <class T>
void fill(T* p, index_t n, T value, cuda_stream stream) {
  if (n > 0) thrust::fill_n(policy(stream), p, n, value);
}

}  // namespace cuda_kernels

// Waits until the work queued on `stream` is done (the only host synchronisation the backend
// offers; the layers never call it themselves).
inline void synchronize([[maybe_unused]] cuda_stream stream) {
#if !defined(SMOE_CUDA_EMULATION)
  cuda_kernels::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
#endif
}

// Whether a CUDA device can run work here: always in the emulated build; with nvcc, whether the
// runtime finds a device (a machine without a GPU or driver says no, and tests skip).
inline bool cuda_device_available(std::string* why = nullptr) {
#if defined(SMOE_CUDA_EMULATION)
  (void)why;
  return true;
#else
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    if (why) *why = status != cudaSuccess ? cudaGetErrorString(status) : "no CUDA device";
    cudaGetLastError();  // clear the sticky error of the failed query
    return false;
  }
  return true;
#endif
}

}  // namespace smoe
