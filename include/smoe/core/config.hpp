#pragma once
// Build configuration shared by every smoe header: index type, backend tags, host/device qualifiers.
// The CPU build never sees CUDA: the qualifiers fall back to plain `inline` without nvcc.
#include <cstdint>

#if defined(__CUDACC__)
#define SMOE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SMOE_HOST_DEVICE inline
#endif

namespace smoe {

using index_t = std::int64_t;

// Backend tags: components are templated on these instead of being switched by #ifdef.
struct cpu {};
struct cuda {};

// Training enables stochastic parts (expert dropout, noise); eval is deterministic.
enum class Mode { eval, train };

}  // namespace smoe
