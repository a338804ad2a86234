// Core building blocks: views, tensors, errors, the counter-based RNG and the dispatch CSR, each
// against hand-computed values or an independent naive reference.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <smoe/core/dispatch.hpp>
#include <smoe/core/error.hpp>
#include <smoe/core/parameter.hpp>
#include <smoe/core/rng.hpp>
#include <smoe/core/tensor.hpp>
#include <smoe/core/validate.hpp>
#include <smoe/core/view.hpp>

#include "catch.hpp"
#include "helpers.hpp"

using namespace smoe;

// ---------------------------------------------------------------------------------------------
// error
// ---------------------------------------------------------------------------------------------

TEST_CASE("smoe::error is an invalid_argument and fail/expect_equal format the message", "[core][error]") {
  STATIC_REQUIRE(std::is_base_of_v<std::invalid_argument, smoe::error>);
  REQUIRE_THROWS_AS(fail("ctx: ", "k must be >= ", 1, ", got ", -3), smoe::error);
  REQUIRE_THROWS_WITH(fail("ctx: ", "k must be >= ", 1, ", got ", -3), "ctx: k must be >= 1, got -3");
  REQUIRE_NOTHROW(expect_equal("ctx", "experts", 4, 4));
  REQUIRE_THROWS_AS(expect_equal("ctx", "experts", 4, 5), smoe::error);
  REQUIRE_THROWS_WITH(expect_equal("ctx", "experts", 4, 5), "ctx: experts must be 4, got 5");
}

// ---------------------------------------------------------------------------------------------
// MatrixView
// ---------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("MatrixView addresses row-major memory through its stride", "[core][view]", float, double) {
  using T = TestType;
  std::vector<T> buf(4 * 7);
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = T(i);

  const MatrixView<T> v(buf.data(), 4, 5, 7);  // 4 rows of 5 inside rows of 7
  REQUIRE(v.rows == 4);
  REQUIRE(v.cols == 5);
  REQUIRE(v.stride == 7);
  REQUIRE_FALSE(v.contiguous());
  REQUIRE_FALSE(v.empty());
  for (index_t r = 0; r < 4; ++r) {
    REQUIRE(v.row(r) == buf.data() + r * 7);
    REQUIRE(v.row_span(r).size() == 5);
    REQUIRE(v.row_span(r).data() == buf.data() + r * 7);
    for (index_t c = 0; c < 5; ++c) {
      REQUIRE(&v(r, c) == &buf[static_cast<std::size_t>(r * 7 + c)]);
      REQUIRE(v(r, c) == T(r * 7 + c));
    }
  }
  v(2, 3) = T(-1);  // writes go to the user's buffer
  REQUIRE(buf[2 * 7 + 3] == T(-1));

  // The 3-argument constructor is dense: stride == cols.
  const MatrixView<T> dense(buf.data(), 4, 7);
  REQUIRE(dense.stride == 7);
  REQUIRE(dense.contiguous());
  REQUIRE(&dense(3, 6) == &buf.back());

  // A single row is contiguous whatever its stride.
  REQUIRE(MatrixView<T>(buf.data(), 1, 5, 7).contiguous());
}

TEMPLATE_TEST_CASE("MatrixView::rows_range views the same memory", "[core][view]", float, double) {
  using T = TestType;
  std::vector<T> buf(5 * 6);
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = T(i);
  const MatrixView<T> v(buf.data(), 5, 4, 6);

  const auto mid = v.rows_range(1, 4);
  REQUIRE(mid.rows == 3);
  REQUIRE(mid.cols == 4);
  REQUIRE(mid.stride == 6);
  REQUIRE(mid.data == buf.data() + 6);
  for (index_t r = 0; r < 3; ++r)
    for (index_t c = 0; c < 4; ++c) REQUIRE(&mid(r, c) == &v(r + 1, c));

  const auto all = v.rows_range(0, 5);
  REQUIRE(all.data == v.data);
  REQUIRE(all.rows == 5);

  const auto none = v.rows_range(5, 5);  // empty range at the end
  REQUIRE(none.rows == 0);
  REQUIRE(none.empty());
  REQUIRE(none.cols == 4);

  // An empty view (null data) can still be sliced to an empty range.
  const MatrixView<T> empty(nullptr, 0, 4);
  const auto e2 = empty.rows_range(0, 0);
  REQUIRE(e2.rows == 0);
  REQUIRE(e2.empty());
}

TEST_CASE("MatrixView converts to a const view, never the other way", "[core][view]") {
  STATIC_REQUIRE(std::is_convertible_v<MatrixView<float>, ConstMatrixView<float>>);
  STATIC_REQUIRE_FALSE(std::is_convertible_v<ConstMatrixView<float>, MatrixView<float>>);
  STATIC_REQUIRE_FALSE(std::is_convertible_v<MatrixView<float>, ConstMatrixView<double>>);
  STATIC_REQUIRE_FALSE(std::is_convertible_v<MatrixView<double>, MatrixView<float>>);

  std::vector<float> buf(12, 1.0f);
  const MatrixView<float> v(buf.data(), 2, 5, 6);
  const ConstMatrixView<float> c = v;
  REQUIRE(c.data == v.data);
  REQUIRE(c.rows == 2);
  REQUIRE(c.cols == 5);
  REQUIRE(c.stride == 6);
  STATIC_REQUIRE(std::is_same_v<decltype(c(0, 0)), const float&>);
}

TEST_CASE("MatrixView rejects invalid shapes with smoe::error", "[core][view]") {
  std::vector<double> buf(16);
  REQUIRE_THROWS_AS(MatrixView<double>(buf.data(), -1, 2), smoe::error);
  REQUIRE_THROWS_AS(MatrixView<double>(buf.data(), 2, -1), smoe::error);
  REQUIRE_THROWS_AS(MatrixView<double>(buf.data(), 2, 4, 3), smoe::error);  // stride < cols
  REQUIRE_THROWS_WITH(MatrixView<double>(buf.data(), 2, 4, 3), Catch::Contains("shape [2, 4] with stride 3"));
  REQUIRE_THROWS_WITH(MatrixView<double>(buf.data(), -1, 2), Catch::Contains("shape [-1, 2]"));
  REQUIRE_THROWS_AS(MatrixView<double>(nullptr, 2, 2), smoe::error);
  REQUIRE_THROWS_WITH(MatrixView<double>(nullptr, 2, 3), Catch::Contains("null data"));
  // Null data is fine for an empty view.
  REQUIRE_NOTHROW(MatrixView<double>(nullptr, 0, 3));
  REQUIRE_NOTHROW(MatrixView<double>(nullptr, 3, 0));
  REQUIRE(MatrixView<double>(nullptr, 3, 0).empty());
  REQUIRE(MatrixView<double>().empty());
}

TEST_CASE("expect_shape names the argument and both shapes", "[core][view]") {
  std::vector<float> buf(6);
  const ConstMatrixView<float> v(buf.data(), 3, 2);
  REQUIRE_NOTHROW(expect_shape("ctx", "x", v, 3, 2));
  REQUIRE_THROWS_AS(expect_shape("ctx", "x", v, 2, 3), smoe::error);
  REQUIRE_THROWS_WITH(expect_shape("ctx", "x", v, 2, 3), "ctx: x must be [2, 3], got [3, 2]");
}

TEST_CASE("check_finite names the first bad row and column", "[core][validate]") {
  std::vector<double> buf = {1, 2, 3, 4, 5, 6, 7, 8};
  const ConstMatrixView<double> v(buf.data(), 2, 3, 4);  // column 3 of each row is outside the view
  buf[3] = std::numeric_limits<double>::quiet_NaN();     // outside the view: ignored
  REQUIRE_NOTHROW(check_finite("ctx", "x", v));
  buf[6] = std::numeric_limits<double>::infinity();  // row 1, column 2
  REQUIRE_THROWS_AS(check_finite("ctx", "x", v), smoe::error);
  REQUIRE_THROWS_WITH(check_finite("ctx", "x", v), Catch::Contains("x row 1") && Catch::Contains("column 2"));
}

// ---------------------------------------------------------------------------------------------
// Tensor
// ---------------------------------------------------------------------------------------------

namespace {
bool aligned64(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 64 == 0; }
}  // namespace

TEMPLATE_TEST_CASE("Tensor: shape, element access, fill", "[core][tensor]", float, double, std::int32_t) {
  using T = TestType;
  Tensor<T> t({2, 3, 4});
  REQUIRE(t.rank() == 3);
  REQUIRE(t.size() == 24);
  REQUIRE(t.dim(0) == 2);
  REQUIRE(t.dim(1) == 3);
  REQUIRE(t.dim(2) == 4);
  REQUIRE(t.shape() == std::vector<index_t>{2, 3, 4});
  REQUIRE_THROWS(t.dim(3));
  REQUIRE(t.span().size() == 24);
  for (index_t i = 0; i < t.size(); ++i) t[i] = T(i);
  // The matrix view folds leading dimensions: [2·3, 4].
  const auto m = t.matrix();
  REQUIRE(m.rows == 6);
  REQUIRE(m.cols == 4);
  REQUIRE(m.stride == 4);
  REQUIRE(m(5, 3) == T(23));
  // slice(i) of a rank-3 tensor is matrix i of [n, rows, cols].
  const auto s = t.slice(1);
  REQUIRE(s.rows == 3);
  REQUIRE(s.cols == 4);
  REQUIRE(s.data == t.data() + 12);
  REQUIRE(s(2, 1) == T(12 + 2 * 4 + 1));
  REQUIRE(std::as_const(t).slice(0)(0, 0) == T(0));
  REQUIRE_THROWS_AS(t.slice(2), smoe::error);
  REQUIRE_THROWS_WITH(t.slice(-1), Catch::Contains("index must be in [0, 2), got -1"));
  Tensor<T> flat({5});
  REQUIRE_THROWS_WITH(flat.slice(0), Catch::Contains("rank-3"));
  // A rank-1 tensor is one row.
  REQUIRE(flat.matrix().rows == 1);
  REQUIRE(flat.matrix().cols == 5);
  t.fill(T(3));
  for (index_t i = 0; i < t.size(); ++i) REQUIRE(t[i] == T(3));
  t.zero();
  for (index_t i = 0; i < t.size(); ++i) REQUIRE(t[i] == T(0));
}

TEST_CASE("Tensor: empty shapes and negative dimensions", "[core][tensor]") {
  Tensor<float> t({0, 5});
  REQUIRE(t.size() == 0);
  REQUIRE(t.matrix().rows == 0);
  REQUIRE(t.matrix().cols == 5);
  REQUIRE(t.matrix().empty());
  Tensor<float> none;  // a default tensor is empty: rank 1, shape [0]
  REQUIRE(none.size() == 0);
  REQUIRE(none.shape() == std::vector<index_t>{0});
  REQUIRE(none.matrix().empty());
  REQUIRE_THROWS_AS(Tensor<float>({3, -2}), smoe::error);
  REQUIRE_THROWS_WITH(Tensor<float>({3, -2}), Catch::Contains("negative dimension -2"));
  REQUIRE_THROWS_AS(t.resize({-1}), smoe::error);
}

TEMPLATE_TEST_CASE("Tensor: resize keeps the allocation when it is large enough", "[core][tensor]", float, double) {
  using T = TestType;
  Tensor<T> t({8, 16});
  const T* p = t.data();
  t.resize({4, 4});
  REQUIRE(t.data() == p);
  REQUIRE(t.size() == 16);
  REQUIRE(t.shape() == std::vector<index_t>{4, 4});
  t.resize({0, 16});
  REQUIRE(t.data() == p);
  REQUIRE(t.size() == 0);
  t.resize({16, 8});  // back to the original size: still no reallocation
  REQUIRE(t.data() == p);
  REQUIRE(t.size() == 128);
  // Same size: contents are kept.
  for (index_t i = 0; i < t.size(); ++i) t[i] = T(i);
  t.resize({2, 64});
  REQUIRE(t.data() == p);
  for (index_t i = 0; i < t.size(); ++i) REQUIRE(t[i] == T(i));
  // Growing beyond the capacity reallocates, aligned.
  t.resize({1000});
  REQUIRE(t.size() == 1000);
  REQUIRE(aligned64(t.data()));
  for (index_t i = 0; i < t.size(); ++i) t[i] = T(1);  // whole buffer writable (ASan checks this)
}

TEMPLATE_TEST_CASE("Tensor: data is 64-byte aligned", "[core][tensor]", float, double, std::int32_t, std::uint8_t) {
  using T = TestType;
  STATIC_REQUIRE(Tensor<T>::alignment == 64);
  for (index_t n : {1, 3, 7, 15, 16, 17, 63, 64, 65, 1001}) {
    Tensor<T> t({n});
    REQUIRE(aligned64(t.data()));
    Tensor<T> u({n, 3});
    REQUIRE(aligned64(u.data()));
  }
}

TEMPLATE_TEST_CASE("Tensor: copies are deep, moves transfer the buffer", "[core][tensor]", float, double) {
  using T = TestType;
  Tensor<T> a({3, 5});
  for (index_t i = 0; i < a.size(); ++i) a[i] = T(i) * T(0.5);

  Tensor<T> b(a);
  REQUIRE(b.shape() == a.shape());
  REQUIRE(b.data() != a.data());
  REQUIRE(aligned64(b.data()));
  for (index_t i = 0; i < a.size(); ++i) REQUIRE(b[i] == a[i]);
  b[4] = T(-7);
  REQUIRE(a[4] == T(2));  // a is untouched

  Tensor<T> c({100});
  c = a;
  REQUIRE(c.shape() == a.shape());
  REQUIRE(c.size() == 15);
  for (index_t i = 0; i < a.size(); ++i) REQUIRE(c[i] == a[i]);
  c[0] = T(9);
  REQUIRE(a[0] == T(0));

  auto& self = c;
  c = self;  // self-assignment keeps contents
  REQUIRE(c[0] == T(9));
  REQUIRE(c.size() == 15);

  const T* p = a.data();
  Tensor<T> d(std::move(a));
  REQUIRE(d.data() == p);
  REQUIRE(d.size() == 15);
  REQUIRE(d[3] == T(1.5));

  Tensor<T> zero_rows({0, 4});
  Tensor<T> z(zero_rows);
  REQUIRE(z.shape() == std::vector<index_t>{0, 4});
  REQUIRE(z.size() == 0);
}

TEMPLATE_TEST_CASE("Tensor: a copy of a default-constructed tensor is empty too", "[core][tensor]", float, double) {
  // Default-constructed tensors (e.g. the unused bias Parameters of a bias-free layer) are copied
  // with their layer; the copy must equal the original: no elements.
  using T = TestType;
  const Tensor<T> empty;
  REQUIRE(empty.size() == 0);
  const Tensor<T> copy(empty);
  REQUIRE(copy.shape() == empty.shape());
  REQUIRE(copy.size() == 0);
  Tensor<T> assigned({3});
  assigned = empty;
  REQUIRE(assigned.shape() == empty.shape());
  REQUIRE(assigned.size() == 0);
}

namespace {
struct TwoParameters {
  Parameter<double> a{{2, 3}}, b{{5}};
  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("a"), a);
    f(std::string_view("b"), b);
  }
};
}  // namespace

TEST_CASE("Parameter: zero value and gradient of the same shape; visitors", "[core][parameter]") {
  Parameter<double> p({3, 4});
  REQUIRE(p.value.shape() == std::vector<index_t>{3, 4});
  REQUIRE(p.grad.shape() == std::vector<index_t>{3, 4});
  for (index_t i = 0; i < 12; ++i) REQUIRE((p.value[i] == 0 && p.grad[i] == 0));
  p.grad.fill(2.0);
  p.zero_grad();
  for (index_t i = 0; i < 12; ++i) REQUIRE(p.grad[i] == 0);

  TwoParameters two;
  STATIC_REQUIRE(HasParameters<TwoParameters>);
  REQUIRE(parameter_count(two) == 11);
  two.a.grad.fill(1);
  two.b.grad.fill(1);
  zero_grad(two);
  for (index_t i = 0; i < 6; ++i) REQUIRE(two.a.grad[i] == 0);
  for (index_t i = 0; i < 5; ++i) REQUIRE(two.b.grad[i] == 0);
  std::vector<std::string> names;
  auto collect = [&](std::string_view n, auto&) { names.emplace_back(n); };
  two.for_each_parameter(with_prefix("layer.", collect));
  REQUIRE(names == std::vector<std::string>{"layer.a", "layer.b"});
}

// ---------------------------------------------------------------------------------------------
// RNG
// ---------------------------------------------------------------------------------------------

TEST_CASE("philox4x32 matches the Random123 known-answer vectors", "[core][rng]") {
  // Random123 tests/kat_vectors, "philox4x32 10" lines: ctr[4] key[2] -> result[4]. smoe maps
  // ctr = (counter lo, counter hi, stream lo, stream hi) and key = (seed lo, seed hi).
  using A = std::array<std::uint32_t, 4>;
  REQUIRE(philox4x32(0, 0, 0) == A{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u});
  REQUIRE(philox4x32(~std::uint64_t{0}, ~std::uint64_t{0}, ~std::uint64_t{0}) ==
          A{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu});
  REQUIRE(philox4x32(0x299f31d0a4093822ull, 0x85a308d3243f6a88ull, 0x0370734413198a2eull) ==
          A{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u});
}

TEST_CASE("philox4x32 is a pure function of (seed, counter, stream)", "[core][rng]") {
  for (std::uint64_t seed : {0ull, 1ull, 0xdeadbeefcafeull}) {
    for (std::uint64_t counter : {0ull, 1ull, 12345ull, 1ull << 40}) {
      const auto a = philox4x32(seed, counter, 3);
      REQUIRE(philox4x32(seed, counter, 3) == a);  // same inputs, same value
      REQUIRE(uniform01(seed, counter, 3) == uniform01(seed, counter, 3));
      REQUIRE(standard_normal(seed, counter, 3) == standard_normal(seed, counter, 3));
      REQUIRE(philox4x32(seed, counter, 4) != a);      // another stream
      REQUIRE(philox4x32(seed, counter + 1, 3) != a);  // another counter
      REQUIRE(philox4x32(seed + 1, counter, 3) != a);  // another seed
      REQUIRE(uniform01(seed, counter, 3) != uniform01(seed, counter, 4));
    }
  }
  // The default stream is stream 0.
  REQUIRE(philox4x32(7, 9) == philox4x32(7, 9, 0));
  REQUIRE(uniform01(7, 9) == uniform01(7, 9, 0));
  // Different streams are uncorrelated sequences, not shifted copies: no common values among
  // the first 1000 draws of two streams.
  std::vector<std::uint32_t> s0, s1;
  for (std::uint64_t i = 0; i < 1000; ++i) {
    s0.push_back(philox4x32(5, i, 0)[0]);
    s1.push_back(philox4x32(5, i, 1)[0]);
  }
  std::sort(s0.begin(), s0.end());
  std::sort(s1.begin(), s1.end());
  std::vector<std::uint32_t> common;
  std::set_intersection(s0.begin(), s0.end(), s1.begin(), s1.end(), std::back_inserter(common));
  REQUIRE(common.empty());
}

TEST_CASE("uniform01 is uniform on [0, 1)", "[core][rng]") {
  const int n = 100000;
  double sum = 0, sq = 0;
  int below_tenth = 0;
  for (int i = 0; i < n; ++i) {
    const double u = uniform01(42, std::uint64_t(i), 1);
    REQUIRE((u >= 0.0 && u < 1.0));
    sum += u;
    sq += u * u;
    below_tenth += u < 0.1;
  }
  const double mean = sum / n, var = sq / n - mean * mean;
  // 5-sigma bounds: sd(mean) = sqrt(1/12/n), sd(var) ≈ sqrt(1/180/n), sd(fraction) = sqrt(.09/n).
  CHECK(std::abs(mean - 0.5) < 5 * std::sqrt(1.0 / 12 / n));
  CHECK(std::abs(var - 1.0 / 12) < 5 * std::sqrt(1.0 / 180 / n));
  CHECK(std::abs(below_tenth / double(n) - 0.1) < 5 * std::sqrt(0.09 / n));
  // 32 random bits: the first Philox word scaled by 2^-32.
  for (std::uint64_t i = 0; i < 16; ++i) REQUIRE(uniform01(42, i, 1) == philox4x32(42, i, 1)[0] / 4294967296.0);
}

TEST_CASE("standard_normal has mean 0 and variance 1", "[core][rng]") {
  const int n = 100000;
  double sum = 0, sq = 0, fourth = 0;
  int within_one = 0;
  for (int i = 0; i < n; ++i) {
    const double z = standard_normal(7, std::uint64_t(i), 2);
    REQUIRE(std::isfinite(z));
    sum += z;
    sq += z * z;
    fourth += z * z * z * z;
    within_one += std::abs(z) < 1.0;
  }
  const double mean = sum / n, var = sq / n - mean * mean;
  // 5-sigma bounds: sd(mean) = sqrt(1/n), sd(var) = sqrt(2/n), sd(m4) = sqrt(96/n),
  // P(|z| < 1) = 0.682689 with sd sqrt(p(1-p)/n).
  CHECK(std::abs(mean) < 5 * std::sqrt(1.0 / n));
  CHECK(std::abs(var - 1.0) < 5 * std::sqrt(2.0 / n));
  CHECK(std::abs(fourth / n - 3.0) < 5 * std::sqrt(96.0 / n));
  const double p = 0.6826894921370859;
  CHECK(std::abs(within_one / double(n) - p) < 5 * std::sqrt(p * (1 - p) / n));
}

// ---------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------

namespace {

struct Assignment {
  index_t token, k;
};

// The naive reference: for each expert, its (token, k) assignments in (token, k) order.
std::vector<std::vector<Assignment>> naive_dispatch(const std::vector<int>& ids, index_t tokens, index_t K,
                                                    index_t E) {
  std::vector<std::vector<Assignment>> per_expert(static_cast<std::size_t>(E));
  for (index_t e = 0; e < E; ++e)
    for (index_t t = 0; t < tokens; ++t)
      for (index_t j = 0; j < K; ++j)
        if (ids[static_cast<std::size_t>(t * K + j)] == e) per_expert[static_cast<std::size_t>(e)].push_back({t, j});
  return per_expert;
}

// Checks every field of `d` against the naive reference for ids/gates [tokens, K] (dense, row-major).
template <class T>
void check_dispatch(const Dispatch<T>& d, const std::vector<int>& ids, const std::vector<T>& gates, index_t tokens,
                    index_t K, index_t E) {
  const auto ref = naive_dispatch(ids, tokens, K, E);
  REQUIRE(d.tokens == tokens);
  REQUIRE(d.k == K);
  REQUIRE(d.experts == E);
  REQUIRE(d.offsets.size() == static_cast<std::size_t>(E + 1));
  REQUIRE(d.offsets[0] == 0);
  index_t total = 0;
  std::vector<int> expected_token_slot(static_cast<std::size_t>(tokens * K), -1);
  for (index_t e = 0; e < E; ++e) {
    const auto& list = ref[static_cast<std::size_t>(e)];
    INFO("expert " << e);
    REQUIRE(d.expert_begin(e) == total);
    REQUIRE(d.count(e) == static_cast<index_t>(list.size()));
    for (std::size_t i = 0; i < list.size(); ++i) {
      const index_t s = total + static_cast<index_t>(i);
      REQUIRE(d.slot_token[static_cast<std::size_t>(s)] == list[i].token);  // stable: (token, k) order
      REQUIRE(d.slot_gate[static_cast<std::size_t>(s)] == gates[static_cast<std::size_t>(list[i].token * K + list[i].k)]);
      expected_token_slot[static_cast<std::size_t>(list[i].token * K + list[i].k)] = static_cast<int>(s);
    }
    total += static_cast<index_t>(list.size());
    REQUIRE(d.expert_end(e) == total);
    REQUIRE(d.ends()[static_cast<std::size_t>(e)] == total);  // cumulative counts
  }
  REQUIRE(d.ends().size() == static_cast<std::size_t>(E));
  REQUIRE(d.assignments() == total);
  REQUIRE(d.slot_token.size() == static_cast<std::size_t>(total));
  REQUIRE(d.slot_gate.size() == static_cast<std::size_t>(total));
  REQUIRE(d.token_slot.size() == static_cast<std::size_t>(tokens * K));
  for (index_t t = 0; t < tokens; ++t)
    for (index_t j = 0; j < K; ++j) {
      const std::size_t i = static_cast<std::size_t>(t * K + j);
      REQUIRE(d.token_slot[i] == expected_token_slot[i]);
      REQUIRE(d.slot(t, j) == expected_token_slot[i]);
      if (ids[i] < 0) {
        REQUIRE(d.slot(t, j) == -1);
      } else {  // round trip (t, k) -> slot -> token, gate
        const auto s = static_cast<std::size_t>(d.slot(t, j));
        REQUIRE(d.slot_token[s] == t);
        REQUIRE(d.slot_gate[s] == gates[i]);
      }
    }
}

// Builds a dispatch from dense ids/gates vectors through views.
template <class T>
Dispatch<T> build(const std::vector<int>& ids, const std::vector<T>& gates, index_t tokens, index_t K, index_t E) {
  std::vector<std::int32_t> ids32(ids.begin(), ids.end());
  Dispatch<T> d;
  build_dispatch(ConstMatrixView<std::int32_t>(ids32.data(), tokens, K), ConstMatrixView<T>(gates.data(), tokens, K),
                 E, d);
  return d;
}

template <class T>
std::vector<T> random_gates(index_t n, std::uint64_t seed) {
  std::vector<T> g(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) g[static_cast<std::size_t>(i)] = T(uniform01(seed, std::uint64_t(i), 9));
  return g;
}

}  // namespace

TEMPLATE_TEST_CASE("build_dispatch matches a naive per-expert listing on random ids", "[core][dispatch]", float,
                   double) {
  using T = TestType;
  struct Shape {
    index_t tokens, K, E;
  };
  const Shape shape = GENERATE(Shape{1, 1, 1}, Shape{7, 1, 4}, Shape{33, 2, 8}, Shape{64, 4, 16}, Shape{100, 3, 5},
                               Shape{257, 8, 64}, Shape{50, 2, 200});
  INFO("T=" << shape.tokens << " K=" << shape.K << " E=" << shape.E);
  for (const bool with_empty : {false, true}) {
    std::vector<int> ids(static_cast<std::size_t>(shape.tokens * shape.K));
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const double u = uniform01(11 + std::uint64_t(with_empty), i);
      ids[i] = with_empty ? int(u * double(shape.E + 1)) - 1 : int(u * double(shape.E));  // [-1, E) or [0, E)
    }
    const auto gates = random_gates<T>(shape.tokens * shape.K, 5);
    check_dispatch(build(ids, gates, shape.tokens, shape.K, shape.E), ids, gates, shape.tokens, shape.K, shape.E);
  }
}

TEMPLATE_TEST_CASE("build_dispatch edge cases", "[core][dispatch]", float, double) {
  using T = TestType;
  SECTION("no tokens") {
    const std::vector<int> ids;
    const std::vector<T> gates;
    const auto d = build(ids, gates, 0, 2, 3);
    check_dispatch(d, ids, gates, 0, 2, 3);
    REQUIRE(d.assignments() == 0);
    REQUIRE(d.offsets == std::vector<std::int32_t>{0, 0, 0, 0});
  }
  SECTION("one token") {
    const std::vector<int> ids = {2, 0};
    const std::vector<T> gates = {T(0.75), T(0.25)};
    const auto d = build(ids, gates, 1, 2, 3);
    check_dispatch(d, ids, gates, 1, 2, 3);
    REQUIRE(d.offsets == std::vector<std::int32_t>{0, 1, 1, 2});
    REQUIRE(d.slot_token == std::vector<std::int32_t>{0, 0});
    REQUIRE(d.token_slot == std::vector<std::int32_t>{1, 0});
  }
  SECTION("K = E: every expert once per token") {
    const index_t tokens = 9, E = 6;
    std::vector<int> ids(static_cast<std::size_t>(tokens * E));
    for (index_t t = 0; t < tokens; ++t)
      for (index_t j = 0; j < E; ++j) ids[static_cast<std::size_t>(t * E + j)] = int((j * 5 + t) % E);  // a permutation
    const auto gates = random_gates<T>(tokens * E, 6);
    const auto d = build(ids, gates, tokens, E, E);
    check_dispatch(d, ids, gates, tokens, E, E);
    for (index_t e = 0; e < E; ++e) {
      REQUIRE(d.count(e) == tokens);
      for (index_t i = 0; i < tokens; ++i) REQUIRE(d.slot_token[static_cast<std::size_t>(d.expert_begin(e) + i)] == i);
    }
  }
  SECTION("every token on one expert") {
    const index_t tokens = 20, K = 1, E = 5;
    const std::vector<int> ids(static_cast<std::size_t>(tokens), 3);
    const auto gates = random_gates<T>(tokens, 7);
    const auto d = build(ids, gates, tokens, K, E);
    check_dispatch(d, ids, gates, tokens, K, E);
    REQUIRE(d.offsets == std::vector<std::int32_t>{0, 0, 0, 0, 20, 20});
    for (index_t t = 0; t < tokens; ++t) REQUIRE(d.slot(t, 0) == t);
  }
  SECTION("all assignments empty") {
    const index_t tokens = 4, K = 2, E = 3;
    const std::vector<int> ids(static_cast<std::size_t>(tokens * K), -1);
    const auto gates = random_gates<T>(tokens * K, 8);
    const auto d = build(ids, gates, tokens, K, E);
    check_dispatch(d, ids, gates, tokens, K, E);
    REQUIRE(d.assignments() == 0);
    for (auto s : d.token_slot) REQUIRE(s == -1);
  }
  SECTION("one expert, K = 2: a token's two slots follow k order") {
    const std::vector<int> ids = {0, 0, 0, -1, 0, 0};
    const std::vector<T> gates = {T(1), T(2), T(3), T(4), T(5), T(6)};
    const auto d = build(ids, gates, 3, 2, 1);
    check_dispatch(d, ids, gates, 3, 2, 1);
    REQUIRE(d.slot_token == std::vector<std::int32_t>{0, 0, 1, 2, 2});
    REQUIRE(d.slot_gate == std::vector<T>{T(1), T(2), T(3), T(5), T(6)});
  }
}

TEMPLATE_TEST_CASE("build_dispatch reads strided views and reuses the output", "[core][dispatch]", float, double) {
  using T = TestType;
  const index_t tokens = 12, K = 3, E = 4, stride = 5;
  std::vector<std::int32_t> ids_buf(static_cast<std::size_t>(tokens * stride), 99);  // padding holds invalid ids
  std::vector<T> gates_buf(static_cast<std::size_t>(tokens * stride), T(-1));
  std::vector<int> ids(static_cast<std::size_t>(tokens * K));
  std::vector<T> gates(ids.size());
  for (index_t t = 0; t < tokens; ++t)
    for (index_t j = 0; j < K; ++j) {
      const auto i = static_cast<std::size_t>(t * K + j);
      ids[i] = int(uniform01(3, i) * double(E + 1)) - 1;
      gates[i] = T(uniform01(4, i));
      ids_buf[static_cast<std::size_t>(t * stride + j)] = ids[i];
      gates_buf[static_cast<std::size_t>(t * stride + j)] = gates[i];
    }
  Dispatch<T> d;
  // A larger dispatch first: rebuilding must not keep stale entries.
  {
    const std::vector<int> big_ids(200, 1);
    const auto big_gates = random_gates<T>(200, 1);
    std::vector<std::int32_t> b(big_ids.begin(), big_ids.end());
    build_dispatch(ConstMatrixView<std::int32_t>(b.data(), 50, 4), ConstMatrixView<T>(big_gates.data(), 50, 4), 7, d);
    REQUIRE(d.assignments() == 200);
  }
  build_dispatch(ConstMatrixView<std::int32_t>(ids_buf.data(), tokens, K, stride),
                 ConstMatrixView<T>(gates_buf.data(), tokens, K, stride), E, d);
  check_dispatch(d, ids, gates, tokens, K, E);
}

TEMPLATE_TEST_CASE("build_dispatch rejects bad ids, shapes and expert counts", "[core][dispatch]", float, double) {
  using T = TestType;
  const index_t tokens = 4, K = 2, E = 3;
  std::vector<std::int32_t> ids = {0, 1, 2, -1, 1, 0, 2, 2};
  std::vector<T> gates(8, T(0.5));
  Dispatch<T> d;
  auto run = [&](index_t experts) {
    build_dispatch(ConstMatrixView<std::int32_t>(ids.data(), tokens, K), ConstMatrixView<T>(gates.data(), tokens, K),
                   experts, d);
  };
  REQUIRE_NOTHROW(run(E));

  ids[2 * K + 1] = 3;  // == E at (token 2, k 1)
  REQUIRE_THROWS_AS(run(E), smoe::error);
  REQUIRE_THROWS_WITH(run(E), Catch::Contains("(token 2, k 1)") && Catch::Contains("[-1, 3)") && Catch::Contains("got 3"));
  ids[2 * K + 1] = 0;

  ids[3 * K + 0] = -2;  // < -1 at (token 3, k 0)
  REQUIRE_THROWS_AS(run(E), smoe::error);
  REQUIRE_THROWS_WITH(run(E), Catch::Contains("(token 3, k 0)") && Catch::Contains("got -2"));
  ids[3 * K + 0] = std::numeric_limits<std::int32_t>::max();
  REQUIRE_THROWS_WITH(run(E), Catch::Contains("(token 3, k 0)"));
  ids[3 * K + 0] = 1;
  REQUIRE_NOTHROW(run(E));

  REQUIRE_THROWS_AS(run(0), smoe::error);
  REQUIRE_THROWS_WITH(run(0), Catch::Contains("experts must be >= 1, got 0"));
  REQUIRE_THROWS_WITH(run(-4), Catch::Contains("experts must be >= 1, got -4"));

  // gates must have the shape of ids.
  REQUIRE_THROWS_AS(build_dispatch(ConstMatrixView<std::int32_t>(ids.data(), tokens, K),
                                   ConstMatrixView<T>(gates.data(), tokens, 1), E, d),
                    smoe::error);
  REQUIRE_THROWS_WITH(build_dispatch(ConstMatrixView<std::int32_t>(ids.data(), tokens, K),
                                     ConstMatrixView<T>(gates.data(), tokens - 1, K), E, d),
                      Catch::Contains("gates must be [4, 2], got [3, 2]"));
}

// Issue 12: the size product used to wrap, so n_experts = 2^62 allocated a few bytes and wrote past them.
TEST_CASE("Tensor refuses shapes whose byte count overflows index_t", "[core][tensor][hardening]") {
  const index_t big = index_t(1) << 62;
  const auto message = [](auto&& make) {
    try {
      make();
    } catch (const smoe::error& e) {
      return std::string(e.what());
    }
    return std::string("no smoe::error");
  };
  CHECK(message([&] { smoe::Tensor<float> t({big}); }).find("Tensor: shape [4611686018427387904] has more than") !=
        std::string::npos);
  CHECK(message([] { smoe::Tensor<double> t({index_t(1) << 32, index_t(1) << 32}); }).find("elements of 8 bytes") !=
        std::string::npos);
  CHECK(message([&] { smoe::Tensor<float> t({3, big, big}); }).find("[3, 4611686018427387904, 4611686018427387904]") !=
        std::string::npos);
  smoe::Tensor<float> ok({4});
  CHECK_THROWS_AS(ok.resize({big, 4}), smoe::error);
  CHECK(ok.size() == 4);  // a refused resize leaves the tensor as it was
  ok.resize({big, big, 0});  // empty: nothing to allocate, whatever the other dimensions
  CHECK(ok.size() == 0);
}

// Slots are int32: a call with more than 2^31 - 1 token-expert assignments is refused before any
// of its data is read (the views below point at one element; the check must come first).
TEST_CASE("build_dispatch refuses T·K and E beyond int32", "[core][dispatch][hardening]") {
  const std::int32_t id = 0;
  const float gate = 1;
  const index_t tokens = index_t(1) << 30;
  Dispatch<float> d;
  const ConstMatrixView<std::int32_t> ids{&id, tokens, 2};
  const ConstMatrixView<float> gates{&gate, tokens, 2};
  const auto message = [](auto&& call) {
    try {
      call();
    } catch (const smoe::error& e) {
      return std::string(e.what());
    }
    return std::string("no smoe::error");
  };
  CHECK(message([&] { build_dispatch(ids, gates, 4, d); }).find("tokens × k = 1073741824 × 2 must be <= 2^31 - 1") !=
        std::string::npos);
  const ConstMatrixView<std::int32_t> one_id{&id, 1, 1};
  const ConstMatrixView<float> one_gate{&gate, 1, 1};
  CHECK(message([&] { build_dispatch(one_id, one_gate, index_t(1) << 31, d); }).find("experts must be <= 2^31 - 1") !=
        std::string::npos);
}
