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

// Central difference (f(v_i + h) − f(v_i − h)) / 2h at element i of v (a Tensor or a vector), in double.
template <class V, class F>
double central_difference(V& v, std::size_t i, double h, F&& f) {
  const auto saved = v[i];
  v[i] = saved + h;
  const double plus = f();
  v[i] = saved - h;
  const double minus = f();
  v[i] = saved;
  return (plus - minus) / (2 * h);
}

// Gradient tolerance: double backward vs double central differences is ~1e-9; float carries its rounding.
template <class T>
constexpr double grad_tolerance() {
  return sizeof(T) == 8 ? 1e-7 : 1e-4;
}

// dx matches the central differences of objective() with respect to every element of x.
template <class F>
void require_input_gradient(Tensor<double>& x, const Tensor<double>& dx, F&& objective, double tol = 1e-7) {
  for (index_t i = 0; i < x.size(); ++i) {
    INFO("dx[" << i << "]");
    CHECK(dx[i] == Approx(central_difference(x, std::size_t(i), 1e-6, objective)).epsilon(tol).margin(tol));
  }
}

}  // namespace smoe::test
