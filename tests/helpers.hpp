#pragma once
// Shared test helpers: seeded random tensors and named approximate comparisons.
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include <smoe/core/rng.hpp>
#include <smoe/core/tensor.hpp>

#include "catch.hpp"

namespace smoe::test {

// A [rows, cols] tensor with N(0, std²) entries from a seed.
template <class T>
Tensor<T> random_matrix(index_t rows, index_t cols, std::uint64_t seed, double std = 1.0) {
  Tensor<T> t({rows, cols});
  for (index_t i = 0; i < t.size(); ++i) t[i] = T(std * standard_normal(seed, std::uint64_t(i), 77));
  return t;
}

template <class T>
void randomize(Tensor<T>& t, std::uint64_t seed, double std = 1.0) {
  for (index_t i = 0; i < t.size(); ++i) t[i] = T(std * standard_normal(seed, std::uint64_t(i), 78));
}

// |a - b| <= abs_tol + rel_tol·|b| for every element; reports the first element that is not.
template <class A, class B>
void require_close(const A& actual, const B& expected, double rel_tol, double abs_tol = 0.0, const char* what = "") {
  REQUIRE(static_cast<std::size_t>(actual.size()) == static_cast<std::size_t>(expected.size()));
  for (std::size_t i = 0; i < static_cast<std::size_t>(actual.size()); ++i) {
    const double a = double(actual[i]), b = double(expected[i]);
    if (!(std::abs(a - b) <= abs_tol + rel_tol * std::abs(b))) {
      std::ostringstream s;
      s << what << " element " << i << ": got " << a << ", expected " << b;
      FAIL(s.str());
    }
  }
}

// Per-type tolerance for comparisons with a double-precision reference.
template <class T>
constexpr double tolerance() {
  return sizeof(T) == 8 ? 1e-12 : 2e-5;
}

}  // namespace smoe::test
