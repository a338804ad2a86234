// Routers (softmax / sigmoid top-k), top-k selection and expert dropout against naive
// double-precision references written from the formulas, and backward against finite differences.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <set>
#include <vector>

#include <smoe/core/rng.hpp>
#include <smoe/routing/capacity.hpp>
#include <smoe/routing/expert_dropout.hpp>
#include <smoe/routing/routing.hpp>
#include <smoe/routing/sigmoid_topk.hpp>
#include <smoe/routing/softmax_topk.hpp>
#include <smoe/routing/topk_router.hpp>
#include <smoe/routing/topk_select.hpp>

#include "catch.hpp"
#include "helpers.hpp"

using namespace smoe;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

enum class Kind { softmax, softmax_renorm, sigmoid };

const char* kind_name(Kind k) {
  return k == Kind::softmax ? "softmax" : k == Kind::softmax_renorm ? "softmax (renormalized)" : "sigmoid";
}

// Calls f(router) with a freshly built router of the given gating.
template <class T, class F>
void with_router(Kind kind, TopKRouterConfig c, F&& f) {
  switch (kind) {
    case Kind::sigmoid: {
      SigmoidTopK<T> r(c);
      f(r);
      break;
    }
    case Kind::softmax: {
      SoftmaxTopK<T> r(c, SoftmaxGate{false});
      f(r);
      break;
    }
    case Kind::softmax_renorm: {
      SoftmaxTopK<T> r(c, SoftmaxGate{true});
      f(r);
      break;
    }
  }
}

// ----- naive references (double, plain loops) -----

// s [T, E] = x [T, d] · Wᵀ, W [E, d].
std::vector<double> ref_logits(const std::vector<double>& x, const std::vector<double>& w, index_t T, index_t d,
                               index_t E) {
  std::vector<double> s(static_cast<std::size_t>(T * E), 0.0);
  for (index_t t = 0; t < T; ++t)
    for (index_t e = 0; e < E; ++e) {
      double acc = 0;
      for (index_t i = 0; i < d; ++i) acc += x[static_cast<std::size_t>(t * d + i)] * w[static_cast<std::size_t>(e * d + i)];
      s[static_cast<std::size_t>(t * E + e)] = acc;
    }
  return s;
}

// The documented total order: alive before dropped, then larger score (NaN below everything,
// -Inf included), then smaller index. A stable sort of 0..n-1 by this order, first k.
std::vector<int> ref_topk(const double* s, index_t n, index_t k, const std::uint8_t* dropped = nullptr) {
  std::vector<int> idx(static_cast<std::size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  auto alive = [&](int i) { return dropped == nullptr || dropped[i] == 0; };
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) {
    if (alive(a) != alive(b)) return alive(a);
    const bool na = std::isnan(s[a]), nb = std::isnan(s[b]);
    if (na || nb) return !na && nb;
    return s[a] > s[b];
  });
  idx.resize(static_cast<std::size_t>(k));
  return idx;
}

std::vector<double> ref_gates(Kind kind, const double* s, index_t E, const std::vector<int>& ids) {
  std::vector<double> g;
  if (kind == Kind::sigmoid) {
    for (int e : ids) g.push_back(1.0 / (1.0 + std::exp(-s[e])));
  } else if (kind == Kind::softmax) {
    double m = -kInf, z = 0;
    for (index_t e = 0; e < E; ++e) m = std::max(m, s[e]);
    for (index_t e = 0; e < E; ++e) z += std::exp(s[e] - m);
    for (int e : ids) g.push_back(std::exp(s[e] - m) / z);
  } else {
    double m = -kInf, z = 0;
    for (int e : ids) m = std::max(m, s[e]);
    for (int e : ids) z += std::exp(s[e] - m);
    for (int e : ids) g.push_back(std::exp(s[e] - m) / z);
  }
  return g;
}

// Values k/4 with k in [-4, 4]: products and sums of a few of them are exact in float, so the
// library's float logits equal the double reference and ties are real ties.
std::vector<double> quarter_ints(index_t n, std::uint64_t seed) {
  std::vector<double> v(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = (int(uniform01(seed, std::uint64_t(i)) * 9.0) - 4) / 4.0;
  return v;
}

std::vector<double> gaussian(index_t n, std::uint64_t seed, double std = 1.0) {
  std::vector<double> v(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = std * standard_normal(seed, std::uint64_t(i), 5);
  return v;
}

template <class T>
Tensor<T> to_tensor(const std::vector<double>& v, index_t rows, index_t cols) {
  Tensor<T> t({rows, cols});
  for (index_t i = 0; i < t.size(); ++i) t[i] = T(v[static_cast<std::size_t>(i)]);
  return t;
}

// The values a T-typed tensor actually holds, as double (the reference's inputs).
template <class T>
std::vector<double> as_double(const std::vector<double>& v) {
  std::vector<double> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = double(T(v[i]));
  return out;
}

template <class R>
void set_weight(R& r, const std::vector<double>& w) {
  auto& p = r.weight().value;
  REQUIRE(p.size() == static_cast<index_t>(w.size()));
  for (index_t i = 0; i < p.size(); ++i) p[i] = typename R::scalar_type(w[static_cast<std::size_t>(i)]);
}

// Every token has K distinct ids in [0, E).
void require_valid_ids(const Tensor<std::int32_t>& ids, index_t T, index_t K, index_t E) {
  REQUIRE(ids.rank() == 2);
  REQUIRE(ids.dim(0) == T);
  REQUIRE(ids.dim(1) == K);
  for (index_t t = 0; t < T; ++t) {
    std::set<std::int32_t> seen;
    for (index_t j = 0; j < K; ++j) {
      const std::int32_t e = ids[t * K + j];
      INFO("token " << t << " k " << j << " id " << e);
      REQUIRE((e >= 0 && e < E));
      REQUIRE(seen.insert(e).second);
    }
  }
}

// Forward of `kind` on x [T, d] (stored with row stride >= d) and W [E, d] against the reference.
template <class T>
void check_forward(Kind kind, index_t tokens, index_t d, index_t E, index_t K, const std::vector<double>& x_in,
                   const std::vector<double>& w_in, index_t x_stride) {
  INFO(kind_name(kind) << " T=" << tokens << " d=" << d << " E=" << E << " K=" << K << " stride=" << x_stride);
  const auto x = as_double<T>(x_in), w = as_double<T>(w_in);
  std::vector<T> x_buf(static_cast<std::size_t>(std::max<index_t>(1, tokens * x_stride)), T(1e30));
  for (index_t t = 0; t < tokens; ++t)
    for (index_t i = 0; i < d; ++i) x_buf[static_cast<std::size_t>(t * x_stride + i)] = T(x[static_cast<std::size_t>(t * d + i)]);
  const auto s = ref_logits(x, w, tokens, d, E);
  with_router<T>(kind, {.d_model = d, .experts = E, .k = K}, [&](auto& router) {
    set_weight(router, w);
    Routing<T> r;
    router.forward(ConstMatrixView<T>(x_buf.data(), tokens, d, x_stride), r, Mode::eval);
    REQUIRE(r.tokens() == tokens);
    REQUIRE(r.k() == K);
    REQUIRE(r.logits.shape() == std::vector<index_t>{tokens, E});
    REQUIRE(r.gates.shape() == std::vector<index_t>{tokens, K});
    test::require_close(r.logits, s, test::tolerance<T>(), test::tolerance<T>(), "logits");
    std::vector<double> gates_ref;
    for (index_t t = 0; t < tokens; ++t) {
      const double* st = s.data() + t * E;
      const auto ids = ref_topk(st, E, K);
      for (index_t j = 0; j < K; ++j) {
        INFO("token " << t << " k " << j);
        REQUIRE(r.experts[t * K + j] == ids[static_cast<std::size_t>(j)]);
      }
      const auto g = ref_gates(kind, st, E, ids);
      gates_ref.insert(gates_ref.end(), g.begin(), g.end());
    }
    test::require_close(r.gates, gates_ref, test::tolerance<T>(), 1e-30, "gates");
  });
}

}  // namespace

TEST_CASE("the built-in routers satisfy the Router concept", "[routing]") {
  STATIC_REQUIRE(Router<SoftmaxTopK<float>>);
  STATIC_REQUIRE(Router<SoftmaxTopK<double>>);
  STATIC_REQUIRE(Router<SigmoidTopK<float>>);
  STATIC_REQUIRE(Router<SigmoidTopK<double>>);
  STATIC_REQUIRE(HasParameters<SigmoidTopK<float>>);
}

TEMPLATE_TEST_CASE("TopKRouter forward matches the naive reference (exact-in-float inputs)", "[routing]", float,
                   double) {
  using T = TestType;
  const Kind kind = GENERATE(Kind::softmax, Kind::softmax_renorm, Kind::sigmoid);
  struct Shape {
    index_t tokens, d, E, K;
  };
  // Includes T = 1, E = 1, K = E, a large K (> 16: select_topk's partition path), and many ties.
  const Shape sh = GENERATE(Shape{1, 3, 1, 1}, Shape{17, 8, 4, 1}, Shape{33, 16, 8, 2}, Shape{70, 12, 16, 4},
                            Shape{40, 5, 6, 6}, Shape{25, 4, 40, 20}, Shape{9, 2, 64, 64}, Shape{130, 6, 5, 3});
  const auto x = quarter_ints(sh.tokens * sh.d, 21), w = quarter_ints(sh.E * sh.d, 22);
  check_forward<T>(kind, sh.tokens, sh.d, sh.E, sh.K, x, w, sh.d);
  check_forward<T>(kind, sh.tokens, sh.d, sh.E, sh.K, x, w, sh.d + 3);  // strided input
}

TEST_CASE("TopKRouter forward matches the naive reference (Gaussian inputs, double)", "[routing]") {
  const Kind kind = GENERATE(Kind::softmax, Kind::softmax_renorm, Kind::sigmoid);
  const index_t tokens = 50, d = 24, E = 12, K = 3;
  check_forward<double>(kind, tokens, d, E, K, gaussian(tokens * d, 1), gaussian(E * d, 2, 2.0), d);
  // Large logits: the softmax must stay finite (max-subtracted).
  check_forward<double>(kind, tokens, d, E, K, gaussian(tokens * d, 3, 20.0), gaussian(E * d, 4, 20.0), d);
}

TEMPLATE_TEST_CASE("TopKRouter tie rule: equal logits select the smaller ids first", "[routing]", float, double) {
  using T = TestType;
  const index_t tokens = 5, d = 3, E = 7, K = 3;
  const auto x = to_tensor<T>(gaussian(tokens * d, 9), tokens, d);
  SECTION("zero weights: ids 0..K-1, uniform gates") {
    const Kind kind = GENERATE(Kind::softmax, Kind::softmax_renorm, Kind::sigmoid);
    with_router<T>(kind, {.d_model = d, .experts = E, .k = K}, [&](auto& router) {
      router.weight().value.zero();
      Routing<T> r;
      router.forward(x.matrix(), r, Mode::eval);
      const double g = kind == Kind::softmax ? 1.0 / E : kind == Kind::softmax_renorm ? 1.0 / K : 0.5;
      for (index_t t = 0; t < tokens; ++t)
        for (index_t j = 0; j < K; ++j) {
          REQUIRE(r.experts[t * K + j] == j);
          REQUIRE(double(r.gates[t * K + j]) == Approx(g).epsilon(test::tolerance<T>()));
        }
    });
  }
  SECTION("partial ties keep index order within a score") {
    // d = 1, x = 1: the logits are the weight column {1, 3, 3, 2, 3, -1, 3}.
    SigmoidTopK<T> router({.d_model = 1, .experts = E, .k = 5});
    const double col[E] = {1, 3, 3, 2, 3, -1, 3};
    for (index_t e = 0; e < E; ++e) router.weight().value[e] = T(col[e]);
    Tensor<T> one({1, 1});
    one[0] = T(1);
    Routing<T> r;
    router.forward(one.matrix(), r, Mode::eval);
    const std::int32_t expected[5] = {1, 2, 4, 6, 3};
    for (index_t j = 0; j < 5; ++j) REQUIRE(r.experts[j] == expected[j]);
  }
}

TEST_CASE("softmax gating with renormalization and K = 1 gives gate 1", "[routing]") {
  const index_t tokens = 8, d = 4, E = 5;
  SoftmaxTopK<double> router({.d_model = d, .experts = E, .k = 1}, SoftmaxGate{true});
  set_weight(router, gaussian(E * d, 31));
  const auto x = to_tensor<double>(gaussian(tokens * d, 32), tokens, d);
  Routing<double> r;
  router.forward(x.matrix(), r, Mode::eval);
  for (index_t t = 0; t < tokens; ++t) REQUIRE(r.gates[t] == 1.0);
}

TEMPLATE_TEST_CASE("TopKRouter: NaN/Inf inputs never produce invalid or repeated ids", "[routing]", float, double) {
  using T = TestType;
  const Kind kind = GENERATE(Kind::softmax, Kind::softmax_renorm, Kind::sigmoid);
  const index_t K = GENERATE(1, 3, 6, 17);
  const index_t tokens = 6, d = 4, E = std::max<index_t>(K, 6) + 1;
  INFO(kind_name(kind) << " K=" << K << " E=" << E);
  auto x = to_tensor<T>(gaussian(tokens * d, 41), tokens, d);
  const auto w = gaussian(E * d, 42);
  with_router<T>(kind, {.d_model = d, .experts = E, .k = K}, [&](auto& router) {
    Routing<T> r;
    SECTION("NaN and Inf in x") {
      set_weight(router, w);
      x[0 * d + 1] = T(kNaN);   // token 0: every logit NaN
      x[1 * d + 0] = T(kInf);   // token 1: ±Inf logits
      x[2 * d + 2] = T(-kInf);  // token 2
      x[3 * d + 0] = T(kInf);   // token 3: Inf - Inf = NaN logits
      x[3 * d + 1] = T(-kInf);
      router.forward(x.matrix(), r, Mode::eval);
      require_valid_ids(r.experts, tokens, K, E);
      // Token 5 is finite: unaffected.
      const auto s = ref_logits(as_double<T>(std::vector<double>(x.data() + 5 * d, x.data() + 6 * d)), as_double<T>(w), 1,
                                d, E);
      const auto ids = ref_topk(s.data(), E, K);
      for (index_t j = 0; j < K; ++j) REQUIRE(r.experts[5 * K + j] == ids[static_cast<std::size_t>(j)]);
    }
    SECTION("NaN weights: the NaN expert ranks below every finite one") {
      auto wn = w;
      const index_t bad = 1;
      wn[static_cast<std::size_t>(bad * d + 2)] = kNaN;  // expert 1: NaN logit for every token
      set_weight(router, wn);
      router.forward(x.matrix(), r, Mode::eval);
      require_valid_ids(r.experts, tokens, K, E);
      for (index_t t = 0; t < tokens; ++t)
        for (index_t j = 0; j < K; ++j) REQUIRE(r.experts[t * K + j] != bad);  // K < E: a finite expert is left
    }
    SECTION("Inf weights") {
      auto wn = w;
      wn[0] = kInf;
      wn[static_cast<std::size_t>(2 * d + 1)] = -kInf;
      set_weight(router, wn);
      x[4 * d + 0] = T(0);  // 0 · Inf = NaN for token 4
      router.forward(x.matrix(), r, Mode::eval);
      require_valid_ids(r.experts, tokens, K, E);
    }
  });
}

TEST_CASE("TopKRouterConfig validation throws smoe::error naming the argument", "[routing]") {
  using C = TopKRouterConfig;
  auto make = [](C c) { SigmoidTopK<float> r(c); };
  auto make_softmax = [](C c) { SoftmaxTopK<double> r(c); };
  REQUIRE_NOTHROW(make({.d_model = 4, .experts = 4, .k = 4}));
  REQUIRE_THROWS_AS(make({.d_model = 4, .experts = 4, .k = 0}), smoe::error);
  REQUIRE_THROWS_WITH(make({.d_model = 4, .experts = 4, .k = 0}), Catch::Contains("k must be in [1, experts = 4], got 0"));
  REQUIRE_THROWS_AS(make({.d_model = 4, .experts = 4, .k = 5}), smoe::error);
  REQUIRE_THROWS_WITH(make({.d_model = 4, .experts = 4, .k = 5}), Catch::Contains("k must be"));
  REQUIRE_THROWS_WITH(make_softmax({.d_model = 4, .experts = 4, .k = -1}), Catch::Contains("k must be"));
  REQUIRE_THROWS_AS(make({.d_model = 0, .experts = 4, .k = 1}), smoe::error);
  REQUIRE_THROWS_WITH(make({.d_model = 0, .experts = 4, .k = 1}), Catch::Contains("d_model must be >= 1, got 0"));
  REQUIRE_THROWS_AS(make({.d_model = 4, .experts = 0, .k = 1}), smoe::error);
  REQUIRE_THROWS_WITH(make({.d_model = 4, .experts = 0, .k = 1}), Catch::Contains("experts must be >= 1, got 0"));
  REQUIRE_THROWS_WITH(make({.d_model = 4, .experts = 4, .k = 1, .expert_dropout = {.rate = 1.0}}),
                      Catch::Contains("expert_dropout must be in [0, 1), got 1"));
  REQUIRE_THROWS_WITH(make({.d_model = 4, .experts = 4, .k = 1, .expert_dropout = {.rate = -0.1}}),
                      Catch::Contains("expert_dropout"));
  REQUIRE_THROWS_WITH(make({.d_model = 4, .experts = 4, .k = 1, .expert_dropout = {.rate = kNaN}}),
                      Catch::Contains("expert_dropout"));
  REQUIRE_THROWS_WITH(make_softmax({.d_model = 4, .experts = 4, .k = 1, .expert_dropout = {.rate = 1.5}}),
                      Catch::Contains("expert_dropout"));
}

TEST_CASE("TopKRouterConfig validation: negative sizes are named too", "[routing]") {
  // Negative d_model / experts must be reported as such, not as a tensor-shape error.
  auto make = [](TopKRouterConfig c) { SigmoidTopK<float> r(c); };
  REQUIRE_THROWS_AS(make({.d_model = -2, .experts = 4, .k = 1}), smoe::error);
  REQUIRE_THROWS_WITH(make({.d_model = -2, .experts = 4, .k = 1}), Catch::Contains("d_model must be >= 1, got -2"));
  REQUIRE_THROWS_AS(make({.d_model = 4, .experts = -3, .k = 1}), smoe::error);
  REQUIRE_THROWS_WITH(make({.d_model = 4, .experts = -3, .k = 1}), Catch::Contains("experts must be >= 1, got -3"));
}

TEMPLATE_TEST_CASE("TopKRouter rejects badly shaped inputs and gradients", "[routing]", float, double) {
  using T = TestType;
  const index_t tokens = 3, d = 4, E = 5, K = 2;
  SoftmaxTopK<T> router({.d_model = d, .experts = E, .k = K});
  set_weight(router, gaussian(E * d, 51));
  Routing<T> r;
  Tensor<T> bad_x({tokens, d + 1});
  bad_x.zero();
  REQUIRE_THROWS_AS(router.forward(bad_x.matrix(), r, Mode::eval), smoe::error);
  REQUIRE_THROWS_WITH(router.forward(bad_x.matrix(), r, Mode::eval), Catch::Contains("x must be [3, 4], got [3, 5]"));

  const auto x = to_tensor<T>(gaussian(tokens * d, 52), tokens, d);
  router.forward(x.matrix(), r, Mode::eval);
  Tensor<T> dg({tokens, K}), dl({tokens, E}), dx({tokens, d});
  dg.zero();
  dl.zero();
  dx.zero();
  Tensor<T> dg_bad({tokens, K + 1}), dl_bad({tokens, E - 1}), dx_bad({tokens + 1, d});
  REQUIRE_THROWS_WITH(router.backward(x.matrix(), r, dg_bad.matrix(), dl.matrix(), dx.matrix()),
                      Catch::Contains("d_gates must be [3, 2], got [3, 3]"));
  REQUIRE_THROWS_WITH(router.backward(x.matrix(), r, dg.matrix(), dl_bad.matrix(), dx.matrix()),
                      Catch::Contains("d_logits must be [3, 5], got [3, 4]"));
  REQUIRE_THROWS_WITH(router.backward(x.matrix(), r, dg.matrix(), dl.matrix(), dx_bad.matrix()),
                      Catch::Contains("dx must be [3, 4], got [4, 4]"));
  REQUIRE_NOTHROW(router.backward(x.matrix(), r, dg.matrix(), dl.matrix(), dx.matrix()));
}

TEMPLATE_TEST_CASE("TopKRouter with no tokens", "[routing]", float, double) {
  using T = TestType;
  const Kind kind = GENERATE(Kind::softmax, Kind::softmax_renorm, Kind::sigmoid);
  const index_t d = 3, E = 4, K = 2;
  with_router<T>(kind, {.d_model = d, .experts = E, .k = K, .expert_dropout = {.rate = 0.5, .seed = 1}},
                 [&](auto& router) {
                   set_weight(router, gaussian(E * d, 61));
                   Tensor<T> x({0, d}), dg({0, K}), dl({0, E}), dx({0, d});
                   Routing<T> r;
                   REQUIRE_NOTHROW(router.forward(x.matrix(), r, Mode::train));
                   REQUIRE(r.tokens() == 0);
                   REQUIRE(r.k() == K);
                   REQUIRE(r.logits.shape() == std::vector<index_t>{0, E});
                   router.weight().zero_grad();
                   REQUIRE_NOTHROW(router.backward(x.matrix(), r, dg.matrix(), dl.matrix(), dx.matrix()));
                   for (index_t i = 0; i < router.weight().grad.size(); ++i) REQUIRE(router.weight().grad[i] == T(0));
                 });
}

// ---------------------------------------------------------------------------------------------
// Expert dropout
// ---------------------------------------------------------------------------------------------

TEST_CASE("ExpertDropout::mask removes each (token, expert) with probability rate", "[routing][dropout]") {
  const double rate = GENERATE(0.05, 0.3, 0.7);
  const ExpertDropout dr{.rate = rate, .seed = 1234};
  REQUIRE(dr.enabled());
  const index_t tokens = 2000, E = 50;  // 1e5 draws
  std::vector<std::uint8_t> m0(static_cast<std::size_t>(E)), m1(static_cast<std::size_t>(E)), again(static_cast<std::size_t>(E));
  std::vector<std::uint8_t> prev(static_cast<std::size_t>(E));
  double removed = 0, agree_step = 0, agree_token = 0;
  for (index_t t = 0; t < tokens; ++t) {
    dr.mask(3, t, E, m0.data());
    dr.mask(4, t, E, m1.data());
    dr.mask(3, t, E, again.data());
    REQUIRE(again == m0);  // a pure function of (seed, step, token, expert)
    for (index_t e = 0; e < E; ++e) {
      const auto i = static_cast<std::size_t>(e);
      REQUIRE(m0[i] <= 1);
      removed += m0[i];
      agree_step += m0[i] == m1[i];
      if (t > 0) agree_token += m0[i] == prev[i];
    }
    prev = m0;
  }
  const double n = double(tokens * E), n_token = double((tokens - 1) * E);
  INFO("rate " << rate);
  CHECK(std::abs(removed / n - rate) < 5 * std::sqrt(rate * (1 - rate) / n));
  // Steps and tokens are independent: P(same) = r² + (1-r)².
  const double p_same = rate * rate + (1 - rate) * (1 - rate);
  CHECK(std::abs(agree_step / n - p_same) < 5 * std::sqrt(p_same * (1 - p_same) / n));
  CHECK(std::abs(agree_token / n_token - p_same) < 5 * std::sqrt(p_same * (1 - p_same) / n_token));

  const ExpertDropout off{};
  REQUIRE_FALSE(off.enabled());
  REQUIRE_NOTHROW(off.validate("ctx"));
  REQUIRE_THROWS_WITH(ExpertDropout{.rate = 1.0}.validate("ctx"), "ctx: expert_dropout must be in [0, 1), got 1");
}

TEST_CASE("expert dropout: a split batch draws each token's mask at its index in the whole batch (first_token)",
          "[routing][dropout]") {
  const index_t d = 4, E = 8, K = 3, tokens = 12, first = 5;
  const Kind kind = GENERATE(Kind::softmax, Kind::sigmoid);
  const ExpertDropout whole{.rate = 0.4, .seed = 77};
  ExpertDropout part = whole;
  part.first_token = first;
  std::vector<std::uint8_t> a(static_cast<std::size_t>(E)), b(static_cast<std::size_t>(E));
  for (index_t t = 0; t + first < tokens; ++t) {
    whole.mask(9, first + t, E, a.data());
    part.mask(9, t, E, b.data());
    REQUIRE(a == b);
  }
  // A router over tokens [first, tokens) with first_token = first selects what the router over the
  // whole batch selects for those rows, at every step.
  const std::vector<double> w = gaussian(E * d, 5), xs = gaussian(tokens * d, 6);
  Tensor<double> x_all({tokens, d}), x_part({tokens - first, d});
  for (index_t i = 0; i < x_all.size(); ++i) x_all[i] = xs[std::size_t(i)];
  for (index_t i = 0; i < x_part.size(); ++i) x_part[i] = xs[std::size_t(first * d + i)];
  with_router<double>(kind, {.d_model = d, .experts = E, .k = K, .expert_dropout = whole}, [&](auto& all) {
    with_router<double>(kind, {.d_model = d, .experts = E, .k = K, .expert_dropout = part}, [&](auto& slice) {
      set_weight(all, w);
      set_weight(slice, w);
      Routing<double> ra, rs;
      for (int step = 0; step < 3; ++step) {
        all.forward(x_all.matrix(), ra, Mode::train);
        slice.forward(x_part.matrix(), rs, Mode::train);
        for (index_t t = 0; t < tokens - first; ++t)
          for (index_t j = 0; j < K; ++j) REQUIRE(rs.experts[t * K + j] == ra.experts[(first + t) * K + j]);
      }
    });
  });
}

TEMPLATE_TEST_CASE("expert dropout: training selection = top-k over the surviving experts", "[routing][dropout]", float,
                   double) {
  using T = TestType;
  const Kind kind = GENERATE(Kind::softmax, Kind::softmax_renorm, Kind::sigmoid);
  struct Case {
    index_t E, K;
    double rate;
  };
  // The last two drop more than E - K experts for many tokens: dropped ones fill the remaining slots.
  const Case c = GENERATE(Case{8, 2, 0.3}, Case{16, 4, 0.5}, Case{4, 3, 0.9}, Case{20, 18, 0.6});
  const index_t tokens = 90, d = 6;
  INFO(kind_name(kind) << " E=" << c.E << " K=" << c.K << " rate=" << c.rate);
  const ExpertDropout dr{.rate = c.rate, .seed = 77};
  const auto x = quarter_ints(tokens * d, 71), w = quarter_ints(c.E * d, 72);
  const auto s = ref_logits(x, w, tokens, d, c.E);
  const auto xt = to_tensor<T>(x, tokens, d);
  with_router<T>(kind, {.d_model = d, .experts = c.E, .k = c.K, .expert_dropout = dr}, [&](auto& router) {
    set_weight(router, w);
    router.set_step(12);
    Routing<T> r;
    router.forward(xt.matrix(), r, Mode::train);
    REQUIRE(router.step() == 13);
    require_valid_ids(r.experts, tokens, c.K, c.E);
    std::vector<std::uint8_t> mask(static_cast<std::size_t>(c.E));
    std::vector<double> gates_ref;
    index_t tokens_with_dropped_pick = 0;
    for (index_t t = 0; t < tokens; ++t) {
      dr.mask(12, t, c.E, mask.data());
      const auto ids = ref_topk(s.data() + t * c.E, c.E, c.K, mask.data());
      for (index_t j = 0; j < c.K; ++j) {
        INFO("token " << t << " k " << j);
        REQUIRE(r.experts[t * c.K + j] == ids[static_cast<std::size_t>(j)]);
      }
      tokens_with_dropped_pick += mask[static_cast<std::size_t>(ids.back())] != 0;
      // Gates are the plain formula at the selected ids: no 1/(1-rate) rescaling.
      const auto g = ref_gates(kind, s.data() + t * c.E, c.E, ids);
      gates_ref.insert(gates_ref.end(), g.begin(), g.end());
    }
    test::require_close(r.gates, gates_ref, test::tolerance<T>(), 1e-30, "gates");
    if (c.rate >= 0.6) REQUIRE(tokens_with_dropped_pick > 0);  // the fill-with-dropped path ran
  });
}

TEMPLATE_TEST_CASE("expert dropout is reproducible from (seed, step) and off in eval", "[routing][dropout]", float,
                   double) {
  using T = TestType;
  const index_t tokens = 64, d = 8, E = 16, K = 2;
  const auto w = gaussian(E * d, 81);
  const auto x = to_tensor<T>(gaussian(tokens * d, 82), tokens, d);
  auto run = [&](std::uint64_t seed, std::uint64_t step, Mode mode, double rate = 0.5) {
    SigmoidTopK<T> router({.d_model = d, .experts = E, .k = K, .expert_dropout = {.rate = rate, .seed = seed}});
    set_weight(router, w);
    router.set_step(step);
    Routing<T> r;
    router.forward(x.matrix(), r, mode);
    REQUIRE(router.step() == (mode == Mode::train ? step + 1 : step));
    return std::vector<std::int32_t>(r.experts.data(), r.experts.data() + r.experts.size());
  };
  const auto a = run(5, 3, Mode::train);
  REQUIRE(run(5, 3, Mode::train) == a);  // same seed and step: same selection
  REQUIRE(run(5, 4, Mode::train) != a);  // another step: another mask
  REQUIRE(run(6, 3, Mode::train) != a);  // another seed
  const auto no_drop = run(5, 3, Mode::train, 0.0);
  REQUIRE(no_drop != a);
  REQUIRE(run(5, 3, Mode::eval) == no_drop);  // eval ignores dropout
  REQUIRE(run(5, 4, Mode::eval) == no_drop);

  // The router advances its own step: two consecutive training forwards use steps s and s + 1.
  SigmoidTopK<T> router({.d_model = d, .experts = E, .k = K, .expert_dropout = {.rate = 0.5, .seed = 5}});
  set_weight(router, w);
  router.set_step(3);
  Routing<T> r;
  router.forward(x.matrix(), r, Mode::train);
  REQUIRE(std::vector<std::int32_t>(r.experts.data(), r.experts.data() + r.experts.size()) == a);
  router.forward(x.matrix(), r, Mode::eval);  // eval does not advance
  router.forward(x.matrix(), r, Mode::train);
  REQUIRE(std::vector<std::int32_t>(r.experts.data(), r.experts.data() + r.experts.size()) == run(5, 4, Mode::train));
}

TEST_CASE("expert dropout with K = 1 replaces the best expert with probability rate", "[routing][dropout]") {
  const double rate = GENERATE(0.1, 0.4);
  const index_t tokens = 20000, d = 8, E = 8;
  SigmoidTopK<float> router({.d_model = d, .experts = E, .k = 1, .expert_dropout = {.rate = rate, .seed = 99}});
  const auto w = gaussian(E * d, 91);
  set_weight(router, w);
  const auto xv = gaussian(tokens * d, 92);
  const auto x = to_tensor<float>(xv, tokens, d);
  const auto s = ref_logits(as_double<float>(xv), as_double<float>(w), tokens, d, E);
  Routing<float> r;
  router.forward(x.matrix(), r, Mode::train);
  index_t not_best = 0;
  for (index_t t = 0; t < tokens; ++t) not_best += r.experts[t] != ref_topk(s.data() + t * E, E, 1)[0];
  const double frac = double(not_best) / double(tokens);
  INFO("rate " << rate << " fraction " << frac);
  CHECK(std::abs(frac - rate) < 5 * std::sqrt(rate * (1 - rate) / double(tokens)));
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

namespace {

// J = Σ_{t,k} c[t,k]·gate[t,k] + Σ_{t,e} c2[t,e]·s[t,e] with the selection held fixed at `ids`.
double objective(Kind kind, const std::vector<double>& s, const std::vector<int>& ids, const std::vector<double>& c,
                 const std::vector<double>& c2, index_t T, index_t E, index_t K) {
  double J = 0;
  for (index_t t = 0; t < T; ++t) {
    const std::vector<int> id(ids.begin() + t * K, ids.begin() + (t + 1) * K);
    const auto g = ref_gates(kind, s.data() + t * E, E, id);
    for (index_t j = 0; j < K; ++j) J += c[static_cast<std::size_t>(t * K + j)] * g[static_cast<std::size_t>(j)];
    for (index_t e = 0; e < E; ++e) J += c2[static_cast<std::size_t>(t * E + e)] * s[static_cast<std::size_t>(t * E + e)];
  }
  return J;
}



template <class A>
void require_grad_close(const A& actual, const std::vector<double>& expected, double tol, const char* what) {
  double scale = 0;
  for (double v : expected) scale = std::max(scale, std::abs(v));
  test::require_close(actual, expected, tol, tol * std::max(scale, 1e-3), what);
}

}  // namespace

TEMPLATE_TEST_CASE("TopKRouter backward matches finite differences", "[routing][backward]", float, double) {
  using T = TestType;
  const Kind kind = GENERATE(Kind::softmax, Kind::softmax_renorm, Kind::sigmoid);
  struct Case {
    index_t tokens, d, E, K;
    double rate;
  };
  const Case c = GENERATE(Case{7, 5, 6, 2, 0.0}, Case{5, 4, 4, 1, 0.0}, Case{4, 3, 5, 5, 0.0}, Case{9, 4, 24, 18, 0.0},
                          Case{8, 5, 8, 3, 0.5});
  INFO(kind_name(kind) << " T=" << c.tokens << " d=" << c.d << " E=" << c.E << " K=" << c.K << " rate=" << c.rate);
  auto x = as_double<T>(gaussian(c.tokens * c.d, 101));
  auto w = as_double<T>(gaussian(c.E * c.d, 102, 0.7));
  const auto cg = as_double<T>(gaussian(c.tokens * c.K, 103));
  const auto cl = as_double<T>(gaussian(c.tokens * c.E, 104, 0.3));
  const auto dx0 = as_double<T>(gaussian(c.tokens * c.d, 105));  // backward must ADD into dx
  const auto gw0 = as_double<T>(gaussian(c.E * c.d, 106));       // and accumulate into weight.grad
  const Mode mode = c.rate > 0 ? Mode::train : Mode::eval;
  with_router<T>(kind, {.d_model = c.d, .experts = c.E, .k = c.K, .expert_dropout = {.rate = c.rate, .seed = 3}},
                 [&](auto& router) {
                   set_weight(router, w);
                   const auto xt = to_tensor<T>(x, c.tokens, c.d);
                   Routing<T> r;
                   router.forward(xt.matrix(), r, mode);
                   const std::vector<int> ids(r.experts.data(), r.experts.data() + r.experts.size());
                   if (mode == Mode::eval) {  // the selection itself is the reference's
                     const auto s = ref_logits(x, w, c.tokens, c.d, c.E);
                     for (index_t t = 0; t < c.tokens; ++t) {
                       const auto ref = ref_topk(s.data() + t * c.E, c.E, c.K);
                       REQUIRE(std::equal(ref.begin(), ref.end(), ids.begin() + t * c.K));
                     }
                   }
                   auto dg = to_tensor<T>(cg, c.tokens, c.K);
                   auto dl = to_tensor<T>(cl, c.tokens, c.E);
                   auto dx = to_tensor<T>(dx0, c.tokens, c.d);
                   auto& grad = router.weight().grad;
                   for (index_t i = 0; i < grad.size(); ++i) grad[i] = T(gw0[static_cast<std::size_t>(i)]);
                   router.backward(xt.matrix(), r, dg.matrix(), dl.matrix(), dx.matrix());

                   auto J = [&] {
                     return objective(kind, ref_logits(x, w, c.tokens, c.d, c.E), ids, cg, cl, c.tokens, c.E, c.K);
                   };
                   const double h = 1e-5;
                   std::vector<double> gw(w.size()), gx(x.size()), got_w(w.size()), got_x(x.size());
                   for (std::size_t i = 0; i < w.size(); ++i) {
                     gw[i] = test::central_difference(w, i, h, J);
                     got_w[i] = double(grad[static_cast<index_t>(i)]) - gw0[i];
                   }
                   for (std::size_t i = 0; i < x.size(); ++i) {
                     gx[i] = test::central_difference(x, i, h, J);
                     got_x[i] = double(dx[static_cast<index_t>(i)]) - dx0[i];
                   }
                   require_grad_close(got_w, gw, test::grad_tolerance<T>(), "d weight");
                   require_grad_close(got_x, gx, test::grad_tolerance<T>(), "dx");

                   // d_logits on exit = ∂J/∂s (the losses' part c2 plus the gates' part).
                   auto s = ref_logits(x, w, c.tokens, c.d, c.E);
                   std::vector<double> gs(s.size());
                   for (std::size_t i = 0; i < s.size(); ++i)
                     gs[i] = test::central_difference(s, i, h, [&] { return objective(kind, s, ids, cg, cl, c.tokens, c.E, c.K); });
                   require_grad_close(dl, gs, test::grad_tolerance<T>(), "d_logits");
                 });
}

// ---------------------------------------------------------------------------------------------
// select_topk
// ---------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("select_topk agrees with a naive stable sort (small and large k)", "[routing][topk]", float, double) {
  using T = TestType;
  const index_t n = GENERATE(1, 2, 5, 16, 17, 31, 64, 100, 1000, 1024, 1025);
  std::vector<index_t> ks = {1, 2, 3, 8, 15, 16, 17, 18, 40, n / 2, n - 1, n};
  ks.erase(std::remove_if(ks.begin(), ks.end(), [&](index_t k) { return k < 1 || k > n; }), ks.end());
  for (int variant = 0; variant < 4; ++variant) {
    // 0: few distinct values (many ties)   1: Gaussian   2: ties with ±Inf   3: Gaussian with NaN/+Inf
    std::vector<double> s(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) {
      const double u = uniform01(200 + std::uint64_t(variant), std::uint64_t(i));
      double v = variant == 0 || variant == 2 ? std::floor(u * 5.0) : standard_normal(300, std::uint64_t(i));
      if (variant == 2 && u < 0.1) v = -kInf;
      if (variant == 2 && u > 0.92) v = kInf;
      if (variant == 3 && u < 0.15) v = kNaN;
      if (variant == 3 && u > 0.95) v = kInf;
      s[static_cast<std::size_t>(i)] = double(T(v));
    }
    std::vector<T> st(s.begin(), s.end());
    for (const bool with_drop : {false, true}) {
      std::vector<std::uint8_t> drop(static_cast<std::size_t>(n));
      for (index_t i = 0; i < n; ++i) drop[static_cast<std::size_t>(i)] = uniform01(400, std::uint64_t(i)) < 0.3;
      for (index_t k : ks) {
        INFO("n=" << n << " k=" << k << " variant " << variant << " dropped " << with_drop);
        std::vector<std::int32_t> out(static_cast<std::size_t>(k), -7);
        select_topk(st.data(), n, k, out.data(), with_drop ? drop.data() : nullptr);
        const auto ref = ref_topk(s.data(), n, k, with_drop ? drop.data() : nullptr);
        REQUIRE(std::vector<int>(out.begin(), out.end()) == ref);
      }
    }
  }
}

TEMPLATE_TEST_CASE("select_topk: NaN ranks below every number, -Inf included", "[routing][topk]", float, double) {
  using T = TestType;
  const T nan = std::numeric_limits<T>::quiet_NaN(), inf = std::numeric_limits<T>::infinity();
  std::int32_t out[3];
  {
    const T s[4] = {nan, T(-1), nan, T(2)};
    select_topk(s, 4, 3, out);
    REQUIRE((out[0] == 3 && out[1] == 1 && out[2] == 0));
  }
  {
    const T s[3] = {nan, nan, nan};
    select_topk(s, 3, 2, out);
    REQUIRE((out[0] == 0 && out[1] == 1));
  }
  for (const index_t k : {index_t(1), index_t(17)}) {  // both selection paths
    std::vector<T> s(20, nan);
    s[5] = -inf;
    std::vector<std::int32_t> o(static_cast<std::size_t>(k));
    select_topk(s.data(), 20, k, o.data());
    INFO("k=" << k);
    REQUIRE(o[0] == 5);  // documented: "NaN ranks below -Inf"
  }
}

TEST_CASE("CapacityPolicy: C = ceil(c·T·K/E), and a huge factor keeps every assignment", "[routing][capacity]") {
  CapacityPolicy p{.capacity_factor = 1.25};
  REQUIRE(p.capacity(10, 2, 4) == 7);  // ceil(6.25)
  REQUIRE(p.capacity(0, 2, 4) == 0);
  // Past T·K the value is capped: 1e300 used to overflow the cast (a negative C dropped everything).
  for (const double c : {1e300, 1e18, double(std::numeric_limits<float>::max())}) {
    p.capacity_factor = c;
    INFO("capacity_factor=" << c);
    REQUIRE(p.capacity(10, 2, 4) == 20);
    Routing<double> r;
    r.experts.resize({3, 2});
    r.gates.resize({3, 2});
    const std::int32_t ids[6] = {0, 1, 0, 1, 0, 1};  // expert 0 and 1 each take all three tokens
    std::copy_n(ids, 6, r.experts.data());
    r.gates.fill(0.5);
    Tensor<std::int32_t> kept;
    REQUIRE(apply_capacity(p, 4, r, kept) == 0);
    for (index_t i = 0; i < 6; ++i) REQUIRE(kept[i] == ids[i]);
  }
}
