// Balance losses (Switch, router z-loss, sigma-MoE entropy, importance CV²) against naive
// double-precision references, closed-form values and finite differences.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <smoe/core/rng.hpp>
#include <smoe/losses/balance_loss.hpp>
#include <smoe/losses/entropy.hpp>
#include <smoe/losses/importance.hpp>
#include <smoe/losses/switch_balance.hpp>
#include <smoe/losses/z_loss.hpp>
#include <smoe/routing/sigmoid_topk.hpp>

#include "catch.hpp"
#include "helpers.hpp"

using namespace smoe;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// ----- naive references (double, plain loops) -----

std::vector<double> softmax_row(const double* s, index_t E) {
  double m = -kInf;
  for (index_t e = 0; e < E; ++e) m = std::max(m, s[e]);
  std::vector<double> p(static_cast<std::size_t>(E));
  double z = 0;
  for (index_t e = 0; e < E; ++e) z += (p[static_cast<std::size_t>(e)] = std::exp(s[e] - m));
  for (auto& v : p) v /= z;
  return p;
}

// Switch: E · Σ_e f_e P_e, f_e = share of tokens whose argmax (first maximum) is e, P_e = mean softmax.
double ref_switch(const std::vector<double>& s, index_t T, index_t E) {
  if (T == 0) return 0;
  std::vector<double> f(static_cast<std::size_t>(E), 0.0), P(static_cast<std::size_t>(E), 0.0);
  for (index_t t = 0; t < T; ++t) {
    const double* row = s.data() + t * E;
    index_t best = 0;
    for (index_t e = 1; e < E; ++e)
      if (row[e] > row[best]) best = e;
    f[static_cast<std::size_t>(best)] += 1.0 / double(T);
    const auto p = softmax_row(row, E);
    for (index_t e = 0; e < E; ++e) P[static_cast<std::size_t>(e)] += p[static_cast<std::size_t>(e)] / double(T);
  }
  double L = 0;
  for (index_t e = 0; e < E; ++e) L += f[static_cast<std::size_t>(e)] * P[static_cast<std::size_t>(e)];
  return double(E) * L;
}

// z-loss: mean_t (log Σ_e exp s_te)².
double ref_z(const std::vector<double>& s, index_t T, index_t E) {
  if (T == 0) return 0;
  double L = 0;
  for (index_t t = 0; t < T; ++t) {
    const double* row = s.data() + t * E;
    double m = -kInf;
    for (index_t e = 0; e < E; ++e) m = std::max(m, row[e]);
    double z = 0;
    for (index_t e = 0; e < E; ++e) z += std::exp(row[e] - m);
    const double lse = m + std::log(z);
    L += lse * lse;
  }
  return L / double(T);
}

// Entropy regularizer: Σ_e p_e log p_e, p = mean_t softmax(s_t), 0·log 0 = 0.
double ref_entropy(const std::vector<double>& s, index_t T, index_t E) {
  if (T == 0) return 0;
  std::vector<double> p(static_cast<std::size_t>(E), 0.0);
  for (index_t t = 0; t < T; ++t) {
    const auto q = softmax_row(s.data() + t * E, E);
    for (index_t e = 0; e < E; ++e) p[static_cast<std::size_t>(e)] += q[static_cast<std::size_t>(e)] / double(T);
  }
  double L = 0;
  for (double v : p)
    if (v > 0) L += v * std::log(v);
  return L;
}

// Importance: CV² of I_e = Σ gates routed to e (population variance), 0 when the mean is 0.
double ref_importance(const std::vector<int>& ids, const std::vector<double>& gates, index_t E) {
  std::vector<double> I(static_cast<std::size_t>(E), 0.0);
  for (std::size_t i = 0; i < ids.size(); ++i)
    if (ids[i] >= 0) I[static_cast<std::size_t>(ids[i])] += gates[i];
  double mean = 0;
  for (double v : I) mean += v;
  mean /= double(E);
  if (mean == 0) return 0;
  double var = 0;
  for (double v : I) var += (v - mean) * (v - mean);
  var /= double(E);
  return var / (mean * mean);
}

// ----- routing data -----

struct Data {
  index_t T = 0, E = 0, K = 0;
  std::vector<double> logits;  // [T, E]
  std::vector<int> ids;        // [T, K], -1 = empty
  std::vector<double> gates;   // [T, K]
};

// Random routing: Gaussian logits; per token K distinct random experts, some left empty (-1)
// when `empty`; gates uniform in (0.05, 1).
Data routing_data(index_t T, index_t E, index_t K, std::uint64_t seed, double std = 1.5, bool empty = true) {
  Data d{T, E, K, {}, {}, {}};
  for (index_t i = 0; i < T * E; ++i) d.logits.push_back(std * standard_normal(seed, std::uint64_t(i)));
  for (index_t t = 0; t < T; ++t) {
    std::vector<int> perm(static_cast<std::size_t>(E));
    for (index_t e = 0; e < E; ++e) perm[static_cast<std::size_t>(e)] = int(e);
    for (index_t e = E - 1; e > 0; --e) {  // Fisher-Yates from the counter RNG
      const auto j = index_t(uniform01(seed, std::uint64_t(t * E + e), 1) * double(e + 1));
      std::swap(perm[static_cast<std::size_t>(e)], perm[static_cast<std::size_t>(j)]);
    }
    for (index_t j = 0; j < K; ++j) {
      const bool drop = empty && uniform01(seed, std::uint64_t(t * K + j), 2) < 0.15;
      d.ids.push_back(drop ? -1 : perm[static_cast<std::size_t>(j)]);
      d.gates.push_back(0.05 + 0.95 * uniform01(seed, std::uint64_t(t * K + j), 3));
    }
  }
  return d;
}

// Rounds the data to what a Routing<T> can hold, so reference and library see the same numbers.
template <class T>
Data rounded(Data d) {
  for (auto& v : d.logits) v = double(T(v));
  for (auto& v : d.gates) v = double(T(v));
  return d;
}

template <class T>
Routing<T> make_routing(const Data& d) {
  Routing<T> r;
  r.logits.resize({d.T, d.E});
  r.experts.resize({d.T, d.K});
  r.gates.resize({d.T, d.K});
  for (index_t i = 0; i < r.logits.size(); ++i) r.logits[i] = T(d.logits[static_cast<std::size_t>(i)]);
  for (index_t i = 0; i < d.T * d.K; ++i) {
    r.experts[i] = d.ids[static_cast<std::size_t>(i)];
    r.gates[i] = T(d.gates[static_cast<std::size_t>(i)]);
  }
  return r;
}



// actual − base ≈ expected, relative to the largest |expected|.
template <class A>
void require_added(const A& actual, const std::vector<double>& base, const std::vector<double>& expected, double tol,
                   const char* what) {
  REQUIRE(static_cast<std::size_t>(actual.size()) == expected.size());
  std::vector<double> diff(expected.size());
  for (std::size_t i = 0; i < diff.size(); ++i) diff[i] = double(actual[static_cast<index_t>(i)]) - base[i];
  double scale = 0;
  for (double v : expected) scale = std::max(scale, std::abs(v));
  test::require_close(diff, expected, tol, tol * std::max(scale, 1e-3), what);
}

template <class T>
std::vector<double> rounded_gaussian(index_t n, std::uint64_t seed) {
  std::vector<double> v(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = double(T(standard_normal(seed, std::uint64_t(i), 4)));
  return v;
}

// Gap between the two largest logits of every token: the Switch loss's argmax must not flip
// under the finite-difference step.
double min_top2_gap(const Data& d) {
  double gap = kInf;
  for (index_t t = 0; t < d.T; ++t) {
    std::vector<double> row(d.logits.begin() + t * d.E, d.logits.begin() + (t + 1) * d.E);
    std::sort(row.rbegin(), row.rend());
    if (d.E > 1) gap = std::min(gap, row[0] - row[1]);
  }
  return gap;
}

}  // namespace

TEST_CASE("the losses satisfy the BalanceLoss concept", "[losses]") {
  STATIC_REQUIRE(BalanceLoss<SwitchBalanceLoss<float>>);
  STATIC_REQUIRE(BalanceLoss<RouterZLoss<double>>);
  STATIC_REQUIRE(BalanceLoss<EntropyLoss<float>>);
  STATIC_REQUIRE(BalanceLoss<ImportanceLoss<double>>);
  // Default coefficients as documented in methods.md D / B.7.
  REQUIRE(SwitchBalanceLoss<float>().coef == 0.01);
  REQUIRE(RouterZLoss<float>().coef == 0.001);
  REQUIRE(EntropyLoss<float>().coef == 0.001);
  REQUIRE(ImportanceLoss<float>().coef == 0.1);
}

TEMPLATE_TEST_CASE("loss values match the naive references on random routing", "[losses]", float, double) {
  using T = TestType;
  struct Shape {
    index_t T, E, K;
  };
  const Shape sh = GENERATE(Shape{1, 1, 1}, Shape{1, 5, 2}, Shape{13, 4, 1}, Shape{64, 8, 2}, Shape{100, 16, 4},
                            Shape{37, 7, 7});
  const double std = GENERATE(0.3, 3.0);
  INFO("T=" << sh.T << " E=" << sh.E << " K=" << sh.K << " logit std " << std);
  const auto d = rounded<T>(routing_data(sh.T, sh.E, sh.K, 17, std));
  const auto r = make_routing<T>(d);
  const double tol = test::tolerance<T>();
  SwitchBalanceLoss<T> sw;
  RouterZLoss<T> z;
  EntropyLoss<T> ent;
  ImportanceLoss<T> imp;
  CHECK(double(sw.forward(r, sh.E)) == Approx(ref_switch(d.logits, sh.T, sh.E)).epsilon(tol).margin(tol));
  CHECK(double(z.forward(r, sh.E)) == Approx(ref_z(d.logits, sh.T, sh.E)).epsilon(tol).margin(tol));
  CHECK(double(ent.forward(r, sh.E)) == Approx(ref_entropy(d.logits, sh.T, sh.E)).epsilon(tol).margin(tol));
  CHECK(double(imp.forward(r, sh.E)) == Approx(ref_importance(d.ids, d.gates, sh.E)).epsilon(tol).margin(tol));
}

TEMPLATE_TEST_CASE("loss values on a SigmoidTopK router's routing", "[losses]", float, double) {
  using T = TestType;
  const index_t tokens = 48, dm = 6, E = 8, K = 2;
  SigmoidTopK<T> router({.d_model = dm, .experts = E, .k = K});
  const auto w = rounded_gaussian<T>(E * dm, 1), xv = rounded_gaussian<T>(tokens * dm, 2);
  for (index_t i = 0; i < E * dm; ++i) router.weight().value[i] = T(w[static_cast<std::size_t>(i)]);
  Tensor<T> x({tokens, dm});
  for (index_t i = 0; i < x.size(); ++i) x[i] = T(xv[static_cast<std::size_t>(i)]);
  Routing<T> r;
  router.forward(x.matrix(), r, Mode::eval);
  // The router's outputs are the references' inputs.
  Data d{tokens, E, K, {}, {}, {}};
  for (index_t i = 0; i < r.logits.size(); ++i) d.logits.push_back(double(r.logits[i]));
  for (index_t i = 0; i < r.gates.size(); ++i) {
    d.ids.push_back(r.experts[i]);
    d.gates.push_back(double(r.gates[i]));
  }
  const double tol = test::tolerance<T>();
  CHECK(double(SwitchBalanceLoss<T>().forward(r, E)) == Approx(ref_switch(d.logits, tokens, E)).epsilon(tol));
  CHECK(double(RouterZLoss<T>().forward(r, E)) == Approx(ref_z(d.logits, tokens, E)).epsilon(tol));
  CHECK(double(EntropyLoss<T>().forward(r, E)) == Approx(ref_entropy(d.logits, tokens, E)).epsilon(tol));
  CHECK(double(ImportanceLoss<T>().forward(r, E)) == Approx(ref_importance(d.ids, d.gates, E)).epsilon(tol).margin(tol));
}

TEMPLATE_TEST_CASE("loss closed forms", "[losses]", float, double) {
  using T = TestType;
  const double tol = test::tolerance<T>();
  const index_t E = 6, K = 1;
  auto data = [&](index_t tokens, auto logit) {
    Data d{tokens, E, K, {}, {}, {}};
    for (index_t t = 0; t < tokens; ++t) {
      for (index_t e = 0; e < E; ++e) d.logits.push_back(logit(t, e));
      d.ids.push_back(int(t % E));
      d.gates.push_back(1.0);
    }
    return d;
  };
  SECTION("uniform logits") {
    const auto d = data(10, [](index_t, index_t) { return 0.0; });
    const auto r = make_routing<T>(d);
    // Switch: E · Σ f_e · (1/E) = Σ f_e = 1 whatever f.
    CHECK(double(SwitchBalanceLoss<T>().forward(r, E)) == Approx(1.0).epsilon(tol));
    // z-loss: (log E)².
    CHECK(double(RouterZLoss<T>().forward(r, E)) == Approx(std::log(6.0) * std::log(6.0)).epsilon(tol));
    // Entropy: p uniform, Σ p log p = −log E (its minimum).
    CHECK(double(EntropyLoss<T>().forward(r, E)) == Approx(-std::log(6.0)).epsilon(tol));
  }
  SECTION("constant shift: z-loss sees it, the softmax-based losses do not") {
    const auto d = data(4, [](index_t, index_t) { return 2.5; });
    const auto r = make_routing<T>(d);
    const double lse = 2.5 + std::log(6.0);
    CHECK(double(RouterZLoss<T>().forward(r, E)) == Approx(lse * lse).epsilon(tol));
    CHECK(double(SwitchBalanceLoss<T>().forward(r, E)) == Approx(1.0).epsilon(tol));
    CHECK(double(EntropyLoss<T>().forward(r, E)) == Approx(-std::log(6.0)).epsilon(tol));
  }
  SECTION("perfect balance with confident tokens") {
    // 3E tokens, token t prefers expert t mod E: f = P = 1/E.
    const auto d = data(3 * E, [](index_t t, index_t e) { return e == t % 6 ? 4.0 : 0.0; });
    const auto r = make_routing<T>(d);
    CHECK(double(SwitchBalanceLoss<T>().forward(r, E)) == Approx(1.0).epsilon(tol));
    CHECK(double(EntropyLoss<T>().forward(r, E)) == Approx(-std::log(6.0)).epsilon(tol));
    CHECK(double(ImportanceLoss<T>().forward(r, E)) == Approx(0.0).margin(tol));  // every I_e = 3
  }
  SECTION("collapse onto one expert") {
    // Every token puts all its mass on expert 2 (other logits -inf): p = one-hot.
    const auto d = data(7, [](index_t, index_t e) { return e == 2 ? 0.0 : -kInf; });
    const auto r = make_routing<T>(d);
    CHECK(double(SwitchBalanceLoss<T>().forward(r, E)) == Approx(double(E)).epsilon(tol));  // its maximum
    EntropyLoss<T> ent;
    const T v = ent.forward(r, E);
    CHECK(v == T(0));  // 0·log 0 = 0, its maximum
    // The gradient stays finite (no NaN from log 0) and is zero: a one-hot p is a stationary point.
    Tensor<T> dl({7, E}), dg({7, K});
    dl.zero();
    dg.zero();
    ent.backward(r, E, dl.matrix(), dg.matrix());
    for (index_t i = 0; i < dl.size(); ++i) REQUIRE(dl[i] == T(0));
    // Nearly collapsed with finite logits.
    const auto d2 = data(7, [](index_t, index_t e) { return e == 2 ? 40.0 : 0.0; });
    const auto r2 = make_routing<T>(d2);
    CHECK(double(EntropyLoss<T>().forward(r2, E)) == Approx(0.0).margin(1e-12));
    CHECK(double(SwitchBalanceLoss<T>().forward(r2, E)) == Approx(double(E)).epsilon(tol));
    // z-loss of a huge logit stays finite (log-sum-exp, no overflow): (1000 + log(1 + 5e^-1000))² = 1e6.
    const auto d3 = data(3, [](index_t, index_t e) { return e == 2 ? 1000.0 : 0.0; });
    CHECK(double(RouterZLoss<T>().forward(make_routing<T>(d3), E)) == Approx(1e6).epsilon(tol));
  }
  SECTION("importance by hand") {
    // E = 3, K = 2: I = (2 + 1, 1, 0.5 + 1.5) = (3, 1, 2) → mean 2, var 2/3 → CV² = 1/6.
    Data d{3, 3, 2, std::vector<double>(9, 0.0), {0, 2, 0, -1, 1, 2}, {2.0, 0.5, 1.0, 9.0, 1.0, 1.5}};
    CHECK(double(ImportanceLoss<T>().forward(make_routing<T>(d), 3)) == Approx(1.0 / 6.0).epsilon(tol));
    // E = 2, K = 1: I = (3, 1) → CV² = 1/4.
    Data d2{3, 2, 1, std::vector<double>(6, 0.0), {0, 0, 1}, {2.0, 1.0, 1.0}};
    CHECK(double(ImportanceLoss<T>().forward(make_routing<T>(d2), 2)) == Approx(0.25).epsilon(tol));
    // Nothing routed: 0, no gradient.
    Data d3{2, 2, 1, std::vector<double>(4, 0.0), {-1, -1}, {1.0, 1.0}};
    ImportanceLoss<T> imp;
    const auto r3 = make_routing<T>(d3);
    CHECK(imp.forward(r3, 2) == T(0));
    Tensor<T> dl({2, 2}), dg({2, 1});
    dl.zero();
    dg.zero();
    imp.backward(r3, 2, dl.matrix(), dg.matrix());
    REQUIRE((dg[0] == T(0) && dg[1] == T(0)));
  }
}

TEMPLATE_TEST_CASE("logit-based loss gradients match finite differences", "[losses][backward]", float, double) {
  using T = TestType;
  const double coef = GENERATE(1.0, 0.37);
  struct Shape {
    index_t T, E, K;
  };
  const Shape sh = GENERATE(Shape{1, 3, 1}, Shape{9, 4, 2}, Shape{30, 8, 2}, Shape{12, 16, 4});
  INFO("T=" << sh.T << " E=" << sh.E << " K=" << sh.K << " coef " << coef);
  auto d = rounded<T>(routing_data(sh.T, sh.E, sh.K, 23, 1.5));
  REQUIRE(min_top2_gap(d) > 1e-3);  // argmax cannot flip under h = 1e-5
  const auto r = make_routing<T>(d);
  const auto dl0 = rounded_gaussian<T>(sh.T * sh.E, 5);  // backward must ADD into d_logits
  const auto dg0 = rounded_gaussian<T>(sh.T * sh.K, 6);  // and leave d_gates alone
  const double h = 1e-5;
  auto check = [&](auto& loss, auto ref) {
    loss.forward(r, sh.E);
    Tensor<T> dl({sh.T, sh.E}), dg({sh.T, sh.K});
    for (index_t i = 0; i < dl.size(); ++i) dl[i] = T(dl0[static_cast<std::size_t>(i)]);
    for (index_t i = 0; i < dg.size(); ++i) dg[i] = T(dg0[static_cast<std::size_t>(i)]);
    loss.backward(r, sh.E, dl.matrix(), dg.matrix());
    std::vector<double> fd(d.logits.size());
    for (std::size_t i = 0; i < fd.size(); ++i)
      fd[i] = coef * test::central_difference(d.logits, i, h, [&] { return ref(d.logits, sh.T, sh.E); });
    require_added(dl, dl0, fd, test::grad_tolerance<T>(), "d_logits");
    for (index_t i = 0; i < dg.size(); ++i) REQUIRE(dg[i] == T(dg0[static_cast<std::size_t>(i)]));
  };
  SECTION("Switch") {
    SwitchBalanceLoss<T> loss(coef);
    check(loss, ref_switch);
  }
  SECTION("z-loss") {
    RouterZLoss<T> loss(coef);
    check(loss, ref_z);
  }
  SECTION("entropy") {
    EntropyLoss<T> loss(coef);
    check(loss, ref_entropy);
  }
}

TEMPLATE_TEST_CASE("importance loss gradient w.r.t. gates matches finite differences", "[losses][backward]", float,
                   double) {
  using T = TestType;
  const double coef = GENERATE(1.0, 0.37);
  struct Shape {
    index_t T, E, K;
  };
  const Shape sh = GENERATE(Shape{1, 1, 1}, Shape{3, 2, 1}, Shape{10, 4, 2}, Shape{40, 8, 4}, Shape{6, 5, 5});
  INFO("T=" << sh.T << " E=" << sh.E << " K=" << sh.K << " coef " << coef);
  auto d = rounded<T>(routing_data(sh.T, sh.E, sh.K, 29));
  const auto r = make_routing<T>(d);
  const auto dl0 = rounded_gaussian<T>(sh.T * sh.E, 7);
  const auto dg0 = rounded_gaussian<T>(sh.T * sh.K, 8);
  ImportanceLoss<T> loss(coef);
  loss.forward(r, sh.E);
  Tensor<T> dl({sh.T, sh.E}), dg({sh.T, sh.K});
  for (index_t i = 0; i < dl.size(); ++i) dl[i] = T(dl0[static_cast<std::size_t>(i)]);
  for (index_t i = 0; i < dg.size(); ++i) dg[i] = T(dg0[static_cast<std::size_t>(i)]);
  loss.backward(r, sh.E, dl.matrix(), dg.matrix());
  std::vector<double> fd(d.gates.size());
  for (std::size_t i = 0; i < fd.size(); ++i)
    fd[i] = coef * test::central_difference(d.gates, i, 1e-5, [&] { return ref_importance(d.ids, d.gates, sh.E); });
  for (std::size_t i = 0; i < fd.size(); ++i)
    if (d.ids[i] < 0) REQUIRE(fd[i] == 0.0);  // empty assignments carry no gradient
  require_added(dg, dg0, fd, test::grad_tolerance<T>(), "d_gates");
  for (index_t i = 0; i < dl.size(); ++i) REQUIRE(dl[i] == T(dl0[static_cast<std::size_t>(i)]));  // no logit gradient
}

TEMPLATE_TEST_CASE("coefficients scale the gradients and not the values", "[losses][backward]", float, double) {
  using T = TestType;
  const index_t tokens = 11, E = 5, K = 2;
  const auto d = rounded<T>(routing_data(tokens, E, K, 31));
  const auto r = make_routing<T>(d);
  auto run = [&](auto loss) {
    const double value = double(loss.forward(r, E));
    Tensor<T> dl({tokens, E}), dg({tokens, K});
    dl.zero();
    dg.zero();
    loss.backward(r, E, dl.matrix(), dg.matrix());
    std::vector<double> g;
    for (index_t i = 0; i < dl.size(); ++i) g.push_back(double(dl[i]));
    for (index_t i = 0; i < dg.size(); ++i) g.push_back(double(dg[i]));
    return std::make_pair(value, g);
  };
  auto compare = [&](auto a, auto b, double ratio) {
    REQUIRE(a.first == b.first);
    std::vector<double> scaled;
    double nonzero = 0;
    for (double v : a.second) {
      scaled.push_back(ratio * v);
      nonzero += std::abs(v);
    }
    REQUIRE(nonzero > 0);
    test::require_close(b.second, scaled, 4 * test::tolerance<T>(), 1e-30, "scaled gradient");
  };
  compare(run(SwitchBalanceLoss<T>(1.0)), run(SwitchBalanceLoss<T>(0.01)), 0.01);
  compare(run(RouterZLoss<T>(1.0)), run(RouterZLoss<T>(3.0)), 3.0);
  compare(run(EntropyLoss<T>(1.0)), run(EntropyLoss<T>(0.001)), 0.001);
  compare(run(ImportanceLoss<T>(1.0)), run(ImportanceLoss<T>(0.1)), 0.1);
  // Zero coefficient: no gradient at all.
  const auto zero = run(RouterZLoss<T>(0.0));
  for (double v : zero.second) REQUIRE(v == 0.0);
}

TEMPLATE_TEST_CASE("losses with no tokens are 0 without NaN", "[losses]", float, double) {
  using T = TestType;
  const index_t E = 4, K = 2;
  Routing<T> r;
  r.logits.resize({0, E});
  r.experts.resize({0, K});
  r.gates.resize({0, K});
  Tensor<T> dl({0, E}), dg({0, K});
  auto check = [&](auto loss) {
    const T v = loss.forward(r, E);
    REQUIRE(v == T(0));
    REQUIRE_NOTHROW(loss.backward(r, E, dl.matrix(), dg.matrix()));
  };
  check(SwitchBalanceLoss<T>());
  check(RouterZLoss<T>());
  check(EntropyLoss<T>());
  check(ImportanceLoss<T>());
}

TEMPLATE_TEST_CASE("logit-based losses need router logits", "[losses]", float, double) {
  using T = TestType;
  const index_t tokens = 3, E = 4, K = 2;
  auto d = routing_data(tokens, E, K, 37);
  auto r = make_routing<T>(d);
  r.logits.resize({tokens, 0});  // a router without logits
  REQUIRE_THROWS_AS(SwitchBalanceLoss<T>().forward(r, E), smoe::error);
  REQUIRE_THROWS_WITH(SwitchBalanceLoss<T>().forward(r, E),
                      Catch::Contains("SwitchBalanceLoss") && Catch::Contains("needs router logits [3, 4]") &&
                          Catch::Contains("provides 0"));
  REQUIRE_THROWS_AS(RouterZLoss<T>().forward(r, E), smoe::error);
  REQUIRE_THROWS_WITH(RouterZLoss<T>().forward(r, E), Catch::Contains("RouterZLoss") && Catch::Contains("logits"));
  REQUIRE_THROWS_AS(EntropyLoss<T>().forward(r, E), smoe::error);
  REQUIRE_THROWS_WITH(EntropyLoss<T>().forward(r, E), Catch::Contains("EntropyLoss") && Catch::Contains("logits"));
  // The importance loss reads only experts and gates.
  REQUIRE_NOTHROW(ImportanceLoss<T>().forward(r, E));
  // Logits of the wrong width, or a rank-1 logits tensor, are rejected too.
  r.logits.resize({tokens, E + 1});
  REQUIRE_THROWS_WITH(RouterZLoss<T>().forward(r, E), Catch::Contains("provides 5 logits per token"));
  r.logits.resize({tokens * E});
  REQUIRE_THROWS_AS(EntropyLoss<T>().forward(r, E), smoe::error);
  REQUIRE_THROWS_AS(SwitchBalanceLoss<T>().forward(r, E), smoe::error);
}

TEST_CASE("entropy loss: an expert whose softmax mass underflows float keeps a finite, exact log p", "[losses]") {
  // Expert 0 sits ~150 below the others: exp(−150) underflows in float, so Σ_t q_t0 is 0 and
  // log p_0 must come from the log-space path. The loss and its gradient match double, NaN-free.
  const index_t tokens = 6, E = 4;
  Data d;
  d.T = tokens, d.E = E, d.K = 1;
  for (index_t t = 0; t < tokens; ++t)
    for (index_t e = 0; e < E; ++e) d.logits.push_back(e == 0 ? -150.0 - 0.5 * double(t) : 0.3 * double(e * t % 3));
  for (index_t t = 0; t < tokens; ++t) d.ids.push_back(1), d.gates.push_back(0.5);
  const Data df = rounded<float>(d);
  const auto rf = make_routing<float>(df);
  const auto rd = make_routing<double>(df);
  EntropyLoss<float> lf(1.0);
  EntropyLoss<double> ld(1.0);
  CHECK(double(lf.forward(rf, E)) == Approx(ref_entropy(df.logits, tokens, E)).epsilon(1e-6));
  ld.forward(rd, E);
  Tensor<float> gf({tokens, E}), gates_f({tokens, 1});
  Tensor<double> gd({tokens, E}), gates_d({tokens, 1});
  gf.zero(), gd.zero();
  lf.backward(rf, E, gf.matrix(), gates_f.matrix());
  ld.backward(rd, E, gd.matrix(), gates_d.matrix());
  for (index_t i = 0; i < gf.size(); ++i) {
    REQUIRE(std::isfinite(gf[i]));
    CHECK(double(gf[i]) == Approx(gd[i]).margin(1e-7));
  }
}
