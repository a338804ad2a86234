// Product-key memory (Lample et al. 2019; sigma-MoE, Csordás et al. 2023, Sec. 3.2):
// ProductKeyRouter against a naive reference that scores all N² sub-key combinations per head and
// fully sorts them (so the K×K shortcut is checked to find the true top-K, ties included),
// ValueExperts against plain loops, the whole MoE<ProductKeyRouter, ValueExperts> layer against
// the reference and central finite differences, edge cases, bad input, init and determinism.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <set>
#include <string_view>
#include <vector>

#include <smoe/combine/weighted_sum.hpp>
#include <smoe/core/dispatch.hpp>
#include <smoe/core/rng.hpp>
#include <smoe/experts/feed_forward_experts.hpp>
#include <smoe/experts/value_experts.hpp>
#include <smoe/layers/accounting.hpp>
#include <smoe/layers/moe.hpp>
#include <smoe/losses/importance.hpp>
#include <smoe/losses/switch_balance.hpp>
#include <smoe/routing/product_key_router.hpp>
#include <smoe/train/gradient_check.hpp>
#include <smoe/train/init.hpp>

#include "catch.hpp"
#include "helpers.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

using namespace smoe;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

std::vector<double> gaussian(index_t n, std::uint64_t seed, double std = 1.0) {
  std::vector<double> v(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) v[std::size_t(i)] = std * standard_normal(seed, std::uint64_t(i), 21);
  return v;
}

// Integers in {-1, 0, 1}: sums are exact, so equal scores are exactly equal (many ties).
std::vector<double> small_integers(index_t n, std::uint64_t seed) {
  std::vector<double> v(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) v[std::size_t(i)] = double(philox4x32(seed, std::uint64_t(i), 5)[0] % 3) - 1.0;
  return v;
}

template <class T>
Tensor<T> to_tensor(const std::vector<double>& v, index_t rows, index_t cols) {
  Tensor<T> t({rows, cols});
  for (index_t i = 0; i < t.size(); ++i) t[i] = T(v[std::size_t(i)]);
  return t;
}

template <class T>
void set_values(Parameter<T>& p, const std::vector<double>& v) {
  REQUIRE(p.value.size() == index_t(v.size()));
  for (index_t i = 0; i < p.value.size(); ++i) p.value[i] = T(v[std::size_t(i)]);
}

template <class V>
std::vector<double> as_doubles(const V& v) {
  std::vector<double> out(static_cast<std::size_t>(v.size()));
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = double(v[i]);
  return out;
}

// ----- naive reference (double, plain loops, full sort over all N² combinations) -----

struct PkmRef {
  index_t d = 0, N = 0, H = 0, K = 0;
  PkmActivation act = PkmActivation::relu;
  std::vector<double> ka, kb;  // [H, N, d/2]
  std::vector<double> values;  // [N², d]

  std::vector<int> ids;          // [T, H·K]
  std::vector<double> scores;    // [T, H·K], before the activation
  std::vector<double> gates;     // [T, H·K]

  void route(const std::vector<double>& x, index_t T) {
    const index_t half = d / 2, E = N * N;
    ids.clear(), scores.clear(), gates.clear();
    for (index_t t = 0; t < T; ++t) {
      for (index_t h = 0; h < H; ++h) {
        std::vector<double> full(static_cast<std::size_t>(E));
        for (index_t i = 0; i < N; ++i)
          for (index_t j = 0; j < N; ++j) {
            double ua = 0, ub = 0;
            for (index_t c = 0; c < half; ++c) {
              ua += x[std::size_t(t * d + c)] * ka[std::size_t((h * N + i) * half + c)];
              ub += x[std::size_t(t * d + half + c)] * kb[std::size_t((h * N + j) * half + c)];
            }
            full[std::size_t(i * N + j)] = ua + ub;  // value id i·N + j
          }
        std::vector<int> order(static_cast<std::size_t>(E));
        std::iota(order.begin(), order.end(), 0);
        // Descending score, NaN last; stable, so ties keep the smaller id first.
        std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
          const double sa = full[std::size_t(a)], sb = full[std::size_t(b)];
          if (std::isnan(sa) || std::isnan(sb)) return !std::isnan(sa) && std::isnan(sb);
          return sa > sb;
        });
        for (index_t k = 0; k < K; ++k) {
          ids.push_back(order[std::size_t(k)]);
          scores.push_back(full[std::size_t(order[std::size_t(k)])]);
        }
      }
      const double* s = &scores[std::size_t(t * H * K)];
      auto softmax = [&](index_t begin, index_t n) {
        double m = -kInf, z = 0;
        for (index_t q = begin; q < begin + n; ++q) m = std::max(m, s[q]);
        for (index_t q = begin; q < begin + n; ++q) z += std::exp(s[q] - m);
        for (index_t q = begin; q < begin + n; ++q) gates.push_back(std::exp(s[q] - m) / z);
      };
      if (act == PkmActivation::relu)
        for (index_t q = 0; q < H * K; ++q) gates.push_back(s[q] > 0 ? s[q] : 0.0);
      if (act == PkmActivation::softmax)
        for (index_t h = 0; h < H; ++h) softmax(h * K, K);
      if (act == PkmActivation::softmax_across_heads) softmax(0, H * K);
    }
  }

  // y[t] = Σ_q gate[t, q] · values[id[t, q]] (after route).
  std::vector<double> layer_output(index_t T) const {
    std::vector<double> y(std::size_t(T * d), 0.0);
    for (index_t t = 0; t < T; ++t)
      for (index_t q = 0; q < H * K; ++q) {
        const std::size_t a = std::size_t(t * H * K + q);
        for (index_t c = 0; c < d; ++c) y[std::size_t(t * d + c)] += gates[a] * values[std::size_t(ids[a] * d + c)];
      }
    return y;
  }
};

PkmRef make_ref(index_t d, index_t N, index_t H, index_t K, PkmActivation act, std::uint64_t seed) {
  PkmRef r;
  r.d = d, r.N = N, r.H = H, r.K = K, r.act = act;
  r.ka = gaussian(H * N * (d / 2), seed);
  r.kb = gaussian(H * N * (d / 2), seed + 1);
  r.values = gaussian(N * N * d, seed + 2, 0.5);
  return r;
}

template <class T>
ProductKeyRouter<T> make_router(const PkmRef& r) {
  ProductKeyRouter<T> router({.d_model = r.d, .n_keys = r.N, .heads = r.H, .k = r.K, .activation = r.act});
  set_values(router.keys_a(), r.ka);
  set_values(router.keys_b(), r.kb);
  return router;
}

template <class T>
auto make_layer(const PkmRef& r) {
  MoE layer(make_router<T>(r), ValueExperts<T>({.d_model = r.d, .values = r.N * r.N}));
  set_values(layer.experts().values(), r.values);
  return layer;
}

// Routes x with the library router and the reference; ids must agree exactly, gates closely.
template <class T>
void check_route(PkmRef r, const std::vector<double>& x, index_t tokens) {
  auto router = make_router<T>(r);
  const auto xt = to_tensor<T>(x, tokens, r.d);
  Routing<T> out;
  router.forward(xt.matrix(), out, Mode::train);
  r.route(x, tokens);
  REQUIRE(out.logits.rank() == 2);
  CHECK(out.logits.dim(0) == tokens);
  CHECK(out.logits.dim(1) == 0);
  REQUIRE(out.experts.dim(0) == tokens);
  REQUIRE(out.experts.dim(1) == r.H * r.K);
  REQUIRE(as_doubles(out.experts) == std::vector<double>(r.ids.begin(), r.ids.end()));
  const double tol = 10 * test::tolerance<T>();
  test::require_close(out.gates, r.gates, tol, tol, "gates");
}

// Σ y ⊙ dy + aux: the objective whose gradient backward(dy) returns.
template <class Layer, class T>
double objective(Layer& layer, const Tensor<T>& x, const Tensor<T>& dy, Mode mode = Mode::eval) {
  Tensor<T> y({x.dim(0), x.dim(1)});
  const auto out = layer.forward(x.matrix(), y.matrix(), mode);
  double s = double(out.aux_loss);
  for (index_t i = 0; i < y.size(); ++i) s += double(y[i]) * double(dy[i]);
  return s;
}

// Checks every parameter gradient and dx of `layer` against central differences (as in test_moe.cpp).
template <class Layer>
void check_layer_gradients(Layer& layer, index_t tokens, double tol = 1e-7) {
  const index_t d = layer.d_model();
  auto x = test::random_matrix<double>(tokens, d, 31);
  const auto dy = test::random_matrix<double>(tokens, d, 32);
  Tensor<double> y({tokens, d}), dx({tokens, d});
  zero_grad(layer);
  layer.forward(x.matrix(), y.matrix());
  layer.backward(dy.matrix(), dx.matrix());
  const auto r = check_parameter_gradients(layer, [&] { return objective(layer, x, dy); }, 1e-6, 2000);
  INFO("worst parameter " << r.worst_parameter << "[" << r.worst_index << "], error " << r.worst_error);
  CHECK(r.worst_error < tol);
  test::require_input_gradient(x, dx, [&] { return objective(layer, x, dy); }, tol);
}

const char* activation_name(PkmActivation a) {
  return a == PkmActivation::relu ? "relu" : a == PkmActivation::softmax ? "softmax" : "softmax_across_heads";
}

}  // namespace

static_assert(Router<ProductKeyRouter<float>> && Router<ProductKeyRouter<double>>);
static_assert(Experts<ValueExperts<float>> && Experts<ValueExperts<double>>);

TEMPLATE_TEST_CASE("ProductKeyRouter finds the top-K of all N² product scores (full-sort reference)", "[pkm]",
                   float, double) {
  struct Case {
    index_t N, K;
  };
  const auto c = GENERATE(Case{6, 2}, Case{5, 5}, Case{12, 4}, Case{10, 1}, Case{9, 7}, Case{24, 20});
  const index_t H = GENERATE(1, 4);
  const auto act = GENERATE(PkmActivation::relu, PkmActivation::softmax, PkmActivation::softmax_across_heads);
  INFO("N " << c.N << ", K " << c.K << ", H " << H << ", " << activation_name(act));
  const index_t d = 8, tokens = 23;
  const auto r = make_ref(d, c.N, H, c.K, act, 3);
  check_route<TestType>(r, gaussian(tokens * d, 4), tokens);
  const auto router = make_router<TestType>(r);
  CHECK(router.experts() == c.N * c.N);
  CHECK(router.k() == H * c.K);
  CHECK(router.d_model() == d);
}

TEST_CASE("with exact ties the pruned K×K candidates still return the full sort's ids (ties to smaller ids)", "[pkm][ties]") {
  // Integer keys and inputs make many sums exactly equal, at the sub-key and at the product stage.
  const index_t d = 6, N = 7, H = 2, tokens = 60;
  const index_t K = GENERATE(1, 3, 5, 6, 7);
  PkmRef r;
  r.d = d, r.N = N, r.H = H, r.K = K, r.act = PkmActivation::relu;
  r.ka = small_integers(H * N * d / 2, 1);
  r.kb = small_integers(H * N * d / 2, 2);
  const auto x = small_integers(tokens * d, 3);
  check_route<double>(r, x, tokens);
  check_route<float>(r, x, tokens);
  // The data does exercise ties at the cut: some token has its K-th and (K+1)-th best sums equal.
  bool tie_at_cut = false;
  PkmRef wider = r;
  wider.K = std::min(K + 1, N);
  wider.route(x, tokens);
  for (index_t q = 0; q < tokens * H && K < N; ++q)
    tie_at_cut |= wider.scores[std::size_t(q * (K + 1) + K - 1)] == wider.scores[std::size_t(q * (K + 1) + K)];
  if (K < N) CHECK(tie_at_cut);
}

TEST_CASE("all-equal scores select the smallest value ids", "[pkm][ties]") {
  const index_t d = 4, N = 5, H = 3, tokens = 4;
  const index_t K = GENERATE(1, 3, 5);
  for (auto act : {PkmActivation::relu, PkmActivation::softmax, PkmActivation::softmax_across_heads}) {
    ProductKeyRouter<double> router({.d_model = d, .n_keys = N, .heads = H, .k = K, .activation = act});
    // Zero keys: every sub-key score is 0, so every product score ties.
    const auto x = test::random_matrix<double>(tokens, d, 8);
    Routing<double> out;
    router.forward(x.matrix(), out, Mode::eval);
    for (index_t t = 0; t < tokens; ++t)
      for (index_t h = 0; h < H; ++h)
        for (index_t k = 0; k < K; ++k) {
          const index_t q = (t * H + h) * K + k;
          CHECK(out.experts[q] == k);  // (i, j) = (0, k): ids 0, 1, ..., K − 1
          const double expected =
              act == PkmActivation::relu ? 0.0 : act == PkmActivation::softmax ? 1.0 / double(K) : 1.0 / double(H * K);
          CHECK(out.gates[q] == Approx(expected).epsilon(1e-15));
        }
  }
}

TEST_CASE("NaN and Inf never route out of bounds; ids of a head stay distinct", "[pkm][nan]") {
  const index_t d = 6, N = 4, H = 2, K = 3, tokens = 6;
  for (auto act : {PkmActivation::relu, PkmActivation::softmax, PkmActivation::softmax_across_heads}) {
    auto r = make_ref(d, N, H, K, act, 11);
    r.ka[5] = kNaN;   // head 0, sub-key 1 of the first half: u_a[1] is NaN for every token
    r.kb[14] = kInf;  // head 1, sub-key 0 of the second half: u_b[0] is ±Inf or NaN
    auto router = make_router<float>(r);
    auto x = to_tensor<float>(gaussian(tokens * d, 12), tokens, d);
    x[1 * d + 0] = std::numeric_limits<float>::quiet_NaN();
    x[2 * d + 4] = std::numeric_limits<float>::infinity();
    x[3 * d + 1] = -std::numeric_limits<float>::infinity();
    for (index_t c = 0; c < d; ++c) x[4 * d + c] = std::numeric_limits<float>::quiet_NaN();
    Routing<float> out;
    router.forward(x.matrix(), out, Mode::eval);
    for (index_t t = 0; t < tokens; ++t)
      for (index_t h = 0; h < H; ++h) {
        std::set<int> seen;
        for (index_t k = 0; k < K; ++k) {
          const auto e = out.experts[(t * H + h) * K + k];
          CHECK((e >= 0 && e < N * N));
          seen.insert(e);
        }
        CHECK(index_t(seen.size()) == K);
      }
    // The whole layer runs (ASan job: no out-of-bounds access in forward or backward).
    MoE layer(std::move(router), ValueExperts<float>({d, N * N}), WeightedSum<float>{}, ImportanceLoss<float>(0.1));
    layer.validate_inputs = false;
    Tensor<float> y({tokens, d}), dx({tokens, d});
    layer.forward(x.matrix(), y.matrix());
    layer.backward(y.matrix(), dx.matrix());
  }
}

TEST_CASE("ValueExperts returns value rows and sums their gradients; dx is written as zeros", "[pkm][values]") {
  const index_t d = 5, E = 7, K = 3, tokens = 9;
  ValueExperts<double> experts({.d_model = d, .values = E});
  test::randomize(experts.values().value, 4);
  // Ids with repeats and empty assignments.
  Tensor<std::int32_t> ids({tokens, K});
  for (index_t i = 0; i < ids.size(); ++i) ids[i] = std::int32_t(philox4x32(6, std::uint64_t(i))[0] % (E + 1)) - 1;
  const auto gates = test::random_matrix<double>(tokens, K, 5);
  Dispatch<double> dispatch;
  build_dispatch(std::as_const(ids).matrix(), gates.matrix(), E, dispatch);
  const auto x = test::random_matrix<double>(tokens, d, 6);
  Tensor<double> ys({dispatch.assignments(), d});
  experts.forward(x.matrix(), dispatch, ys.matrix());
  for (index_t t = 0; t < tokens; ++t)
    for (index_t k = 0; k < K; ++k) {
      const auto s = dispatch.slot(t, k);
      if (s < 0) continue;
      for (index_t c = 0; c < d; ++c) REQUIRE(ys[s * d + c] == experts.values().value[ids[t * K + k] * d + c]);
    }
  const auto dys = test::random_matrix<double>(dispatch.assignments(), d, 7);
  Tensor<double> dx({tokens, d});
  dx.fill(7.0);
  zero_grad(experts);
  experts.backward(x.matrix(), dispatch, dys.matrix(), dx.matrix());
  std::vector<double> expected(std::size_t(E * d), 0.0);
  for (index_t t = 0; t < tokens; ++t)
    for (index_t k = 0; k < K; ++k)
      if (const auto s = dispatch.slot(t, k); s >= 0)
        for (index_t c = 0; c < d; ++c) expected[std::size_t(ids[t * K + k] * d + c)] += dys[s * d + c];
  test::require_close(experts.values().grad, expected, 1e-14, 1e-14, "values.grad");
  for (index_t i = 0; i < dx.size(); ++i) REQUIRE(dx[i] == 0.0);
  CHECK(experts.experts() == E);
  CHECK(parameter_count(experts) == E * d);
}

TEST_CASE("router backward adds into dx and matches finite differences of Σ gates ⊙ w", "[pkm][grad]") {
  const index_t d = 6, N = 5, K = 3, tokens = 7;
  const index_t H = GENERATE(1, 4);
  const auto act = GENERATE(PkmActivation::relu, PkmActivation::softmax, PkmActivation::softmax_across_heads);
  INFO("H " << H << ", " << activation_name(act));
  auto router = make_router<double>(make_ref(d, N, H, K, act, 20));
  auto x = to_tensor<double>(gaussian(tokens * d, 21), tokens, d);
  const auto w = test::random_matrix<double>(tokens, H * K, 22);
  auto f = [&] {
    Routing<double> r;
    router.forward(x.matrix(), r, Mode::eval);
    double s = 0;
    for (index_t i = 0; i < r.gates.size(); ++i) s += r.gates[i] * w[i];
    return s;
  };
  Routing<double> r;
  router.forward(x.matrix(), r, Mode::eval);
  Tensor<double> d_logits({tokens, 0}), dx({tokens, d}), dx_ones({tokens, d});
  dx.zero();
  dx_ones.fill(1.0);
  zero_grad(router);
  router.backward(x.matrix(), r, w.matrix(), d_logits.matrix(), dx.matrix());
  router.backward(x.matrix(), r, w.matrix(), d_logits.matrix(), dx_ones.matrix());
  for (index_t i = 0; i < dx.size(); ++i) REQUIRE(dx_ones[i] == Approx(dx[i] + 1.0).epsilon(1e-14));
  // Two backward calls accumulated twice the gradient; check against twice the central difference.
  router.for_each_parameter([&](std::string_view name, Parameter<double>& p) {
    for (index_t i = 0; i < p.value.size(); ++i) {
      INFO(name << "[" << i << "]");
      const double numeric = test::central_difference(p.value, std::size_t(i), 1e-6, f);
      CHECK(p.grad[i] == Approx(2 * numeric).epsilon(1e-7).margin(1e-7));
    }
  });
  test::require_input_gradient(x, dx, f);
}

TEST_CASE("a PKM layer is MoE<ProductKeyRouter, ValueExperts>: forward against the reference", "[pkm][moe]") {
  const index_t d = 8, N = 6, K = 3, tokens = 17;
  const index_t H = GENERATE(1, 4);
  const auto act = GENERATE(PkmActivation::relu, PkmActivation::softmax, PkmActivation::softmax_across_heads);
  auto r = make_ref(d, N, H, K, act, 30);
  const auto x = gaussian(tokens * d, 31);
  r.route(x, tokens);
  const auto expected = r.layer_output(tokens);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    auto layer = make_layer<T>(r);
    const auto xt = to_tensor<T>(x, tokens, d);
    Tensor<T> y({tokens, d});
    const auto out = layer.forward(xt.matrix(), y.matrix());
    test::require_close(y, expected, 10 * test::tolerance<T>(), 10 * test::tolerance<T>(), "y");
    CHECK(out.stats.assignments == tokens * H * K);
    CHECK(layer.n_experts() == N * N);
    CHECK(layer.k() == H * K);
  };
  run(float{});
  run(double{});
}

TEST_CASE("PKM layer gradients match finite differences (keys_a, keys_b, values, x)", "[pkm][moe][grad]") {
  const index_t d = 6, N = 4, K = 2, tokens = 5;
  const index_t H = GENERATE(1, 4);
  const auto act = GENERATE(PkmActivation::relu, PkmActivation::softmax, PkmActivation::softmax_across_heads);
  INFO("H " << H << ", " << activation_name(act));
  const auto r = make_ref(d, N, H, K, act, 40);
  SECTION("no loss") {
    auto layer = make_layer<double>(r);
    std::vector<std::string> names;
    layer.for_each_parameter([&](std::string_view name, auto&) { names.emplace_back(name); });
    CHECK(names == std::vector<std::string>{"router.keys_a", "router.keys_b", "experts.values"});
    check_layer_gradients(layer, tokens);
  }
  SECTION("importance loss") {
    MoE layer(make_router<double>(r), ValueExperts<double>({d, N * N}), WeightedSum<double>{},
              ImportanceLoss<double>(0.4));
    set_values(layer.experts().values(), r.values);
    check_layer_gradients(layer, tokens);
  }
  SECTION("T = 1") {
    auto layer = make_layer<double>(r);
    check_layer_gradients(layer, 1);
  }
}

TEST_CASE("ProductKeyRouter also drives feed-forward experts (E = N²)", "[pkm][moe][grad]") {
  const index_t d = 4, N = 3, H = 2, K = 2, G = 3, tokens = 6;
  const auto act = GENERATE(PkmActivation::relu, PkmActivation::softmax);
  const auto r = make_ref(d, N, H, K, act, 50);
  SECTION("relu experts") {
    MoE layer(make_router<double>(r), ReluExperts<double>({d, N * N, G, true}), WeightedSum<double>{},
              ImportanceLoss<double>(0.2));
    std::uint64_t seed = 60;
    layer.experts().for_each_parameter([&](std::string_view, auto& p) { test::randomize(p.value, seed++, 0.6); });
    check_layer_gradients(layer, tokens);
  }
  SECTION("gelu experts") {
    MoE layer(make_router<double>(r), GeluExperts<double>({d, N * N, G}));
    std::uint64_t seed = 70;
    layer.experts().for_each_parameter([&](std::string_view, auto& p) { test::randomize(p.value, seed++, 0.6); });
    check_layer_gradients(layer, tokens);
  }
}

TEST_CASE("K = N (every combination a candidate), T = 1 and T = 0", "[pkm][edge]") {
  const index_t d = 4, N = 3, H = 2;
  const auto r = make_ref(d, N, H, N, PkmActivation::softmax, 80);
  check_route<double>(r, gaussian(d, 81), 1);
  check_route<double>(r, gaussian(9 * d, 82), 9);
  auto layer = make_layer<double>(r);
  Tensor<double> x({0, d}), y({0, d}), dx({0, d});
  const auto out = layer.forward(x.matrix(), y.matrix(), Mode::train);
  CHECK(out.stats.assignments == 0);
  layer.backward(y.matrix(), dx.matrix());
  check_layer_gradients(layer, 1);
}

TEST_CASE("PKM rejects bad configurations and inputs with messages naming the argument", "[pkm][errors]") {
  using R = ProductKeyRouter<float>;
  REQUIRE_THROWS_WITH(R({.d_model = 7, .n_keys = 4, .heads = 1, .k = 2}),
                      Catch::Contains("d_model must be even and >= 2 (x splits into two halves), got 7"));
  REQUIRE_THROWS_WITH(R({.d_model = 0, .n_keys = 4}), Catch::Contains("d_model must be even and >= 2"));
  REQUIRE_THROWS_WITH(R({.d_model = 8, .n_keys = 4, .heads = 1, .k = 5}),
                      Catch::Contains("k must be in [1, n_keys = 4], got 5"));
  REQUIRE_THROWS_WITH(R({.d_model = 8, .n_keys = 4, .heads = 1, .k = 0}),
                      Catch::Contains("k must be in [1, n_keys = 4], got 0"));
  REQUIRE_THROWS_WITH(R({.d_model = 8, .n_keys = 0}), Catch::Contains("n_keys must be in [1, 46340], got 0"));
  REQUIRE_THROWS_WITH(R({.d_model = 8, .n_keys = 50000}), Catch::Contains("n_keys must be in [1, 46340], got 50000"));
  REQUIRE_THROWS_WITH(R({.d_model = 8, .n_keys = 4, .heads = 0}), Catch::Contains("heads must be >= 1, got 0"));
  REQUIRE_THROWS_WITH(R({.d_model = 8, .n_keys = 4, .activation = PkmActivation(7)}),
                      Catch::Contains("activation must be relu, softmax or softmax_across_heads, got 7"));
  REQUIRE_THROWS_WITH(ValueExperts<float>({.d_model = 4, .values = 0}), Catch::Contains("values must be >= 1, got 0"));
  REQUIRE_THROWS_WITH(ValueExperts<float>({.d_model = 0, .values = 3}), Catch::Contains("d_model must be >= 1, got 0"));
  REQUIRE_THROWS_WITH(MoE(R({.d_model = 4, .n_keys = 3}), ValueExperts<float>({4, 8})),
                      Catch::Contains("router.experts() (= experts.experts()) must be 8, got 9"));

  R router({.d_model = 4, .n_keys = 3, .heads = 2, .k = 2});
  Tensor<float> x({5, 4}), wrong({5, 6}), dg({5, 4}), dg_wrong({5, 3}), dl({5, 0}), dx({5, 4});
  x.zero();
  dg.zero();
  Routing<float> r;
  REQUIRE_THROWS_WITH(router.forward(wrong.matrix(), r, Mode::eval), Catch::Contains("x must be [5, 4], got [5, 6]"));
  router.forward(x.matrix(), r, Mode::eval);
  REQUIRE_THROWS_WITH(router.backward(x.matrix(), r, dg_wrong.matrix(), dl.matrix(), dx.matrix()),
                      Catch::Contains("d_gates must be [5, 4], got [5, 3]"));
  r.experts[3] = 9;
  REQUIRE_THROWS_WITH(router.backward(x.matrix(), r, dg.matrix(), dl.matrix(), dx.matrix()),
                      Catch::Contains("routing.experts at (token 0, k 3) must be in [-1, 9), got 9"));

  // The logit-based balance losses do not apply: the router has no logits over N² values.
  MoE layer(R({.d_model = 4, .n_keys = 3, .heads = 2, .k = 2}), ValueExperts<float>({4, 9}), WeightedSum<float>{},
            SwitchBalanceLoss<float>(0.01));
  Tensor<float> y({5, 4});
  REQUIRE_THROWS_WITH(layer.forward(x.matrix(), y.matrix()), Catch::Contains("needs router logits [5, 9]"));
}

TEST_CASE("pkm_init has sigma-MoE's PKM + init statistics and is seeded", "[pkm][init]") {
  const index_t d = 128, N = 32, H = 4;
  auto make = [&] {
    return MoE(ProductKeyRouter<double>({.d_model = d, .n_keys = N, .heads = H, .k = 8}),
               ValueExperts<double>({d, N * N}));
  };
  auto layer = make();
  pkm_init(layer, {.scale = 0.5, .seed = 3});
  auto stats = [](const Tensor<double>& t) {
    double s = 0, sq = 0;
    for (index_t i = 0; i < t.size(); ++i) s += t[i], sq += t[i] * t[i];
    const double n = double(t.size());
    return std::sqrt(sq / n - (s / n) * (s / n));
  };
  CHECK(stats(layer.router().keys_a().value) == Approx(0.5 / std::sqrt(double(d))).epsilon(0.03));
  CHECK(stats(layer.router().keys_b().value) == Approx(0.5 / std::sqrt(double(d))).epsilon(0.03));
  CHECK(stats(layer.experts().values().value) == Approx(0.5 / double(N)).epsilon(0.01));  // n_values^-1/2 = 1/N
  CHECK(layer.router().keys_a().value[10] != layer.router().keys_b().value[10]);
  auto again = make();
  pkm_init(again, {.scale = 0.5, .seed = 3});
  CHECK(again.experts().values().value[17] == layer.experts().values().value[17]);
  CHECK(again.router().keys_b().value[5] == layer.router().keys_b().value[5]);
  pkm_init(again, {.scale = 0.5, .seed = 4});
  CHECK(again.experts().values().value[17] != layer.experts().values().value[17]);
}

TEST_CASE("a 4096-value PKM layer routes like the reference", "[pkm][moe][large]") {
  // sigma-MoE's 262M setting uses N = 64 (4096 values); build_dispatch and the value pool are O(T·H·K + E).
  const index_t d = 16, N = 64, H = 4, K = 8, tokens = 40;
  auto r = make_ref(d, N, H, K, PkmActivation::relu, 90);
  const auto x = gaussian(tokens * d, 91);
  r.route(x, tokens);
  auto layer = make_layer<float>(r);
  const auto xt = to_tensor<float>(x, tokens, d);
  Tensor<float> y({tokens, d}), dx({tokens, d});
  const auto out = layer.forward(xt.matrix(), y.matrix());
  REQUIRE(as_doubles(layer.routing().experts) == std::vector<double>(r.ids.begin(), r.ids.end()));
  test::require_close(y, r.layer_output(tokens), 1e-4, 1e-4, "y");
  CHECK(out.stats.tokens_per_expert.size() == std::size_t(N * N));
  layer.backward(xt.matrix(), dx.matrix());
}

#if defined(_OPENMP)
TEST_CASE("PKM results are bitwise identical for any thread count", "[pkm][determinism]") {
  const index_t d = 16, N = 16, H = 4, K = 4, tokens = 300;  // several token blocks and key blocks
  MoE layer(ProductKeyRouter<float>({.d_model = d, .n_keys = N, .heads = H, .k = K}), ValueExperts<float>({d, N * N}),
            WeightedSum<float>{}, ImportanceLoss<float>(0.1));
  pkm_init(layer, {.seed = 4});
  const auto x = test::random_matrix<float>(tokens, d, 5), dy = test::random_matrix<float>(tokens, d, 6);
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    Tensor<float> y({tokens, d}), dx({tokens, d});
    zero_grad(layer);
    layer.forward(x.matrix(), y.matrix());
    layer.backward(dy.matrix(), dx.matrix());
    std::vector<float> all(y.data(), y.data() + y.size());
    all.insert(all.end(), dx.data(), dx.data() + dx.size());
    layer.for_each_parameter(
        [&](std::string_view, auto& p) { all.insert(all.end(), p.grad.data(), p.grad.data() + p.grad.size()); });
    return all;
  };
  const auto one = run(1), two = run(2);
  omp_set_num_threads(omp_get_num_procs());
  CHECK(one == two);
}
#endif

TEST_CASE("PKM accounting: every key per token, one value row per selected value", "[pkm][accounting]") {
  const index_t d = 8, N = 5, H = 3, K = 2;
  MoE layer(ProductKeyRouter<float>({.d_model = d, .n_keys = N, .heads = H, .k = K}),
            ValueExperts<float>({.d_model = d, .values = N * N}));
  // Keys: H heads × 2 halves × N sub-keys × d/2; values: N² rows of d.
  CHECK(total_parameters(layer) == H * N * d + N * N * d);
  // Per token the router scores all H·N·d key weights; H·K value rows are read and summed.
  CHECK(active_parameters_per_token(layer) == Approx(double(H * N * d + H * K * d)));
  CHECK(flops_per_token(layer) == Approx(2.0 * H * N * d + 2.0 * H * K * d));
}
