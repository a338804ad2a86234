#pragma once
// Counter-based random numbers (Philox4x32-10, Salmon et al. 2011): the value at (seed, counter)
// is a pure function, so noise and dropout are reproducible from a seed on any backend and
// any thread schedule, with no generator state to carry between calls.
#include <array>
#include <cmath>
#include <cstdint>

#include "smoe/core/config.hpp"

namespace smoe {

// `stream` selects an independent sequence for the same (seed, counter), e.g. one per training step.
SMOE_HOST_DEVICE std::array<std::uint32_t, 4> philox4x32(std::uint64_t seed, std::uint64_t counter,
                                                         std::uint64_t stream = 0) {
  std::uint32_t c0 = static_cast<std::uint32_t>(counter), c1 = static_cast<std::uint32_t>(counter >> 32);
  std::uint32_t c2 = static_cast<std::uint32_t>(stream), c3 = static_cast<std::uint32_t>(stream >> 32);
  std::uint32_t k0 = static_cast<std::uint32_t>(seed), k1 = static_cast<std::uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const std::uint64_t p0 = std::uint64_t{0xD2511F53u} * c0;
    const std::uint64_t p1 = std::uint64_t{0xCD9E8D57u} * c2;
    const std::uint32_t n0 = static_cast<std::uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const std::uint32_t n2 = static_cast<std::uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<std::uint32_t>(p1);
    c3 = static_cast<std::uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {c0, c1, c2, c3};
}

// Uniform in [0, 1) with 32 random bits, a function of (seed, counter).
SMOE_HOST_DEVICE double uniform01(std::uint64_t seed, std::uint64_t counter, std::uint64_t stream = 0) {
  return philox4x32(seed, counter, stream)[0] * (1.0 / 4294967296.0);
}

// Standard normal (Box-Muller on two 32-bit words), a function of (seed, counter).
SMOE_HOST_DEVICE double standard_normal(std::uint64_t seed, std::uint64_t counter, std::uint64_t stream = 0) {
  const auto r = philox4x32(seed, counter, stream);
  const double u1 = (r[0] + 1.0) * (1.0 / 4294967297.0);  // (0, 1): log stays finite
  const double u2 = r[1] * (1.0 / 4294967296.0);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

}  // namespace smoe
