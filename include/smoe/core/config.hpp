#pragma once
// Build configuration shared by every smoe header: index type, backend tags, host/device qualifiers.
// The CPU build never sees CUDA: the qualifiers fall back to plain `inline` without nvcc.
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define SMOE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SMOE_HOST_DEVICE inline
#endif

namespace smoe {

using index_t = std::int64_t;

// Backend tags: components are templated on these instead of being switched by #ifdef. A tag is
// also the memory space of tensors and views: `cpu` is host memory, `cuda` device memory.
struct cpu {};
struct cuda {};

// The backend of a component: its `backend` member type, or cpu for types without one (a user's
// CPU router need not declare it).
template <class C>
struct backend_of {
  using type = cpu;
};
template <class C>
  requires requires { typename C::backend; }
struct backend_of<C> {
  using type = typename C::backend;
};
template <class C>
using backend_of_t = typename backend_of<C>::type;

// The type of a component's gates and router scores: its `gate_type` member, or its scalar_type.
// The CUDA backend keeps routing in fp32 whatever the activations' dtype.
template <class C>
struct gate_type_of {
  using type = typename C::scalar_type;
};
template <class C>
  requires requires { typename C::gate_type; }
struct gate_type_of<C> {
  using type = typename C::gate_type;
};
template <class C>
using gate_type_of_t = typename gate_type_of<C>::type;

// Training enables stochastic parts (expert dropout, noise); eval is deterministic.
enum class Mode { eval, train };

}  // namespace smoe
