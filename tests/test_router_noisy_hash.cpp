// Noisy top-k gating (Shazeer et al. 2017) with its load loss, and hash routing (Roller et al.
// 2021): forward against naive double-precision references written from the formulas, the noise
// and the hash against the Philox definition, gradients (router and whole MoE layer) against
// central finite differences, bad input.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include <smoe/core/rng.hpp>
#include <smoe/experts/feed_forward_experts.hpp>
#include <smoe/layers/moe.hpp>
#include <smoe/losses/entropy.hpp>
#include <smoe/losses/importance.hpp>
#include <smoe/losses/switch_balance.hpp>
#include <smoe/losses/z_loss.hpp>
#include <smoe/routing/hash_router.hpp>
#include <smoe/routing/noisy_topk.hpp>
#include <smoe/train/gradient_check.hpp>

#include "catch.hpp"
#include "helpers.hpp"
#include "reference.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

using namespace smoe;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

std::vector<double> gaussian(index_t n, std::uint64_t seed, double std = 1.0) {
  std::vector<double> v(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = std * standard_normal(seed, std::uint64_t(i), 9);
  return v;
}

template <class T>
Tensor<T> to_tensor(const std::vector<double>& v, index_t rows, index_t cols) {
  Tensor<T> t({rows, cols});
  for (index_t i = 0; i < t.size(); ++i) t[i] = T(v[static_cast<std::size_t>(i)]);
  return t;
}

template <class T>
void set_values(Parameter<T>& p, const std::vector<double>& v) {
  REQUIRE(p.value.size() == index_t(v.size()));
  for (index_t i = 0; i < p.value.size(); ++i) p.value[i] = T(v[static_cast<std::size_t>(i)]);
}

template <class V>
std::vector<double> as_doubles(const V& v) {
  std::vector<double> out(static_cast<std::size_t>(v.size()));
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = double(v[i]);
  return out;
}

// ----- naive noisy top-k reference (double, plain loops, written from the formulas) -----

struct NoisyRef {
  index_t T = 0, d = 0, E = 0, K = 0;
  std::uint64_t seed = 0, step = 0;
  bool train = false;
  std::vector<double> x, w, wn;  // x [T, d], W and W_noise [E, d]

  std::vector<double> s, sigma, H;  // [T, E]
  std::vector<int> ids;             // [T, K]
  std::vector<double> gates;        // [T, K]
  std::vector<double> load;         // [E]
  double load_loss = 0;

  void run() {
    s.assign(std::size_t(T * E), 0.0);
    sigma = s;
    H = s;
    ids.clear();
    gates.clear();
    load.assign(std::size_t(E), 0.0);
    for (index_t t = 0; t < T; ++t)
      for (index_t e = 0; e < E; ++e) {
        double a = 0, u = 0;
        for (index_t i = 0; i < d; ++i) {
          a += x[std::size_t(t * d + i)] * w[std::size_t(e * d + i)];
          u += x[std::size_t(t * d + i)] * wn[std::size_t(e * d + i)];
        }
        const std::size_t te = std::size_t(t * E + e);
        s[te] = a;
        sigma[te] = std::log(1.0 + std::exp(u));
        const double eps = train ? standard_normal(seed, std::uint64_t(t * E + e), step) : 0.0;
        H[te] = a + eps * sigma[te];
      }
    for (index_t t = 0; t < T; ++t) {
      const double* h = &H[std::size_t(t * E)];
      // Stable sort by descending H (NaN last): ties keep the smaller index first.
      std::vector<int> idx(static_cast<std::size_t>(E));
      std::iota(idx.begin(), idx.end(), 0);
      std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) {
        if (std::isnan(h[a]) || std::isnan(h[b])) return !std::isnan(h[a]) && std::isnan(h[b]);
        return h[a] > h[b];
      });
      double z = 0;
      for (index_t j = 0; j < K; ++j) z += std::exp(h[idx[std::size_t(j)]] - h[idx[0]]);
      for (index_t j = 0; j < K; ++j) {
        ids.push_back(idx[std::size_t(j)]);
        gates.push_back(std::exp(h[idx[std::size_t(j)]] - h[idx[0]]) / z);
      }
      // P(x, i) = Φ((s_i − kth_excluding(H, k, i)) / σ_i)
      for (index_t i = 0; i < E; ++i) {
        std::vector<double> others;
        for (index_t e = 0; e < E; ++e)
          if (e != i) others.push_back(h[e]);
        std::sort(others.begin(), others.end(), std::greater<>());
        double P = 1.0;  // no k-th largest without i (K = E)
        if (index_t(others.size()) >= K) {
          const double thr = others[std::size_t(K - 1)];
          const std::size_t ti = std::size_t(t * E + i);
          P = 0.5 * std::erfc(-(s[ti] - thr) / sigma[ti] / std::sqrt(2.0));
        }
        load[std::size_t(i)] += P;
      }
    }
    double mean = 0, var = 0;
    for (double v : load) mean += v / double(E);
    for (double v : load) var += (v - mean) * (v - mean) / double(E);
    load_loss = mean == 0 ? 0.0 : var / (mean * mean);
  }
};

NoisyRef make_ref(index_t T, index_t d, index_t E, index_t K, std::uint64_t seed, double wstd = 0.7) {
  NoisyRef r;
  r.T = T, r.d = d, r.E = E, r.K = K, r.seed = seed;
  r.x = gaussian(T * d, 1);
  r.w = gaussian(E * d, 2, wstd);
  r.wn = gaussian(E * d, 3, wstd);
  return r;
}

template <class T>
NoisyTopK<T> make_router(const NoisyRef& r, double load_coef) {
  NoisyTopK<T> router({.d_model = r.d, .experts = r.E, .k = r.K, .load_coef = load_coef, .seed = r.seed});
  set_values(router.weight(), r.w);
  set_values(router.noise_weight(), r.wn);
  router.set_step(r.step);
  return router;
}

// Runs the library router on r's inputs and compares everything with r.run().
template <class T>
void check_noisy_forward(NoisyRef r, double load_coef) {
  auto router = make_router<T>(r, load_coef);
  const auto x = to_tensor<T>(r.x, r.T, r.d);
  Routing<T> out;
  router.forward(x.matrix(), out, r.train ? Mode::train : Mode::eval);
  r.run();
  const double tol = 10 * test::tolerance<T>();
  REQUIRE(out.logits.dim(0) == r.T);
  REQUIRE(out.logits.dim(1) == r.E);
  test::require_close(out.logits, r.s, tol, tol, "logits (clean s)");
  test::require_close(router.noisy_logits(), r.H, tol, tol, "H");
  REQUIRE(as_doubles(out.experts) == std::vector<double>(r.ids.begin(), r.ids.end()));
  test::require_close(out.gates, r.gates, tol, tol, "gates");
  if (load_coef > 0) {
    CHECK(double(router.load_loss()) == Approx(r.load_loss).epsilon(100 * test::tolerance<T>()).margin(tol));
    CHECK(double(router.aux_loss()) ==
          Approx(load_coef * r.load_loss).epsilon(100 * test::tolerance<T>()).margin(tol));
  } else {
    CHECK(router.aux_loss() == T(0));
  }
  CHECK(router.step() == r.step + (r.train ? 1 : 0));
}

// Objective of the router alone: Σ gates ⊙ dg + Σ logits ⊙ dl + aux_loss, the scalar whose
// gradient backward(d_gates = dg, d_logits = dl) returns. The step is reset before each forward
// so that every evaluation sees the same noise.
struct RouterObjective {
  Mode mode;
  std::uint64_t step;
  const Tensor<double>& dg;
  const Tensor<double>& dl;
  double operator()(NoisyTopK<double>& router, const Tensor<double>& x) const {
    Routing<double> r;
    router.set_step(step);
    router.forward(x.matrix(), r, mode);
    double f = router.aux_loss();
    for (index_t i = 0; i < r.gates.size(); ++i) f += r.gates[i] * dg[i];
    for (index_t i = 0; i < r.logits.size(); ++i) f += r.logits[i] * dl[i];
    return f;
  }
};

// Backward of the double router against central differences of RouterObjective for W, W_noise and x.
void check_router_gradients(NoisyRef r, double load_coef, Mode mode) {
  auto router = make_router<double>(r, load_coef);
  auto x = to_tensor<double>(r.x, r.T, r.d);
  const auto dg = test::random_matrix<double>(r.T, r.K, 41);
  const auto dl = test::random_matrix<double>(r.T, r.E, 42, 0.3);
  const RouterObjective objective{mode, 7, dg, dl};
  Routing<double> out;
  router.set_step(7);
  router.forward(x.matrix(), out, mode);
  Tensor<double> d_logits = dl, dx({r.T, r.d});
  dx.zero();
  zero_grad(router);
  router.backward(x.matrix(), out, dg.matrix(), d_logits.matrix(), dx.matrix());
  const auto res = check_parameter_gradients(router, [&] { return objective(router, x); }, 1e-6, 1000);
  INFO("worst parameter " << res.worst_parameter << "[" << res.worst_index << "], error " << res.worst_error);
  CHECK(res.checked == 2 * r.E * r.d);
  CHECK(res.worst_error < 1e-7);
  test::require_input_gradient(x, dx, [&] { return objective(router, x); });
}

// ----- whole-layer finite-difference check (as in test_moe.cpp, with a mode and a fixed step) -----

template <HasParameters C>
void randomize_parameters(C& c, double std, std::uint64_t seed = 100) {
  c.for_each_parameter([&](std::string_view, auto& p) { test::randomize(p.value, seed++, std); });
}

template <class Layer, class T>
double objective(Layer& layer, const Tensor<T>& x, const Tensor<T>& dy, Mode mode) {
  if constexpr (requires { layer.router().set_step(0); }) layer.router().set_step(3);
  Tensor<T> y({x.dim(0), x.dim(1)});
  const auto out = layer.forward(x.matrix(), y.matrix(), mode);
  double s = double(out.aux_loss);
  for (index_t i = 0; i < y.size(); ++i) s += double(y[i]) * double(dy[i]);
  return s;
}

template <class Layer>
void check_layer_gradients(Layer& layer, index_t tokens, Mode mode, double tol = 1e-7) {
  const index_t d = layer.d_model();
  auto x = test::random_matrix<double>(tokens, d, 31);
  const auto dy = test::random_matrix<double>(tokens, d, 32);
  Tensor<double> dx({tokens, d});
  zero_grad(layer);
  objective(layer, x, dy, mode);
  layer.backward(dy.matrix(), dx.matrix());
  const auto r = check_parameter_gradients(layer, [&] { return objective(layer, x, dy, mode); }, 1e-6, 2000);
  INFO("worst parameter " << r.worst_parameter << "[" << r.worst_index << "], error " << r.worst_error);
  CHECK(r.worst_error < tol);
  test::require_input_gradient(x, dx, [&] { return objective(layer, x, dy, mode); }, tol);
}

}  // namespace

// ======================================= NoisyTopK =======================================

TEST_CASE("NoisyTopK and HashRouter satisfy the Router concept", "[noisy][hash]") {
  STATIC_REQUIRE(Router<NoisyTopK<float>>);
  STATIC_REQUIRE(Router<NoisyTopK<double>>);
  STATIC_REQUIRE(HasRouterLoss<NoisyTopK<double>>);
  STATIC_REQUIRE(Router<HashRouter<float>>);
  STATIC_REQUIRE(Router<HashRouter<double>>);
  STATIC_REQUIRE(!HasRouterLoss<HashRouter<double>>);
  NoisyTopK<double> r({.d_model = 3, .experts = 4, .k = 2});
  std::vector<std::string> names;
  r.for_each_parameter([&](std::string_view n, auto& p) {
    names.emplace_back(n);
    CHECK(p.value.shape() == std::vector<index_t>{4, 3});
    for (index_t i = 0; i < p.value.size(); ++i) CHECK(p.value[i] == 0.0);  // Shazeer: zero init
  });
  CHECK(names == std::vector<std::string>{"weight", "noise_weight"});
  CHECK(parameter_count(r) == 24);
}

TEMPLATE_TEST_CASE("NoisyTopK forward matches the naive reference", "[noisy]", float, double) {
  const index_t E = 6;
  const index_t K = GENERATE(1, 2, 3, 6);
  const index_t T = GENERATE(1, 4, 11);  // T < E, T = 1
  const bool train = GENERATE(false, true);
  const double coef = GENERATE(0.0, 0.25);
  INFO("K = " << K << ", T = " << T << ", train = " << train << ", load_coef = " << coef);
  auto r = make_ref(T, 5, E, K, 17);
  r.train = train;
  r.step = 4;
  check_noisy_forward<TestType>(r, coef);
}

TEST_CASE("NoisyTopK: the noise is reproducible from (seed, step), advances per training forward, absent in eval",
          "[noisy]") {
  auto r = make_ref(16, 5, 8, 2, 5);
  const auto x = to_tensor<double>(r.x, r.T, r.d);
  auto a = make_router<double>(r, 0.1), b = make_router<double>(r, 0.1);
  Routing<double> ra, rb, re;

  a.set_step(11);
  a.forward(x.matrix(), ra, Mode::train);
  CHECK(a.step() == 12);
  b.set_step(11);
  b.forward(x.matrix(), rb, Mode::train);
  CHECK(std::vector<double>(ra.gates.data(), ra.gates.data() + ra.gates.size()) ==
        std::vector<double>(rb.gates.data(), rb.gates.data() + rb.gates.size()));
  CHECK(as_doubles(ra.experts) == as_doubles(rb.experts));
  CHECK(a.aux_loss() == b.aux_loss());

  // The next training step draws new noise; setting the step back reproduces step 11.
  b.forward(x.matrix(), rb, Mode::train);
  CHECK(b.step() == 13);
  CHECK(as_doubles(b.noisy_logits()) != as_doubles(a.noisy_logits()));
  b.set_step(11);
  b.forward(x.matrix(), rb, Mode::train);
  CHECK(as_doubles(b.noisy_logits()) == as_doubles(a.noisy_logits()));

  // Another seed: other noise.
  r.seed = 6;
  auto c = make_router<double>(r, 0.1);
  c.set_step(11);
  Routing<double> rc;
  c.forward(x.matrix(), rc, Mode::train);
  CHECK(as_doubles(c.noisy_logits()) != as_doubles(a.noisy_logits()));

  // Eval: H = s, the step does not move, and the noisy router routes like clean top-k.
  a.forward(x.matrix(), re, Mode::eval);
  CHECK(a.step() == 12);
  CHECK(as_doubles(a.noisy_logits()) == as_doubles(re.logits));
  r.train = false;
  r.run();
  CHECK(as_doubles(re.experts) == std::vector<double>(r.ids.begin(), r.ids.end()));
  // Training noise actually changes some selections at this scale (σ ≈ softplus(N(0, 1.6))).
  CHECK(as_doubles(ra.experts) != as_doubles(re.experts));
}

TEST_CASE("NoisyTopK noise has the standard normal distribution scaled by softplus", "[noisy]") {
  // W = 0, W_noise = 0: s = 0, σ = log 2, so H / log 2 are the raw N(0, 1) draws.
  const index_t T = 2000, E = 8;
  NoisyTopK<double> router({.d_model = 2, .experts = E, .k = 1, .seed = 99});
  const auto x = test::random_matrix<double>(T, 2, 3);
  Routing<double> r;
  router.forward(x.matrix(), r, Mode::train);
  double mean = 0, sq = 0;
  const auto& H = router.noisy_logits();
  for (index_t i = 0; i < H.size(); ++i) {
    const double z = H[i] / std::log(2.0);
    CHECK(z == Approx(standard_normal(99, std::uint64_t(i), 0)).epsilon(1e-12).margin(1e-12));
    mean += z / double(H.size());
    sq += z * z / double(H.size());
  }
  CHECK(std::abs(mean) < 5.0 / std::sqrt(double(H.size())));
  CHECK(std::abs(sq - 1.0) < 5.0 * std::sqrt(2.0 / double(H.size())));
}

TEMPLATE_TEST_CASE("NoisyTopK with zero weights (the paper's init): eval ties go to the smaller ids", "[noisy]",
                   float, double) {
  const index_t E = 5, K = 3, T = 4;
  NoisyTopK<TestType> router({.d_model = 3, .experts = E, .k = K, .load_coef = 0.1});
  const auto x = test::random_matrix<TestType>(T, 3, 8);
  Routing<TestType> r;
  router.forward(x.matrix(), r, Mode::eval);
  for (index_t t = 0; t < T; ++t)
    for (index_t j = 0; j < K; ++j) {
      CHECK(r.experts[t * K + j] == j);
      CHECK(double(r.gates[t * K + j]) == Approx(1.0 / K));
    }
  // Every P(x, i) = Φ(0) = 1/2: equal load, zero loss.
  CHECK(router.load_loss() == TestType(0));
  CHECK(router.aux_loss() == TestType(0));
}

TEST_CASE("NoisyTopK load loss with K = E is zero and passes no gradient", "[noisy]") {
  auto r = make_ref(6, 4, 3, 3, 2);
  r.train = true;
  auto router = make_router<double>(r, 0.5);
  const auto x = to_tensor<double>(r.x, r.T, r.d);
  Routing<double> out;
  router.forward(x.matrix(), out, Mode::train);
  CHECK(router.load_loss() == 0.0);
  check_router_gradients(r, 0.5, Mode::train);  // gates only
}

TEST_CASE("NoisyTopK backward matches finite differences (gates, logits and load loss)", "[noisy][backward]") {
  const index_t K = GENERATE(1, 2, 3);
  const double coef = GENERATE(0.0, 0.7);
  const Mode mode = GENERATE(Mode::eval, Mode::train);
  INFO("K = " << K << ", load_coef = " << coef << ", train = " << (mode == Mode::train));
  SECTION("T > E") { check_router_gradients(make_ref(9, 5, 6, K, 21), coef, mode); }
  SECTION("T < E") { check_router_gradients(make_ref(3, 4, 7, K, 22), coef, mode); }
  SECTION("T = 1") { check_router_gradients(make_ref(1, 3, 5, K, 23), coef, mode); }
}

TEST_CASE("NoisyTopK load loss alone: its gradient reaches W through s and the threshold, W_noise through σ",
          "[noisy][backward]") {
  // d_gates = 0 and d_logits = 0: the whole gradient is the load loss's, checked against the
  // naive reference's loss by central differences (independent of the library's forward).
  auto r = make_ref(8, 4, 5, 2, 31, 0.9);
  r.train = true;
  r.step = 2;
  const double coef = 1.3;
  auto router = make_router<double>(r, coef);
  const auto x = to_tensor<double>(r.x, r.T, r.d);
  Routing<double> out;
  router.forward(x.matrix(), out, Mode::train);
  Tensor<double> dg({r.T, r.K}), dl({r.T, r.E}), dx({r.T, r.d});
  dg.zero();
  dl.zero();
  dx.zero();
  zero_grad(router);
  router.backward(x.matrix(), out, dg.matrix(), dl.matrix(), dx.matrix());
  auto loss = [&] {
    r.run();
    return coef * r.load_loss;
  };
  double norm_w = 0, norm_wn = 0;
  for (std::size_t i = 0; i < r.w.size(); ++i) {
    const double num_w = test::central_difference(r.w, i, 1e-6, loss);
    const double num_wn = test::central_difference(r.wn, i, 1e-6, loss);
    INFO("element " << i);
    CHECK(router.weight().grad[index_t(i)] == Approx(num_w).margin(1e-8));
    CHECK(router.noise_weight().grad[index_t(i)] == Approx(num_wn).margin(1e-8));
    norm_w += num_w * num_w;
    norm_wn += num_wn * num_wn;
  }
  CHECK(norm_w > 1e-4);  // the check is not vacuous
  CHECK(norm_wn > 1e-4);
  for (std::size_t i = 0; i < r.x.size(); ++i) {
    INFO("dx[" << i << "]");
    CHECK(dx[index_t(i)] == Approx(test::central_difference(r.x, i, 1e-6, loss)).margin(1e-8));
  }
}

TEST_CASE("NoisyTopK float backward agrees with double backward", "[noisy][backward]") {
  auto r = make_ref(10, 6, 5, 2, 44);
  const auto run = [&]<class T>(T, Mode mode) {
    auto router = make_router<T>(r, 0.4);
    router.set_step(1);
    const auto x = to_tensor<T>(r.x, r.T, r.d);
    Routing<T> out;
    router.forward(x.matrix(), out, mode);
    const auto dg = test::random_matrix<T>(r.T, r.K, 41);
    auto dl = test::random_matrix<T>(r.T, r.E, 42, 0.3);
    Tensor<T> dx({r.T, r.d});
    dx.zero();
    router.backward(x.matrix(), out, dg.matrix(), dl.matrix(), dx.matrix());
    std::vector<double> g = as_doubles(router.weight().grad);
    for (double v : as_doubles(router.noise_weight().grad)) g.push_back(v);
    for (double v : as_doubles(dx)) g.push_back(v);
    return g;
  };
  for (Mode mode : {Mode::eval, Mode::train}) {
    const auto gd = run(double{}, mode);
    const auto gf = run(float{}, mode);
    test::require_close(gf, gd, 1e-4, 1e-4, "float vs double gradient");
  }
}

TEST_CASE("NoisyTopK over several token blocks: reference, gradients, thread-count independence", "[noisy][backward]") {
  // 300 tokens: the forward and backward run in more than one parallel token block.
  auto r = make_ref(300, 6, 8, 2, 51);
  r.train = true;
  r.step = 9;
  check_noisy_forward<double>(r, 0.5);
  check_noisy_forward<float>(r, 0.5);
  auto router = make_router<double>(r, 0.5);
  const auto x = to_tensor<double>(r.x, r.T, r.d);
  const auto dg = test::random_matrix<double>(r.T, r.K, 41);
  const auto dl = test::random_matrix<double>(r.T, r.E, 42, 0.3);
  const RouterObjective objective{Mode::train, 9, dg, dl};
  auto run = [&] {
    Routing<double> out;
    router.set_step(9);
    router.forward(x.matrix(), out, Mode::train);
    Tensor<double> d_logits = dl, dx({r.T, r.d});
    dx.zero();
    zero_grad(router);
    router.backward(x.matrix(), out, dg.matrix(), d_logits.matrix(), dx.matrix());
    std::vector<double> all = as_doubles(dx);
    for (double v : as_doubles(router.weight().grad)) all.push_back(v);
    for (double v : as_doubles(router.noise_weight().grad)) all.push_back(v);
    return all;
  };
  const auto grads = run();
  const auto res = check_parameter_gradients(router, [&] { return objective(router, x); }, 1e-6, 1000);
  INFO("worst parameter " << res.worst_parameter << "[" << res.worst_index << "], error " << res.worst_error);
  CHECK(res.worst_error < 1e-7);
#if defined(_OPENMP)
  omp_set_num_threads(1);
  const auto one = run();
  omp_set_num_threads(2);
  const auto two = run();
  omp_set_num_threads(omp_get_num_procs());
  CHECK(one == grads);
  CHECK(two == grads);
#endif
}

TEMPLATE_TEST_CASE("NoisyTopK: NaN/Inf inputs never produce invalid or repeated ids", "[noisy]", float, double) {
  const index_t E = 6, K = 3, d = 3;
  auto r = make_ref(5, d, E, K, 3);
  auto router = make_router<TestType>(r, 0.2);
  auto x = to_tensor<TestType>(r.x, r.T, d);
  x[0] = TestType(kNaN);
  x[d] = TestType(kInf);
  x[2 * d + 1] = TestType(-kInf);
  x[3 * d] = TestType(kInf);
  x[3 * d + 1] = TestType(-kInf);
  for (Mode mode : {Mode::eval, Mode::train}) {
    Routing<TestType> out;
    router.forward(x.matrix(), out, mode);
    for (index_t t = 0; t < r.T; ++t) {
      std::set<int> seen;
      for (index_t j = 0; j < K; ++j) {
        const int e = out.experts[t * K + j];
        CHECK(e >= 0);
        CHECK(e < E);
        seen.insert(e);
      }
      CHECK(seen.size() == std::size_t(K));
    }
    Tensor<TestType> dg({r.T, K}), dl({r.T, E}), dx({r.T, d});
    dg.fill(TestType(1));
    dl.zero();
    dx.zero();
    router.backward(x.matrix(), out, dg.matrix(), dl.matrix(), dx.matrix());  // no crash, no OOB
  }
}

TEMPLATE_TEST_CASE("NoisyTopK with no tokens", "[noisy]", float, double) {
  NoisyTopK<TestType> router({.d_model = 3, .experts = 4, .k = 2, .load_coef = 0.5});
  Tensor<TestType> x({0, 3}), dg({0, 2}), dl({0, 4}), dx({0, 3});
  Routing<TestType> out;
  router.forward(x.matrix(), out, Mode::train);
  CHECK(out.tokens() == 0);
  CHECK(out.k() == 2);
  CHECK(router.aux_loss() == TestType(0));
  router.backward(x.matrix(), out, dg.matrix(), dl.matrix(), dx.matrix());
}

TEST_CASE("NoisyTopKConfig validation and bad shapes throw smoe::error naming the argument", "[noisy]") {
  using R = NoisyTopK<double>;
  REQUIRE_THROWS_WITH(R({.d_model = 4, .experts = 3, .k = 4}), Catch::Contains("k must be in [1, experts = 3], got 4"));
  REQUIRE_THROWS_WITH(R({.d_model = 4, .experts = 3, .k = 0}), Catch::Contains("k must be in [1, experts = 3], got 0"));
  REQUIRE_THROWS_WITH(R({.d_model = 0, .experts = 3}), Catch::Contains("d_model must be >= 1, got 0"));
  REQUIRE_THROWS_WITH(R({.d_model = 2, .experts = -1}), Catch::Contains("experts must be >= 1, got -1"));
  REQUIRE_THROWS_WITH(R({.d_model = 2, .experts = 3, .k = 1, .load_coef = -0.5}),
                      Catch::Contains("load_coef must be finite and >= 0, got -0.5"));
  REQUIRE_THROWS_WITH(R({.d_model = 2, .experts = 3, .k = 1, .load_coef = kNaN}),
                      Catch::Contains("load_coef must be finite and >= 0, got nan"));
  REQUIRE_THROWS_AS(R({.d_model = 4, .experts = 3, .k = 4}), smoe::error);

  R router({.d_model = 3, .experts = 4, .k = 2});
  Routing<double> out;
  Tensor<double> x({5, 3}), bad({5, 2});
  x.zero();
  REQUIRE_THROWS_WITH(router.forward(bad.matrix(), out, Mode::eval),
                      Catch::Contains("NoisyTopK: x must be [5, 3], got [5, 2]"));
  router.forward(x.matrix(), out, Mode::eval);
  Tensor<double> dg({5, 2}), dl({5, 4}), dx({5, 3}), x4({4, 3});
  x4.zero();
  REQUIRE_THROWS_WITH(router.backward(x.matrix(), out, dl.matrix(), dl.matrix(), dx.matrix()),
                      Catch::Contains("d_gates must be [5, 2], got [5, 4]"));
  REQUIRE_THROWS_WITH(router.backward(x.matrix(), out, dg.matrix(), dg.matrix(), dx.matrix()),
                      Catch::Contains("d_logits must be [5, 4], got [5, 2]"));
  REQUIRE_THROWS_WITH(router.backward(x.matrix(), out, dg.matrix(), dl.matrix(), dg.matrix()),
                      Catch::Contains("dx must be [5, 3], got [5, 2]"));
  REQUIRE_THROWS_WITH(router.backward(x4.matrix(), out, dg.matrix(), dl.matrix(), dx.matrix()),
                      Catch::Contains("x must be [5, 3], got [4, 3]"));
}

// ---------------------------------- NoisyTopK in MoE<> ----------------------------------

TEST_CASE("MoE<NoisyTopK, GeluExperts>: forward matches the naive reference, aux includes the load loss",
          "[noisy][moe]") {
  const index_t d = 5, E = 4, G = 3, K = 2, T = 9;
  const double load_coef = 0.3, imp_coef = 0.2;
  auto r = make_ref(T, d, E, K, 8);
  MoE layer(make_router<double>(r, load_coef), GeluExperts<double>({d, E, G, true}), WeightedSum<double>{},
            ImportanceLoss<double>(imp_coef));
  randomize_parameters(layer.experts(), 0.5);
  const auto x = to_tensor<double>(r.x, T, d);
  for (Mode mode : {Mode::eval, Mode::train}) {
    layer.router().set_step(4);
    r.step = 4;
    r.train = mode == Mode::train;
    r.run();
    Tensor<double> y({T, d});
    const auto out = layer.forward(x.matrix(), y.matrix(), mode);
    std::vector<double> y_ref(std::size_t(T * d), 0.0), importance(std::size_t(E), 0.0);
    auto& ex = layer.experts();
    for (index_t t = 0; t < T; ++t)
      for (index_t j = 0; j < K; ++j) {
        const int e = r.ids[std::size_t(t * K + j)];
        const double g = r.gates[std::size_t(t * K + j)];
        importance[std::size_t(e)] += g;
        const auto o = test::ref::expert(test::ref::Act::gelu, int(d), int(G), &r.x[std::size_t(t * d)],
                                         ex.w1().value.data() + e * d * G, ex.w2().value.data() + e * G * d,
                                         ex.b1().value.data() + e * G, ex.b2().value.data() + e * d);
        for (index_t c = 0; c < d; ++c) y_ref[std::size_t(t * d + c)] += g * o[std::size_t(c)];
      }
    test::require_close(y, y_ref, 1e-12, 1e-12, "y");
    double mean = 0, var = 0;
    for (double v : importance) mean += v / double(E);
    for (double v : importance) var += (v - mean) * (v - mean) / double(E);
    CHECK(out.router_loss == Approx(load_coef * r.load_loss).epsilon(1e-12));
    CHECK(out.aux_loss == Approx(load_coef * r.load_loss + imp_coef * var / (mean * mean)).epsilon(1e-12));
  }
}

TEST_CASE("MoE<NoisyTopK, GeluExperts, ImportanceLoss> gradients match finite differences", "[noisy][moe][grad]") {
  const index_t d = 6, E = 5, G = 4, K = 2, tokens = 7;
  const Mode mode = GENERATE(Mode::eval, Mode::train);
  const double load_coef = GENERATE(0.0, 0.4);
  INFO("train = " << (mode == Mode::train) << ", load_coef = " << load_coef);
  MoE layer(NoisyTopK<double>({.d_model = d, .experts = E, .k = K, .load_coef = load_coef, .seed = 12}),
            GeluExperts<double>({d, E, G, true}), WeightedSum<double>{}, ImportanceLoss<double>(0.3));
  randomize_parameters(layer, 0.6);
  check_layer_gradients(layer, tokens, mode);
}

TEST_CASE("MoE<NoisyTopK> with every logit-based loss: gradients match finite differences", "[noisy][moe][grad]") {
  const index_t d = 4, E = 4, G = 3, K = 2, tokens = 6;
  MoE layer(NoisyTopK<double>({.d_model = d, .experts = E, .k = K, .load_coef = 0.2, .seed = 1}),
            ReluExperts<double>({d, E, G, false}), WeightedSum<double>{}, SwitchBalanceLoss<double>(0.1),
            RouterZLoss<double>(0.1), EntropyLoss<double>(0.1), ImportanceLoss<double>(0.1));
  randomize_parameters(layer, 0.6, 200);
  check_layer_gradients(layer, tokens, Mode::train);
}

// ======================================= HashRouter =======================================

TEST_CASE("HashRouter: expert = philox4x32(seed, uint64(id))[0] mod E, gate 1, no logits", "[hash]") {
  const index_t E = 8, T = 6;
  HashRouter<double> router({.d_model = 3, .experts = E, .seed = 3});
  const std::vector<std::int64_t> ids = {0, 1, 2, -1, -5, 123456789};
  router.set_token_ids(ids);
  const auto x = test::random_matrix<double>(T, 3, 1);
  Routing<double> r;
  router.forward(x.matrix(), r, Mode::train);
  REQUIRE(r.experts.shape() == std::vector<index_t>{T, 1});
  REQUIRE(r.gates.shape() == std::vector<index_t>{T, 1});
  CHECK(r.logits.rank() == 2);
  CHECK(r.logits.dim(0) == T);
  CHECK(r.logits.dim(1) == 0);
  // Pinned values (printed once by a C++ program; the Python port tests/oracle/philox.py agrees).
  const std::vector<int> pinned = {7, 1, 6, 5, 7, 0};
  for (index_t t = 0; t < T; ++t) {
    const std::uint64_t bits = static_cast<std::uint64_t>(ids[std::size_t(t)]);
    CHECK(r.experts[t] == int(philox4x32(3, bits)[0] % 8u));
    CHECK(r.experts[t] == pinned[std::size_t(t)]);
    CHECK(r.gates[t] == 1.0);
  }
  CHECK(philox4x32(3, std::uint64_t(-1))[0] == 2318595797u);
}

TEST_CASE("HashRouter is deterministic across instances and modes and depends on the seed", "[hash]") {
  const index_t E = 10, T = 1000;
  std::vector<std::int64_t> ids(T);
  for (index_t t = 0; t < T; ++t) ids[std::size_t(t)] = (t * 7919) % 5003 - 2000;
  const auto x = test::random_matrix<float>(T, 2, 1);
  auto route = [&](std::uint64_t seed, Mode mode) {
    HashRouter<float> router({.d_model = 2, .experts = E, .seed = seed});
    router.set_token_ids(ids);
    Routing<float> r;
    router.forward(x.matrix(), r, mode);
    return as_doubles(r.experts);
  };
  const auto a = route(5, Mode::train);
  CHECK(route(5, Mode::train) == a);
  CHECK(route(5, Mode::eval) == a);
  // The same id always goes to the same expert.
  for (index_t t = 0; t < T; ++t)
    for (index_t u = t + 1; u < T; ++u)
      if (ids[std::size_t(t)] == ids[std::size_t(u)]) CHECK(a[std::size_t(t)] == a[std::size_t(u)]);
  // Another seed is another table: about 1/E of the tokens keep their expert.
  const auto b = route(6, Mode::train);
  index_t same = 0;
  for (index_t t = 0; t < T; ++t) same += a[std::size_t(t)] == b[std::size_t(t)] ? 1 : 0;
  CHECK(same < T / 4);
}

TEST_CASE("HashRouter spreads 10^5 ids roughly uniformly over the experts (chi-square)", "[hash]") {
  const index_t n = 100000;
  const index_t E = GENERATE(2, 10, 16, 64);
  const bool negative = GENERATE(false, true);
  INFO("E = " << E << (negative ? ", ids around 0" : ", ids 0..n-1"));
  std::vector<std::int64_t> ids(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) ids[std::size_t(i)] = negative ? i - n / 2 : i;
  HashRouter<double> router({.d_model = 1, .experts = E, .seed = 2021});
  router.set_token_ids(ids);
  Tensor<double> x({n, 1});
  x.zero();
  Routing<double> r;
  router.forward(x.matrix(), r, Mode::train);
  std::vector<double> count(static_cast<std::size_t>(E), 0.0);
  index_t invalid = 0;
  for (index_t i = 0; i < n; ++i) {
    if (r.experts[i] < 0 || r.experts[i] >= E) {
      ++invalid;
      continue;
    }
    count[std::size_t(r.experts[i])] += 1;
  }
  REQUIRE(invalid == 0);
  const double expected = double(n) / double(E);
  double chi2 = 0;
  for (double c : count) chi2 += (c - expected) * (c - expected) / expected;
  const double dof = double(E - 1);
  INFO("chi2 = " << chi2 << " with " << dof << " degrees of freedom");
  CHECK(chi2 < dof + 6 * std::sqrt(2 * dof));  // a 6-sigma bound: fails only for a biased hash
}

TEST_CASE("HashRouter passes no gradient: dx, d_logits and d_gates stay as they are", "[hash]") {
  const index_t T = 4, d = 3, E = 5;
  HashRouter<double> router({.d_model = d, .experts = E});
  router.set_token_ids(std::vector<std::int64_t>{4, 8, 15, 16});
  const auto x = test::random_matrix<double>(T, d, 2);
  Routing<double> r;
  router.forward(x.matrix(), r, Mode::train);
  auto dg = test::random_matrix<double>(T, 1, 3);
  auto dl = test::random_matrix<double>(T, E, 4);
  auto dx = test::random_matrix<double>(T, d, 5);
  const auto dl0 = dl, dx0 = dx;
  router.backward(x.matrix(), r, dg.matrix(), dl.matrix(), dx.matrix());
  CHECK(as_doubles(dl) == as_doubles(dl0));
  CHECK(as_doubles(dx) == as_doubles(dx0));
  CHECK(parameter_count(router) == 0);
}

TEST_CASE("HashRouter errors: missing ids, wrong count, bad config", "[hash]") {
  HashRouter<double> router({.d_model = 2, .experts = 3});
  Tensor<double> x({4, 2}), bad({4, 3});
  x.zero();
  Routing<double> r;
  REQUIRE_THROWS_WITH(router.forward(x.matrix(), r, Mode::eval),
                      Catch::Contains("HashRouter: token ids: expected 4, got none"));
  router.set_token_ids(std::vector<std::int64_t>{1, 2, 3});
  REQUIRE_THROWS_WITH(router.forward(x.matrix(), r, Mode::eval),
                      Catch::Contains("HashRouter: token ids: expected 4, got 3"));
  REQUIRE_THROWS_AS(router.forward(x.matrix(), r, Mode::eval), smoe::error);
  router.set_token_ids(std::vector<std::int64_t>{1, 2, 3, 4});
  REQUIRE_THROWS_WITH(router.forward(bad.matrix(), r, Mode::eval),
                      Catch::Contains("HashRouter: x must be [4, 2], got [4, 3]"));
  router.forward(x.matrix(), r, Mode::eval);
  // Ids persist until replaced; an empty set of ids routes an empty batch.
  router.forward(x.matrix(), r, Mode::eval);
  router.set_token_ids({});
  Tensor<double> none({0, 2});
  router.forward(none.matrix(), r, Mode::eval);
  CHECK(r.tokens() == 0);
  using R = HashRouter<float>;
  REQUIRE_THROWS_WITH(R({.d_model = 0, .experts = 3}), Catch::Contains("HashRouter: d_model must be >= 1, got 0"));
  REQUIRE_THROWS_WITH(R({.d_model = 2, .experts = 0}), Catch::Contains("HashRouter: experts must be >= 1, got 0"));
}

TEST_CASE("HashRouter with the losses: importance works, logit-based losses refuse", "[hash]") {
  const index_t T = 5, E = 3;
  HashRouter<double> router({.d_model = 2, .experts = E, .seed = 1});
  router.set_token_ids(std::vector<std::int64_t>{10, 11, 12, 13, 14});
  const auto x = test::random_matrix<double>(T, 2, 2);
  Routing<double> r;
  router.forward(x.matrix(), r, Mode::train);
  std::vector<double> count(std::size_t(E), 0.0);
  for (index_t t = 0; t < T; ++t) count[std::size_t(r.experts[t])] += 1;
  double mean = 0, var = 0;
  for (double c : count) mean += c / double(E);
  for (double c : count) var += (c - mean) * (c - mean) / double(E);
  ImportanceLoss<double> importance(1.0);
  CHECK(importance.forward(r, E) == Approx(var / (mean * mean)));
  SwitchBalanceLoss<double> sw;
  REQUIRE_THROWS_WITH(sw.forward(r, E), Catch::Contains("needs router logits [5, 3]; this router provides 0"));
  RouterZLoss<double> z;
  REQUIRE_THROWS_AS(z.forward(r, E), smoe::error);
}

TEST_CASE("MoE<HashRouter, GeluExperts>: y = expert(hash(id))(x), gradients match finite differences",
          "[hash][moe][grad]") {
  const index_t d = 5, E = 4, G = 3, T = 8;
  HashRouter<double> router({.d_model = d, .experts = E, .seed = 77});
  std::vector<std::int64_t> ids;
  for (index_t t = 0; t < T; ++t) ids.push_back(1000 + 37 * t);
  router.set_token_ids(ids);
  MoE layer(router, GeluExperts<double>({d, E, G, true}), WeightedSum<double>{}, ImportanceLoss<double>(0.2));
  randomize_parameters(layer, 0.6);
  const auto x = test::random_matrix<double>(T, d, 31);
  Tensor<double> y({T, d});
  const auto out = layer.forward(x.matrix(), y.matrix(), Mode::train);
  auto& ex = layer.experts();
  for (index_t t = 0; t < T; ++t) {
    const auto e = index_t(philox4x32(77, std::uint64_t(ids[std::size_t(t)]))[0] % std::uint64_t(E));
    const auto o = test::ref::expert(test::ref::Act::gelu, int(d), int(G), x.data() + t * d,
                                     ex.w1().value.data() + e * d * G, ex.w2().value.data() + e * G * d,
                                     ex.b1().value.data() + e * G, ex.b2().value.data() + e * d);
    for (index_t c = 0; c < d; ++c) CHECK(y[t * d + c] == Approx(o[std::size_t(c)]).epsilon(1e-12));
  }
  CHECK(out.router_loss == 0.0);
  // The gate is constant and the choice ignores x: dx is the chosen expert's input gradient only.
  check_layer_gradients(layer, T, Mode::train);
}
