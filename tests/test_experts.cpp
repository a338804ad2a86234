// Expert pools, activations and the dense / Top-K-activation MLP baselines against naive
// double-precision references and finite differences.
#include <smoe/experts/feed_forward_experts.hpp>
#include <smoe/layers/dense_mlp.hpp>
#include <smoe/train/gradient_check.hpp>

#include "catch.hpp"
#include "helpers.hpp"
#include "reference.hpp"

using namespace smoe;
namespace ref = smoe::test::ref;

namespace {

template <class X>
std::vector<double> as_double(const X& t) {
  std::vector<double> v(static_cast<std::size_t>(t.size()));
  for (index_t i = 0; i < t.size(); ++i) v[i] = double(t[i]);
  return v;
}

template <class A>
constexpr ref::Act ref_act() {
  if constexpr (std::is_same_v<A, Relu>) return ref::Act::relu;
  if constexpr (std::is_same_v<A, Gelu>) return ref::Act::gelu;
  return ref::Act::swiglu;
}

// A dispatch from random ids in [-1, E) (so some assignments are empty) and random gates.
template <class T>
Dispatch<T> random_dispatch(index_t tokens, index_t K, index_t E, std::uint64_t seed) {
  Tensor<std::int32_t> ids({tokens, K});
  Tensor<T> gates({tokens, K});
  for (index_t i = 0; i < ids.size(); ++i) {
    ids[i] = std::int32_t(uniform01(seed, std::uint64_t(i)) * double(E + 1)) - 1;
    gates[i] = T(uniform01(seed, std::uint64_t(i), 1));
  }
  Dispatch<T> d;
  build_dispatch(std::as_const(ids).matrix(), std::as_const(gates).matrix(), E, d);
  return d;
}

}  // namespace

TEST_CASE("activations match their closed forms", "[experts]") {
  const double x[3] = {-1.5, 0.0, 1.0};
  double h[3], dh[3] = {1, 1, 1}, dpre[3];
  Gelu::forward(x, h, 3);
  CHECK(h[2] == Approx(0.8413447460685429).epsilon(1e-14));  // 1·Φ(1)
  CHECK(h[0] == Approx(-1.5 * 0.0668072012688581).epsilon(1e-12));
  Relu::forward(x, h, 3);
  CHECK((h[0] == 0 && h[1] == 0 && h[2] == 1));
  Relu::backward(x, dh, dpre, 3);
  CHECK((dpre[0] == 0 && dpre[1] == 0 && dpre[2] == 1));
  const double gu[4] = {2.0, -1.0, 3.0, 0.5};  // gate half {2, -1}, up half {3, 0.5}
  double g[2];
  SwiGlu::forward(gu, g, 2);
  CHECK(g[0] == Approx(2.0 / (1 + std::exp(-2.0)) * 3.0).epsilon(1e-14));
  CHECK(g[1] == Approx(-1.0 / (1 + std::exp(1.0)) * 0.5).epsilon(1e-14));
}

TEMPLATE_TEST_CASE("activation derivatives match finite differences", "[experts]", Gelu, SwiGlu) {
  const index_t G = 5, H = TestType::fan * G;
  std::vector<double> pre(H), dh(G), dpre(H), h(G);
  for (index_t i = 0; i < H; ++i) pre[i] = standard_normal(3, i) * 2;
  for (index_t i = 0; i < G; ++i) dh[i] = standard_normal(4, i);
  TestType::backward(pre.data(), dh.data(), dpre.data(), G);
  for (index_t i = 0; i < H; ++i) {
    auto f = [&](double delta) {
      auto p = pre;
      p[i] += delta;
      TestType::forward(p.data(), h.data(), G);
      double s = 0;
      for (index_t j = 0; j < G; ++j) s += h[j] * dh[j];
      return s;
    };
    CHECK(dpre[i] == Approx((f(1e-6) - f(-1e-6)) / 2e-6).epsilon(1e-7).margin(1e-9));
  }
}

TEMPLATE_PRODUCT_TEST_CASE("FeedForwardExperts forward matches the naive reference", "[experts]",
                           FeedForwardExperts, ((float, Relu), (double, Relu), (float, Gelu), (double, Gelu),
                                                (float, SwiGlu), (double, SwiGlu))) {
  using T = typename TestType::scalar_type;
  using Act = typename TestType::activation;
  const bool bias = GENERATE(false, true);
  const index_t d = 7, E = 4, G = 5, K = 2, tokens = 9, H = Act::fan * G;
  TestType experts({.d_model = d, .experts = E, .hidden = G, .bias = bias});
  experts.for_each_parameter([seed = std::uint64_t(100)](std::string_view, auto& p) mutable { test::randomize(p.value, seed++, 0.5); });
  const auto x = test::random_matrix<T>(tokens, d, 11);
  const auto dispatch = random_dispatch<T>(tokens, K, E, 5);
  Tensor<T> ys({dispatch.assignments(), d});
  experts.forward(x.matrix(), dispatch, ys.matrix());

  const auto xd = as_double(x), w1 = as_double(experts.w1().value), w2 = as_double(experts.w2().value);
  const auto b1 = as_double(experts.b1().value), b2 = as_double(experts.b2().value);
  std::vector<double> expected;
  for (index_t s = 0; s < dispatch.assignments(); ++s) {
    index_t e = 0;
    while (dispatch.expert_end(e) <= s) ++e;
    const auto o = ref::expert(ref_act<Act>(), d, G, &xd[dispatch.slot_token[s] * d], &w1[e * d * H], &w2[e * G * d],
                               bias ? &b1[e * H] : nullptr, bias ? &b2[e * d] : nullptr);
    expected.insert(expected.end(), o.begin(), o.end());
  }
  test::require_close(ys, expected, test::tolerance<T>(), test::tolerance<T>(), "ys");
}

TEMPLATE_TEST_CASE("FeedForwardExperts backward matches finite differences", "[experts]", Relu, Gelu, SwiGlu) {
  const index_t d = 5, E = 3, G = 4, K = 2, tokens = 6;
  FeedForwardExperts<double, TestType> experts({.d_model = d, .experts = E, .hidden = G, .bias = true});
  experts.for_each_parameter([seed = std::uint64_t(100)](std::string_view, auto& p) mutable { test::randomize(p.value, seed++, 0.7); });
  auto x = test::random_matrix<double>(tokens, d, 21);
  const auto dispatch = random_dispatch<double>(tokens, K, E, 8);
  const auto c = test::random_matrix<double>(dispatch.assignments(), d, 22);
  Tensor<double> ys({dispatch.assignments(), d}), dx({tokens, d});
  auto objective = [&] {
    experts.forward(x.matrix(), dispatch, ys.matrix());
    double s = 0;
    for (index_t i = 0; i < ys.size(); ++i) s += ys[i] * c[i];
    return s;
  };
  objective();
  zero_grad(experts);
  experts.backward(x.matrix(), dispatch, c.matrix(), dx.matrix());
  const auto r = check_parameter_gradients(experts, objective, 1e-6, 1000);
  INFO(r.worst_parameter << "[" << r.worst_index << "]");
  CHECK(r.worst_error < 1e-7);
  test::require_input_gradient(x, dx, objective, 1e-7);
}

TEST_CASE("FeedForwardExperts rejects mismatched inputs", "[experts][errors]") {
  ReluExperts<float> experts({.d_model = 4, .experts = 3, .hidden = 2});
  const auto dispatch = random_dispatch<float>(5, 1, 3, 1);
  Tensor<float> x({5, 3}), ys({dispatch.assignments(), 4});
  REQUIRE_THROWS_WITH(experts.forward(x.matrix(), dispatch, ys.matrix()), Catch::Contains("x must be [5, 4], got [5, 3]"));
  const auto other = random_dispatch<float>(5, 1, 4, 1);
  Tensor<float> x4({5, 4});
  REQUIRE_THROWS_WITH(experts.forward(x4.matrix(), other, ys.matrix()), Catch::Contains("dispatch.experts must be 3, got 4"));
  REQUIRE_THROWS_AS(ReluExperts<float>({.d_model = 4, .experts = 0, .hidden = 2}), smoe::error);
  REQUIRE_THROWS_WITH(ReluExperts<float>({.d_model = 4, .experts = 2, .hidden = 0}), Catch::Contains("hidden"));
}

TEMPLATE_TEST_CASE("DenseMLP and the Top-K-activation MLP match the naive reference", "[dense]", float, double) {
  using T = TestType;
  const index_t d = 6, dff = 12, tokens = 5;
  const index_t topk = GENERATE(0, 3);
  DenseMLP<T, Gelu> mlp({.d_model = d, .hidden = dff, .bias = true, .topk = topk});
  mlp.for_each_parameter([seed = std::uint64_t(100)](std::string_view, auto& p) mutable { test::randomize(p.value, seed++, 0.5); });
  const auto x = test::random_matrix<T>(tokens, d, 3);
  Tensor<T> y({tokens, d});
  mlp.forward(x.matrix(), y.matrix());
  const auto xd = as_double(x), w1 = as_double(mlp.w1().value), w2 = as_double(mlp.w2().value);
  const auto b1 = as_double(mlp.b1().value), b2 = as_double(mlp.b2().value);
  std::vector<double> expected;
  for (index_t t = 0; t < tokens; ++t) {
    std::vector<double> h(dff);
    for (index_t j = 0; j < dff; ++j) {
      double a = b1[j];
      for (index_t i = 0; i < d; ++i) a += xd[t * d + i] * w1[i * dff + j];
      h[j] = 0.5 * a * (1 + std::erf(a / std::sqrt(2.0)));
    }
    if (topk > 0) {
      const auto keep = ref::topk(h, int(topk));
      std::vector<double> kept(dff, 0.0);
      for (int j : keep) kept[j] = h[j];
      h = kept;
    }
    for (index_t c = 0; c < d; ++c) {
      double o = b2[c];
      for (index_t j = 0; j < dff; ++j) o += h[j] * w2[j * d + c];
      expected.push_back(o);
    }
  }
  test::require_close(y, expected, test::tolerance<T>(), test::tolerance<T>(), "y");
}

TEST_CASE("DenseMLP and Top-K MLP gradients match finite differences", "[dense]") {
  const index_t d = 5, dff = 8, tokens = 4;
  const index_t topk = GENERATE(0, 3);
  DenseMLP<double, SwiGlu> mlp({.d_model = d, .hidden = dff, .bias = true, .topk = topk});
  mlp.for_each_parameter([seed = std::uint64_t(100)](std::string_view, auto& p) mutable { test::randomize(p.value, seed++, 0.6); });
  auto x = test::random_matrix<double>(tokens, d, 9);
  const auto c = test::random_matrix<double>(tokens, d, 10);
  Tensor<double> y({tokens, d}), dx({tokens, d});
  auto objective = [&] {
    mlp.forward(x.matrix(), y.matrix());
    double s = 0;
    for (index_t i = 0; i < y.size(); ++i) s += y[i] * c[i];
    return s;
  };
  objective();
  zero_grad(mlp);
  mlp.backward(c.matrix(), dx.matrix());
  const auto r = check_parameter_gradients(mlp, objective, 1e-6, 1000);
  INFO(r.worst_parameter << "[" << r.worst_index << "]");
  CHECK(r.worst_error < 1e-7);
  test::require_input_gradient(x, dx, objective, 1e-7);
}

TEST_CASE("DenseMLP with a plain ReLU (fused into its first GEMM): reference and finite differences", "[dense]") {
  const index_t d = 5, dff = 40, tokens = 7;
  const bool bias = GENERATE(false, true);
  DenseMLP<double, Relu> mlp({.d_model = d, .hidden = dff, .bias = bias});
  mlp.for_each_parameter([seed = std::uint64_t(300)](std::string_view, auto& p) mutable { test::randomize(p.value, seed++, 0.6); });
  auto x = test::random_matrix<double>(tokens, d, 19);
  const auto c = test::random_matrix<double>(tokens, d, 20);
  Tensor<double> y({tokens, d}), dx({tokens, d});
  mlp.forward(x.matrix(), y.matrix());
  std::vector<double> expected;
  for (index_t t = 0; t < tokens; ++t) {
    std::vector<double> h(dff);
    for (index_t j = 0; j < dff; ++j) {
      double a = bias ? mlp.b1().value[j] : 0.0;
      for (index_t i = 0; i < d; ++i) a += x[t * d + i] * mlp.w1().value[i * dff + j];
      h[j] = a > 0 ? a : 0;
    }
    for (index_t o = 0; o < d; ++o) {
      double v = bias ? mlp.b2().value[o] : 0.0;
      for (index_t j = 0; j < dff; ++j) v += h[j] * mlp.w2().value[j * d + o];
      expected.push_back(v);
    }
  }
  test::require_close(y, expected, 1e-12, 1e-12, "y");
  auto objective = [&] {
    mlp.forward(x.matrix(), y.matrix());
    double s = 0;
    for (index_t i = 0; i < y.size(); ++i) s += y[i] * c[i];
    return s;
  };
  objective();
  zero_grad(mlp);
  mlp.backward(c.matrix(), dx.matrix());
  const auto r = check_parameter_gradients(mlp, objective, 1e-6, 1000);
  INFO(r.worst_parameter << "[" << r.worst_index << "]");
  CHECK(r.worst_error < 1e-7);
  test::require_input_gradient(x, dx, objective, 1e-7);
}
