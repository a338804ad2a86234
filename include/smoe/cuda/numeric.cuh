#pragma once
// Element types of the CUDA backend: float, double, and the 16-bit __nv_bfloat16 and __half.
// Arithmetic runs in acc_t<T> (fp32 for 16-bit and fp32 types, fp64 for double): values are
// loaded with to_acc and stored with from_acc (round to nearest even).
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "smoe/core/config.hpp"

namespace smoe {

using bf16 = __nv_bfloat16;
using fp16 = __half;

template <class T>
inline constexpr bool is_device_scalar_v = std::is_same_v<T, float> || std::is_same_v<T, double> ||
                                           std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;

template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class T>
SMOE_HOST_DEVICE acc_t<T> to_acc(T v) {
  if constexpr (std::is_same_v<T, bf16>)
    return __bfloat162float(v);
  else if constexpr (std::is_same_v<T, fp16>)
    return __half2float(v);
  else
    return v;
}

template <class T>
SMOE_HOST_DEVICE T from_acc(acc_t<T> v) {
  if constexpr (std::is_same_v<T, bf16>)
    return __float2bfloat16_rn(v);
  else if constexpr (std::is_same_v<T, fp16>)
    return __float2half_rn(v);
  else
    return v;
}

// A short name for error messages and benchmark labels.
template <class T>
constexpr const char* dtype_name() {
  if constexpr (std::is_same_v<T, bf16>)
    return "bf16";
  else if constexpr (std::is_same_v<T, fp16>)
    return "fp16";
  else if constexpr (std::is_same_v<T, double>)
    return "fp64";
  else
    return "fp32";
}

}  // namespace smoe
