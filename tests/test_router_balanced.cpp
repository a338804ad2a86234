// Balanced routing: the log-domain Sinkhorn, the exact balanced linear assignment, and the S-BASE
// and BASE routers built on them, against naive double-precision references written here (plain
// loops, brute-force enumeration, an O(n³) Hungarian method, a negative-cycle optimality
// certificate), backward against central differences, alone and inside MoE<>.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <set>
#include <span>
#include <utility>
#include <vector>

#include <smoe/combine/weighted_sum.hpp>
#include <smoe/core/rng.hpp>
#include <smoe/experts/feed_forward_experts.hpp>
#include <smoe/layers/moe.hpp>
#include <smoe/losses/entropy.hpp>
#include <smoe/losses/switch_balance.hpp>
#include <smoe/routing/base_router.hpp>
#include <smoe/routing/linear_assignment.hpp>
#include <smoe/routing/sbase_router.hpp>
#include <smoe/routing/sinkhorn.hpp>
#include <smoe/train/gradient_check.hpp>

#include "catch.hpp"
#include "helpers.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

using namespace smoe;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// ----- naive references (double, plain loops) -----

std::vector<double> ref_logits(const std::vector<double>& x, const std::vector<double>& w, index_t T, index_t d,
                               index_t E) {
  std::vector<double> s(static_cast<std::size_t>(T * E), 0.0);
  for (index_t t = 0; t < T; ++t)
    for (index_t e = 0; e < E; ++e)
      for (index_t i = 0; i < d; ++i) s[t * E + e] += x[t * d + i] * w[e * d + i];
  return s;
}

// Textbook log-domain Sinkhorn: rows to 1, columns to T/E; log P = z + a + b.
std::vector<double> ref_sinkhorn(const std::vector<double>& z, index_t T, index_t E, index_t iters) {
  std::vector<double> a(static_cast<std::size_t>(E), 0.0), b(static_cast<std::size_t>(T), 0.0);
  for (index_t it = 0; it < iters; ++it) {
    for (index_t t = 0; t < T; ++t) {
      double m = -kInf, sum = 0;
      for (index_t e = 0; e < E; ++e) m = std::max(m, z[t * E + e] + a[e]);
      for (index_t e = 0; e < E; ++e) sum += std::exp(z[t * E + e] + a[e] - m);
      b[t] = -(m + std::log(sum));
    }
    for (index_t e = 0; e < E; ++e) {
      double m = -kInf, sum = 0;
      for (index_t t = 0; t < T; ++t) m = std::max(m, z[t * E + e] + b[t]);
      for (index_t t = 0; t < T; ++t) sum += std::exp(z[t * E + e] + b[t] - m);
      a[e] = std::log(double(T) / double(E)) - (m + std::log(sum));
    }
  }
  std::vector<double> out(z.size());
  for (index_t t = 0; t < T; ++t)
    for (index_t e = 0; e < E; ++e) out[t * E + e] = z[t * E + e] + a[e] + b[t];
  return out;
}

// Indices sorted by (primary desc, secondary desc, index asc); first k.
std::vector<int> ref_order(const double* primary, const double* secondary, index_t E, index_t k) {
  std::vector<int> idx(static_cast<std::size_t>(E));
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int i, int j) {
    if (primary[i] != primary[j]) return primary[i] > primary[j];
    return secondary[i] > secondary[j];
  });
  idx.resize(static_cast<std::size_t>(k));
  return idx;
}

double sigmoid(double v) { return 1 / (1 + std::exp(-v)); }

struct BruteForce {
  double best = -kInf, second = -kInf;  // second: best objective of any other assignment
  std::vector<int> argmax;
};

// Every assignment of T tokens to E experts whose loads are allowed: `caps` exact loads if given,
// else balanced (⌊T/E⌋ or ⌈T/E⌉, exactly T mod E at ⌈T/E⌉).
BruteForce brute_force(const std::vector<double>& s, int T, int E, const std::vector<index_t>& caps = {}) {
  BruteForce r;
  std::vector<int> a(static_cast<std::size_t>(T), 0);
  const int q = T / E, extra = T % E;
  auto allowed = [&] {
    std::vector<int> load(static_cast<std::size_t>(E), 0);
    for (int e : a) ++load[e];
    if (!caps.empty()) {
      for (int e = 0; e < E; ++e)
        if (load[e] != caps[e]) return false;
      return true;
    }
    int big = 0;
    for (int n : load) {
      if (n != q && n != q + 1) return false;
      big += n == q + 1;
    }
    return big == extra;
  };
  std::function<void(int)> rec = [&](int t) {
    if (t == T) {
      if (!allowed()) return;
      double v = 0;
      for (int i = 0; i < T; ++i) v += s[i * E + a[i]];
      if (v > r.best) {
        r.second = r.best;
        r.best = v;
        r.argmax = a;
      } else if (v > r.second) {
        r.second = v;
      }
      return;
    }
    for (int e = 0; e < E; ++e) {
      a[t] = e;
      rec(t + 1);
    }
  };
  rec(0);
  return r;
}

// Minimum-cost perfect matching of a square cost matrix: the O(n³) Hungarian method with
// potentials (rows added one at a time). Returns the column of each row.
std::vector<int> hungarian(const std::vector<double>& cost, int n) {
  std::vector<double> u(n + 1, 0), v(n + 1, 0);
  std::vector<int> p(n + 1, 0), way(n + 1, 0);
  for (int i = 1; i <= n; ++i) {
    p[0] = i;
    int j0 = 0;
    std::vector<double> minv(n + 1, kInf);
    std::vector<char> used(n + 1, 0);
    do {
      used[j0] = 1;
      const int i0 = p[j0];
      double delta = kInf;
      int j1 = 0;
      for (int j = 1; j <= n; ++j)
        if (!used[j]) {
          const double cur = cost[(i0 - 1) * n + (j - 1)] - u[i0] - v[j];
          if (cur < minv[j]) minv[j] = cur, way[j] = j0;
          if (minv[j] < delta) delta = minv[j], j1 = j;
        }
      for (int j = 0; j <= n; ++j)
        if (used[j]) {
          u[p[j]] += delta;
          v[j] -= delta;
        } else {
          minv[j] -= delta;
        }
      j0 = j1;
    } while (p[j0] != 0);
    do {
      const int j1 = way[j0];
      p[j0] = p[j1];
      j0 = j1;
    } while (j0);
  }
  std::vector<int> row_col(n);
  for (int j = 1; j <= n; ++j) row_col[p[j] - 1] = j - 1;
  return row_col;
}

// The optimal balanced objective by the Hungarian method on replicated columns: expert e gets
// ⌊T/E⌋ "base" columns and one "extra" column; E − (T mod E) dummy rows may take only extra
// columns, so exactly T mod E experts receive ⌈T/E⌉ tokens.
double hungarian_balanced(const std::vector<double>& s, int T, int E) {
  const int q = T / E, extra = T % E, per = q + 1, n = E * per, dummies = E - extra;
  REQUIRE(T + dummies == n);
  const double big = 1e9;
  std::vector<double> cost(static_cast<std::size_t>(n) * n);
  for (int i = 0; i < n; ++i)
    for (int col = 0; col < n; ++col) {
      const int e = col / per;
      const bool extra_col = col % per == q;
      cost[i * n + col] = i < T ? -s[i * E + e] : (extra_col ? 0.0 : big);
    }
  const auto match = hungarian(cost, n);
  double v = 0;
  for (int i = 0; i < T; ++i) v += s[i * E + match[i] / per];
  return v;
}

// Optimality certificate for exact capacities: an assignment is optimal iff moving tokens around
// a cycle of experts never gains, i.e. the graph with arcs e → f of weight
// min_{t at e} (s[t,e] − s[t,f]) has no negative cycle (Floyd–Warshall).
bool has_improving_cycle(const std::vector<double>& s, const std::vector<std::int32_t>& a, int T, int E) {
  std::vector<double> w(static_cast<std::size_t>(E * E), kInf);
  for (int t = 0; t < T; ++t)
    for (int f = 0; f < E; ++f)
      if (f != a[t]) w[a[t] * E + f] = std::min(w[a[t] * E + f], s[t * E + a[t]] - s[t * E + f]);
  for (int e = 0; e < E; ++e) w[e * E + e] = std::min(w[e * E + e], 0.0);
  for (int k = 0; k < E; ++k)
    for (int i = 0; i < E; ++i)
      for (int j = 0; j < E; ++j)
        if (w[i * E + k] + w[k * E + j] < w[i * E + j]) w[i * E + j] = w[i * E + k] + w[k * E + j];
  for (int e = 0; e < E; ++e)
    if (w[e * E + e] < -1e-9) return true;
  return false;
}

std::vector<double> to_double(const Tensor<float>& t) { return {t.data(), t.data() + t.size()}; }
std::vector<double> to_double(const Tensor<double>& t) { return {t.data(), t.data() + t.size()}; }

template <class T>
Tensor<T> tensor_of(const std::vector<double>& v, index_t rows, index_t cols) {
  Tensor<T> t({rows, cols});
  for (index_t i = 0; i < t.size(); ++i) t[i] = T(v[i]);
  return t;
}

std::vector<index_t> loads(std::span<const std::int32_t> a, index_t E) {
  std::vector<index_t> n(static_cast<std::size_t>(E), 0);
  for (auto e : a) {
    REQUIRE(e >= 0);
    REQUIRE(e < E);
    ++n[e];
  }
  return n;
}

// ----- finite-difference helpers -----

template <HasParameters C>
void randomize_parameters(C& c, double std, std::uint64_t seed = 100) {
  c.for_each_parameter([&](std::string_view, auto& p) { test::randomize(p.value, seed++, std); });
}

// Router alone: objective Σ gates ⊙ G + Σ logits ⊙ L, whose gradient backward(d_gates = G, d_logits = L) gives.
template <class Router>
void check_router_gradients(Router& router, index_t tokens, Mode mode) {
  const index_t d = router.d_model(), E = router.experts(), K = router.k();
  auto x = test::random_matrix<double>(tokens, d, 41);
  const auto G = test::random_matrix<double>(tokens, K, 42), L = test::random_matrix<double>(tokens, E, 43);
  Routing<double> r;
  auto objective = [&] {
    Routing<double> rr;
    router.forward(x.matrix(), rr, mode);
    double v = 0;
    for (index_t i = 0; i < rr.gates.size(); ++i) v += rr.gates[i] * G[i];
    for (index_t i = 0; i < rr.logits.size(); ++i) v += rr.logits[i] * L[i];
    return v;
  };
  router.forward(x.matrix(), r, mode);
  zero_grad(router);
  Tensor<double> d_logits = L, dx({tokens, d});
  dx.zero();
  router.backward(x.matrix(), r, G.matrix(), d_logits.matrix(), dx.matrix());
  const auto res = check_parameter_gradients(router, objective, 1e-6, 1000);
  INFO("worst parameter " << res.worst_parameter << "[" << res.worst_index << "], error " << res.worst_error);
  CHECK(res.worst_error < 1e-7);
  test::require_input_gradient(x, dx, objective);
}

// Σ y ⊙ dy + aux: the objective whose gradient MoE::backward(dy) returns.
template <class Layer>
double objective(Layer& layer, const Tensor<double>& x, const Tensor<double>& dy, Mode mode) {
  Tensor<double> y({x.dim(0), x.dim(1)});
  const auto out = layer.forward(x.matrix(), y.matrix(), mode);
  double s = out.aux_loss;
  for (index_t i = 0; i < y.size(); ++i) s += y[i] * dy[i];
  return s;
}

// Every parameter gradient and dx of `layer` against central differences (as tests/test_moe.cpp).
template <class Layer>
void check_layer_gradients(Layer& layer, index_t tokens, Mode mode, double tol = 1e-7) {
  const index_t d = layer.d_model();
  auto x = test::random_matrix<double>(tokens, d, 31);
  const auto dy = test::random_matrix<double>(tokens, d, 32);
  Tensor<double> y({tokens, d}), dx({tokens, d});
  zero_grad(layer);
  layer.forward(x.matrix(), y.matrix(), mode);
  layer.backward(dy.matrix(), dx.matrix());
  const auto r = check_parameter_gradients(layer, [&] { return objective(layer, x, dy, mode); }, 1e-6, 2000);
  INFO("worst parameter " << r.worst_parameter << "[" << r.worst_index << "], error " << r.worst_error);
  CHECK(r.worst_error < tol);
  test::require_input_gradient(x, dx, [&] { return objective(layer, x, dy, mode); }, tol);
}

}  // namespace

// =====================================================================================  Sinkhorn

TEMPLATE_TEST_CASE("sinkhorn_balance matches the naive log-domain Sinkhorn", "[sinkhorn]", float, double) {
  using T = TestType;
  const auto [tokens, E] = GENERATE(table<index_t, index_t>({{13, 4}, {5, 8}, {1, 6}, {300, 7}, {40, 1}}));
  const index_t iters = GENERATE(0, 1, 3, 10);
  const auto z = test::random_matrix<T>(tokens, E, 7, 2.0);
  Tensor<T> log_p({tokens, E});
  sinkhorn_balance(z.matrix(), iters, log_p.matrix());
  INFO("T = " << tokens << ", E = " << E << ", iters = " << iters);
  if (iters == 0) {
    for (index_t i = 0; i < z.size(); ++i) REQUIRE(log_p[i] == z[i]);  // exactly the scores
  }
  const double tol = sizeof(T) == 8 ? 1e-11 : 2e-5;
  test::require_close(log_p, ref_sinkhorn(to_double(z), tokens, E, iters), tol, tol, "log P");
}

TEMPLATE_TEST_CASE("sinkhorn_balance converges: rows sum to 1 and columns to T/E", "[sinkhorn]", float, double) {
  using T = TestType;
  const auto [tokens, E] = GENERATE(table<index_t, index_t>({{64, 8}, {37, 5}, {5, 16}, {200, 16}, {7, 3}}));
  const double std = GENERATE(1.0, 2.0, 3.0);
  const auto z = test::random_matrix<T>(tokens, E, 11 + std::uint64_t(std), std);
  Tensor<T> log_p({tokens, E});
  sinkhorn_balance(z.matrix(), 200, log_p.matrix());
  INFO("T = " << tokens << ", E = " << E << ", std = " << std);
  std::vector<double> cols(static_cast<std::size_t>(E), 0.0);
  for (index_t t = 0; t < tokens; ++t) {
    double row = 0;
    for (index_t e = 0; e < E; ++e) {
      row += std::exp(double(log_p[t * E + e]));
      cols[e] += std::exp(double(log_p[t * E + e]));
    }
    CHECK(std::abs(row - 1.0) < 1e-3);
  }
  for (index_t e = 0; e < E; ++e) CHECK(std::abs(cols[e] - double(tokens) / double(E)) < 1e-3);
}

TEST_CASE("sinkhorn_balance: one token is spread evenly, exactly", "[sinkhorn]") {
  const index_t E = 7;
  const auto z = test::random_matrix<double>(1, E, 3, 2.0);
  Tensor<double> log_p({1, E});
  sinkhorn_balance(z.matrix(), 3, log_p.matrix());
  for (index_t e = 0; e < E; ++e) CHECK(log_p[e] == log_p[0]);
  CHECK(log_p[0] == Approx(-std::log(double(E))).epsilon(1e-14));
}

#if defined(_OPENMP)
TEST_CASE("sinkhorn_balance gives the same bits for any thread count", "[sinkhorn][threads]") {
  const index_t tokens = 2000, E = 32;  // large enough for the threaded path
  const auto z = test::random_matrix<float>(tokens, E, 5, 2.0);
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    Tensor<float> log_p({tokens, E});
    sinkhorn_balance(z.matrix(), 5, log_p.matrix());
    return std::vector<float>(log_p.data(), log_p.data() + log_p.size());
  };
  const auto one = run(1), two = run(2), three = run(3);
  omp_set_num_threads(omp_get_num_procs());
  CHECK(one == two);
  CHECK(one == three);
  test::require_close(one, ref_sinkhorn(to_double(z), tokens, E, 5), 1e-4, 1e-4, "log P");
}
#endif

TEST_CASE("sinkhorn_balance keeps NaN and Inf to their own row and column", "[sinkhorn][nan]") {
  const index_t tokens = 9, E = 5;
  auto z = test::random_matrix<double>(tokens, E, 8);
  z[1 * E + 2] = kNaN;    // token 1, expert 2
  z[4 * E + 0] = kInf;    // token 4, expert 0
  z[6 * E + 3] = -kInf;   // token 6, expert 3: no mass, still balanceable
  for (index_t e = 0; e < E; ++e) z[7 * E + e] = -kInf;  // token 7: nothing
  Tensor<double> log_p({tokens, E});
  sinkhorn_balance(std::as_const(z).matrix(), 20, log_p.matrix());
  // Column 0 holds +Inf and cannot be balanced (potential 0); the NaN and −Inf entries carry no
  // mass. No entry of a row without a non-finite score may be NaN or infinite.
  for (index_t t : {0, 2, 3, 5, 8})
    for (index_t e = 0; e < E; ++e) {
      INFO("t = " << t << ", e = " << e);
      CHECK(std::isfinite(log_p[t * E + e]));
    }
  CHECK(std::isnan(log_p[1 * E + 2]));
  CHECK(log_p[6 * E + 3] == -kInf);
  // All-NaN input: no crash, every output NaN.
  Tensor<double> all_nan({3, 4}), out({3, 4});
  all_nan.fill(kNaN);
  sinkhorn_balance(std::as_const(all_nan).matrix(), 3, out.matrix());
  for (index_t i = 0; i < out.size(); ++i) CHECK(std::isnan(out[i]));
}

TEST_CASE("sinkhorn_balance rejects bad input", "[sinkhorn][errors]") {
  Tensor<double> z({4, 3}), out({4, 3}), wrong({3, 4});
  z.zero();
  REQUIRE_THROWS_WITH(sinkhorn_balance<double>(z.matrix(), -1, out.matrix()), Catch::Contains("iters must be >= 0, got -1"));
  REQUIRE_THROWS_WITH(sinkhorn_balance<double>(z.matrix(), 3, wrong.matrix()),
                      Catch::Contains("log_p must be [4, 3], got [3, 4]"));
  REQUIRE_THROWS_WITH(sinkhorn_balance(ConstMatrixView<double>(z.matrix()), 3, z.matrix()),
                      Catch::Contains("log_p must not overlap z"));
  Tensor<double> empty({0, 3});
  Tensor<double> empty_out({0, 3});
  sinkhorn_balance<double>(empty.matrix(), 3, empty_out.matrix());  // T = 0: nothing to do
}

// ==========================================================================  linear assignment

TEST_CASE("balanced assignment is optimal against brute force", "[assignment]") {
  LinearAssignment solver;  // reused across problems of different shapes
  int unique = 0;
  for (int T = 1; T <= 8; ++T)
    for (int E = 1; E <= 4; ++E)
      for (int rep = 0; rep < 6; ++rep) {
        const std::uint64_t seed = std::uint64_t(T * 100 + E * 10 + rep);
        std::vector<double> s(static_cast<std::size_t>(T * E));
        for (std::size_t i = 0; i < s.size(); ++i) s[i] = 1.5 * standard_normal(seed, i, 3);
        if (rep >= 4)  // many exact ties
          for (double& v : s) v = std::round(v);
        std::vector<std::int32_t> a(static_cast<std::size_t>(T));
        const double got = solver.solve(ConstMatrixView<double>(s.data(), T, E), std::span<std::int32_t>(a));
        const auto bf = brute_force(s, T, E);
        INFO("T = " << T << ", E = " << E << ", rep = " << rep);
        double value = 0;
        for (int t = 0; t < T; ++t) value += s[t * E + a[t]];
        CHECK(got == Approx(value).epsilon(1e-14).margin(1e-14));
        CHECK(value == Approx(bf.best).epsilon(1e-12).margin(1e-12));
        const auto n = loads(a, E);
        int big = 0;
        for (index_t c : n) {
          CHECK((c == T / E || c == T / E + 1));
          big += c == T / E + 1;
        }
        CHECK(big == T % E);
        if (bf.best - bf.second > 1e-9) {  // a unique optimum: the assignment itself is determined
          ++unique;
          CHECK(std::vector<int>(a.begin(), a.end()) == bf.argmax);
        }
      }
  CHECK(unique > 100);
}

TEST_CASE("assignment with explicit capacities is optimal against brute force", "[assignment]") {
  LinearAssignment solver;
  const std::vector<std::vector<index_t>> all_caps = {{3, 0, 2}, {1, 1, 1, 4}, {0, 0, 6}, {2, 2, 2, 1}, {5}, {1, 2, 3, 1}};
  for (std::size_t c = 0; c < all_caps.size(); ++c) {
    const auto& caps = all_caps[c];
    const int E = int(caps.size()), T = int(std::accumulate(caps.begin(), caps.end(), index_t(0)));
    std::vector<double> s(static_cast<std::size_t>(T * E));
    for (std::size_t i = 0; i < s.size(); ++i) s[i] = standard_normal(50 + c, i, 3);
    std::vector<std::int32_t> a(static_cast<std::size_t>(T));
    solver.solve(ConstMatrixView<double>(s.data(), T, E), std::span<const index_t>(caps), std::span<std::int32_t>(a));
    const auto bf = brute_force(s, T, E, caps);
    INFO("capacities #" << c);
    double value = 0;
    for (int t = 0; t < T; ++t) value += s[t * E + a[t]];
    CHECK(value == Approx(bf.best).epsilon(1e-12));
    CHECK(loads(a, E) == caps);
  }
}

TEST_CASE("balanced assignment matches an independent Hungarian method on medium sizes", "[assignment]") {
  const auto [T, E] = GENERATE(table<int, int>({{48, 6}, {50, 6}, {23, 8}, {5, 9}, {60, 4}}));
  const double std = GENERATE(0.3, 3.0);
  std::vector<double> s(static_cast<std::size_t>(T * E));
  for (std::size_t i = 0; i < s.size(); ++i) s[i] = std * standard_normal(std::uint64_t(T * E), i, 4) + 0.5 * double(i % E);
  std::vector<std::int32_t> a(static_cast<std::size_t>(T));
  const double got = balanced_assignment(ConstMatrixView<double>(s.data(), T, E), std::span<std::int32_t>(a));
  INFO("T = " << T << ", E = " << E);
  CHECK(got == Approx(hungarian_balanced(s, T, E)).epsilon(1e-12));
  if (T % E == 0) CHECK_FALSE(has_improving_cycle(s, a, T, E));
}

TEST_CASE("balanced assignment: ties are deterministic", "[assignment]") {
  SECTION("all scores equal: tokens fill the experts in index order") {
    const int T = 12, E = 4;
    std::vector<double> s(T * E, 0.25);
    std::vector<std::int32_t> a(T);
    balanced_assignment(ConstMatrixView<double>(s.data(), T, E), std::span<std::int32_t>(a));
    for (int t = 0; t < T; ++t) CHECK(a[t] == t / 3);
  }
  SECTION("the same scores give the same assignment, with or without a reused solver") {
    const int T = 64, E = 8;
    std::vector<double> s(T * E);
    for (std::size_t i = 0; i < s.size(); ++i) s[i] = std::round(2 * standard_normal(9, i, 1));  // many ties
    std::vector<std::int32_t> a(T), b(T), c(T);
    balanced_assignment(ConstMatrixView<double>(s.data(), T, E), std::span<std::int32_t>(a));
    LinearAssignment solver;
    std::vector<double> other(T * E, 1.0);
    solver.solve(ConstMatrixView<double>(other.data(), T, E), std::span<std::int32_t>(c));
    solver.solve(ConstMatrixView<double>(s.data(), T, E), std::span<std::int32_t>(b));
    CHECK(a == b);
  }
}

TEST_CASE("balanced assignment of 4096 tokens to 64 experts is exact and completes quickly", "[assignment][large]") {
  const int T = 4096, E = 64;
  const int kind = GENERATE(0, 1);  // random; all tokens preferring the same experts
  std::vector<float> s(static_cast<std::size_t>(T) * E);
  for (std::size_t i = 0; i < s.size(); ++i) {
    const double noise = standard_normal(21, i, 5);
    s[i] = float(kind == 0 ? 2 * noise : 0.01 * noise + 0.1 * double(i % E));
  }
  std::vector<std::int32_t> a(T);
  const auto start = std::chrono::steady_clock::now();
  balanced_assignment(ConstMatrixView<float>(s.data(), T, E), std::span<std::int32_t>(a));
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CHECK(seconds < 30.0);  // loose: a guard against a blow-up (minutes), not a performance claim; ASan -O0 on a
                          // loaded 2-core machine took 8.5 s
  for (index_t n : loads(a, E)) CHECK(n == T / E);
  std::vector<double> sd(s.begin(), s.end());
  CHECK_FALSE(has_improving_cycle(sd, a, T, E));
}

TEST_CASE("balanced assignment stays valid for NaN and Inf scores", "[assignment][nan]") {
  const int T = 10, E = 4;
  std::vector<double> s(T * E);
  for (std::size_t i = 0; i < s.size(); ++i) s[i] = standard_normal(13, i, 1);
  s[0 * E + 1] = kNaN;
  s[3 * E + 2] = kInf;
  s[5 * E + 0] = -kInf;
  for (int e = 0; e < E; ++e) s[7 * E + e] = kNaN;
  std::vector<std::int32_t> a(T);
  balanced_assignment(ConstMatrixView<double>(s.data(), T, E), std::span<std::int32_t>(a));
  const auto n = loads(a, E);
  for (index_t c : n) CHECK((c == 2 || c == 3));
  CHECK(a[3] == 2);  // +Inf wins its expert
  CHECK(a[0] != 1);  // NaN ranks below every number
  CHECK(a[5] != 0);
  std::fill(s.begin(), s.end(), kNaN);
  balanced_assignment(ConstMatrixView<double>(s.data(), T, E), std::span<std::int32_t>(a));
  loads(a, E);
}

TEST_CASE("linear assignment rejects bad input", "[assignment][errors]") {
  LinearAssignment solver;
  std::vector<double> s(6 * 3, 0.0);
  const ConstMatrixView<double> m(s.data(), 6, 3);
  std::vector<std::int32_t> a(6), short_out(5);
  REQUIRE_THROWS_WITH(solver.solve(m, std::span<std::int32_t>(short_out)),
                      Catch::Contains("out.size() (= tokens) must be 6, got 5"));
  const std::vector<index_t> wrong_sum{2, 2, 1}, negative{7, -1, 0}, wrong_size{3, 3};
  REQUIRE_THROWS_WITH(solver.solve(m, std::span<const index_t>(wrong_sum), std::span<std::int32_t>(a)),
                      Catch::Contains("sum of capacities (= tokens) must be 6, got 5"));
  REQUIRE_THROWS_WITH(solver.solve(m, std::span<const index_t>(negative), std::span<std::int32_t>(a)),
                      Catch::Contains("capacities[1] must be >= 0, got -1"));
  REQUIRE_THROWS_WITH(solver.solve(m, std::span<const index_t>(wrong_size), std::span<std::int32_t>(a)),
                      Catch::Contains("capacities.size() (= experts) must be 3, got 2"));
  REQUIRE_THROWS_WITH(solver.solve(ConstMatrixView<double>(s.data(), 6, 0), std::span<std::int32_t>(a)),
                      Catch::Contains("at least 1 column"));
  std::vector<std::int32_t> none;
  CHECK(solver.solve(ConstMatrixView<double>(s.data(), 0, 3), std::span<std::int32_t>(none)) == 0.0);  // T = 0
}

// ==============================================================================  S-BASE router

namespace {

// The S-BASE routing of x under weight w, from the formulas.
struct RefRouting {
  std::vector<double> logits, gates;
  std::vector<int> ids;
  std::vector<double> margin;  // per token: gap between the K-th and (K+1)-th selection score
};

RefRouting ref_sbase(const std::vector<double>& x, const std::vector<double>& w, index_t T, index_t d, index_t E,
                     index_t K, index_t iters, bool train) {
  RefRouting r;
  r.logits = ref_logits(x, w, T, d, E);
  auto p = train && iters > 0 ? ref_sinkhorn(r.logits, T, E, iters) : r.logits;
  if (train && iters > 0 && T == 1) std::fill(p.begin(), p.end(), -std::log(double(E)));  // exactly, in exact arithmetic
  for (index_t t = 0; t < T; ++t) {
    const auto all = ref_order(&p[t * E], &r.logits[t * E], E, E);
    for (index_t j = 0; j < K; ++j) {
      r.ids.push_back(all[j]);
      r.gates.push_back(sigmoid(r.logits[t * E + all[j]]));
    }
    r.margin.push_back(K < E ? p[t * E + all[K - 1]] - p[t * E + all[K]] : kInf);
  }
  return r;
}

}  // namespace

TEMPLATE_TEST_CASE("SBaseRouter matches the naive reference in both modes", "[sbase]", float, double) {
  using T = TestType;
  const index_t d = 6, E = 5;
  const auto [tokens, K] = GENERATE(table<index_t, index_t>({{13, 1}, {13, 2}, {40, 3}, {3, 2}, {1, 2}, {8, 5}}));
  const int iters = GENERATE(0, 1, 3);
  const bool train = GENERATE(false, true);
  SBaseRouter<T> router({.d_model = d, .experts = E, .k = K, .sinkhorn_iters = iters});
  test::randomize(router.weight().value, 3, 0.8);
  const auto x = test::random_matrix<T>(tokens, d, 4);
  Routing<T> r;
  router.forward(x.matrix(), r, train ? Mode::train : Mode::eval);
  const auto ref = ref_sbase(to_double(x), to_double(router.weight().value), tokens, d, E, K, iters, train);
  INFO("T = " << tokens << ", K = " << K << ", iters = " << iters << ", train = " << train);
  const double tol = 10 * test::tolerance<T>();
  test::require_close(r.logits, ref.logits, tol, tol, "logits");
  REQUIRE(r.experts.dim(0) == tokens);
  REQUIRE(r.experts.dim(1) == K);
  for (index_t t = 0; t < tokens; ++t) {
    if (sizeof(T) == 4 && ref.margin[t] < 1e-3) continue;  // float: a near tie may round either way
    for (index_t j = 0; j < K; ++j) {
      INFO("token " << t << ", slot " << j);
      CHECK(r.experts[t * K + j] == ref.ids[t * K + j]);
      CHECK(r.gates[t * K + j] == Approx(ref.gates[t * K + j]).epsilon(tol).margin(tol));
    }
  }
  if (train && iters > 0)
    test::require_close(router.balanced_scores(), ref_sinkhorn(ref.logits, tokens, E, iters), 1e-4, 1e-4, "log P");
}

TEST_CASE("SBaseRouter training balances a skewed router better than plain top-k", "[sbase]") {
  const index_t d = 8, E = 8, K = 1, tokens = 256;
  SBaseRouter<double> router({.d_model = d, .experts = E, .k = K, .sinkhorn_iters = 20});
  test::randomize(router.weight().value, 5, 0.3);
  for (index_t i = 0; i < d; ++i) router.weight().value[0 * d + i] += 1.0;  // expert 0 attracts every token
  auto x = test::random_matrix<double>(tokens, d, 6);
  for (index_t t = 0; t < tokens; ++t) x[t * d] = std::abs(x[t * d]) + 1;
  Routing<double> eval, train;
  router.forward(x.matrix(), eval, Mode::eval);
  router.forward(x.matrix(), train, Mode::train);
  auto max_load = [&](const Routing<double>& r) {
    const auto n = loads(std::span<const std::int32_t>(r.experts.data(), std::size_t(tokens)), E);
    return *std::max_element(n.begin(), n.end());
  };
  INFO("max load eval " << max_load(eval) << ", train " << max_load(train));
  CHECK(max_load(eval) > 3 * tokens / E);
  CHECK(max_load(train) < 2 * tokens / E);
}

TEST_CASE("SBaseRouter edge cases: T = 1, all-equal scores, K = E, NaN", "[sbase]") {
  const index_t d = 4, E = 5;
  SECTION("one token routes by its raw logits") {
    SBaseRouter<double> router({.d_model = d, .experts = E, .k = 2});
    test::randomize(router.weight().value, 3);
    const auto x = test::random_matrix<double>(1, d, 4);
    Routing<double> ev, tr;
    router.forward(x.matrix(), ev, Mode::eval);
    router.forward(x.matrix(), tr, Mode::train);
    CHECK(ev.experts[0] == tr.experts[0]);
    CHECK(ev.experts[1] == tr.experts[1]);
  }
  SECTION("all-equal scores: experts 0..K-1, gates 1/2") {
    SBaseRouter<double> router({.d_model = d, .experts = E, .k = 3});  // weight 0
    const auto x = test::random_matrix<double>(7, d, 4);
    for (Mode mode : {Mode::eval, Mode::train}) {
      Routing<double> r;
      router.forward(x.matrix(), r, mode);
      for (index_t t = 0; t < 7; ++t)
        for (index_t j = 0; j < 3; ++j) {
          CHECK(r.experts[t * 3 + j] == j);
          CHECK(r.gates[t * 3 + j] == 0.5);
        }
    }
  }
  SECTION("K = E selects every expert, best first") {
    SBaseRouter<double> router({.d_model = d, .experts = E, .k = E});
    test::randomize(router.weight().value, 3);
    const auto x = test::random_matrix<double>(6, d, 4);
    Routing<double> r;
    router.forward(x.matrix(), r, Mode::train);
    for (index_t t = 0; t < 6; ++t) {
      std::set<int> seen(r.experts.data() + t * E, r.experts.data() + (t + 1) * E);
      CHECK(seen.size() == std::size_t(E));
      for (index_t j = 1; j < E; ++j)
        CHECK(router.balanced_scores()[t * E + r.experts[t * E + j - 1]] >=
              router.balanced_scores()[t * E + r.experts[t * E + j]]);
    }
  }
  SECTION("NaN and Inf inputs keep ids in range; clean tokens keep their routing") {
    SBaseRouter<double> router({.d_model = d, .experts = E, .k = 2});
    test::randomize(router.weight().value, 3);
    auto x = test::random_matrix<double>(9, d, 4);
    Routing<double> clean;
    router.forward(x.matrix(), clean, Mode::eval);
    x[2 * d + 1] = kNaN;
    x[5 * d + 0] = kInf;
    for (Mode mode : {Mode::eval, Mode::train}) {
      Routing<double> r;
      router.forward(x.matrix(), r, mode);
      for (index_t i = 0; i < r.experts.size(); ++i) {
        CHECK(r.experts[i] >= 0);
        CHECK(r.experts[i] < E);
      }
      if (mode == Mode::eval)
        for (index_t t : {0, 1, 3, 4, 6, 7, 8}) CHECK(r.experts[t * 2] == clean.experts[t * 2]);
    }
  }
}

TEST_CASE("SBaseRouter backward matches finite differences", "[sbase][grad]") {
  const auto [tokens, K] = GENERATE(table<index_t, index_t>({{11, 2}, {1, 1}, {3, 4}, {6, 4}}));
  const Mode mode = GENERATE(Mode::eval, Mode::train);
  SBaseRouter<double> router({.d_model = 5, .experts = 4, .k = K});
  test::randomize(router.weight().value, 3, 0.7);
  INFO("T = " << tokens << ", K = " << K);
  check_router_gradients(router, tokens, mode);
}

TEST_CASE("MoE with SBaseRouter: gradients of the whole layer match finite differences", "[sbase][grad][moe]") {
  const index_t d = 6, E = 4, G = 3, K = 2, tokens = 9;
  const Mode mode = GENERATE(Mode::train, Mode::eval);
  SECTION("relu experts, Switch loss") {
    MoE layer(SBaseRouter<double>({.d_model = d, .experts = E, .k = K}), ReluExperts<double>({d, E, G, true}),
              WeightedSum<double>{}, SwitchBalanceLoss<double>(0.3));
    randomize_parameters(layer, 0.6);
    check_layer_gradients(layer, tokens, mode);
  }
  SECTION("gelu experts, entropy loss") {
    MoE layer(SBaseRouter<double>({.d_model = d, .experts = E, .k = K, .sinkhorn_iters = 5}),
              GeluExperts<double>({d, E, G, false}), WeightedSum<double>{}, EntropyLoss<double>(0.5));
    randomize_parameters(layer, 0.6);
    check_layer_gradients(layer, tokens, mode);
  }
}

TEST_CASE("SBaseRouter rejects bad input", "[sbase][errors]") {
  using R = SBaseRouter<float>;
  REQUIRE_THROWS_WITH(R({.d_model = 0, .experts = 3, .k = 1}), Catch::Contains("d_model must be >= 1, got 0"));
  REQUIRE_THROWS_WITH(R({.d_model = 4, .experts = 0, .k = 1}), Catch::Contains("experts must be >= 1, got 0"));
  REQUIRE_THROWS_WITH(R({.d_model = 4, .experts = 3, .k = 4}), Catch::Contains("k must be in [1, experts = 3], got 4"));
  REQUIRE_THROWS_WITH(R({.d_model = 4, .experts = 3, .k = 1, .sinkhorn_iters = -1}),
                      Catch::Contains("SBaseRouter: sinkhorn_iters must be >= 0, got -1"));
  R router({.d_model = 4, .experts = 3, .k = 2});
  Tensor<float> x({5, 4}), wrong({5, 3});
  x.zero();
  Routing<float> r;
  REQUIRE_THROWS_WITH(router.forward(wrong.matrix(), r, Mode::train), Catch::Contains("SBaseRouter: x must be [5, 4], got [5, 3]"));
  router.forward(x.matrix(), r, Mode::train);
  Tensor<float> dg({5, 2}), dl({5, 3}), dx({5, 4}), dg_wrong({5, 1});
  REQUIRE_THROWS_WITH(router.backward(x.matrix(), r, dg_wrong.matrix(), dl.matrix(), dx.matrix()),
                      Catch::Contains("SBaseRouter: d_gates must be [5, 2], got [5, 1]"));
  REQUIRE_THROWS_WITH(router.backward(x.matrix(), r, dg.matrix(), dx.matrix(), dx.matrix()),
                      Catch::Contains("d_logits must be [5, 3], got [5, 4]"));
}

// ================================================================================  BASE router

TEMPLATE_TEST_CASE("BaseRouter matches the naive reference in both modes", "[base]", float, double) {
  using T = TestType;
  const index_t d = 5;
  const auto [tokens, E] = GENERATE(table<index_t, index_t>({{8, 4}, {8, 2}, {6, 3}, {7, 3}, {3, 4}, {1, 3}, {5, 1}}));
  const bool train = GENERATE(false, true);
  BaseRouter<T> router({.d_model = d, .experts = E});
  test::randomize(router.weight().value, 3 + std::uint64_t(tokens), 0.9);
  const auto x = test::random_matrix<T>(tokens, d, 4);
  Routing<T> r;
  router.forward(x.matrix(), r, train ? Mode::train : Mode::eval);
  const auto s = ref_logits(to_double(x), to_double(router.weight().value), tokens, d, E);
  INFO("T = " << tokens << ", E = " << E << ", train = " << train);
  const double tol = 10 * test::tolerance<T>();
  test::require_close(r.logits, s, tol, tol, "logits");
  REQUIRE(r.experts.dim(1) == 1);
  std::vector<int> expected(static_cast<std::size_t>(tokens));
  if (train) {
    const auto bf = brute_force(s, int(tokens), int(E));
    REQUIRE(bf.best - bf.second > 1e-4);  // unique optimum for these seeds
    expected = bf.argmax;
  } else {
    for (index_t t = 0; t < tokens; ++t) expected[t] = ref_order(&s[t * E], &s[t * E], E, 1)[0];
  }
  for (index_t t = 0; t < tokens; ++t) {
    INFO("token " << t);
    CHECK(r.experts[t] == expected[t]);
    CHECK(r.gates[t] == Approx(sigmoid(s[t * E + expected[t]])).epsilon(tol).margin(tol));
  }
}

TEST_CASE("BaseRouter training loads: exact T/E, floor/ceil, distinct experts when T < E", "[base]") {
  const index_t d = 6;
  const auto [tokens, E] = GENERATE(table<index_t, index_t>({{64, 8}, {70, 8}, {5, 8}, {1, 4}, {0, 3}}));
  BaseRouter<double> router({.d_model = d, .experts = E});
  test::randomize(router.weight().value, 3);
  for (index_t i = 0; i < d; ++i) router.weight().value[i] += 1.0;  // skew toward expert 0
  const auto x = test::random_matrix<double>(tokens, d, 4);
  Routing<double> r;
  router.forward(x.matrix(), r, Mode::train);
  const auto n = loads(std::span<const std::int32_t>(r.experts.data(), std::size_t(tokens)), E);
  INFO("T = " << tokens << ", E = " << E);
  for (index_t c : n) CHECK((c == tokens / E || c == tokens / E + 1));
  if (tokens == 1) {  // the single token takes its best expert
    Routing<double> ev;
    router.forward(x.matrix(), ev, Mode::eval);
    CHECK(r.experts[0] == ev.experts[0]);
  }
}

TEST_CASE("BaseRouter all-equal scores: blocks in training, expert 0 in eval", "[base]") {
  BaseRouter<double> router({.d_model = 3, .experts = 4});  // weight 0
  const auto x = test::random_matrix<double>(8, 3, 4);
  Routing<double> tr, ev;
  router.forward(x.matrix(), tr, Mode::train);
  router.forward(x.matrix(), ev, Mode::eval);
  for (index_t t = 0; t < 8; ++t) {
    CHECK(tr.experts[t] == t / 2);
    CHECK(ev.experts[t] == 0);
    CHECK(tr.gates[t] == 0.5);
  }
}

TEST_CASE("BaseRouter keeps ids in range for NaN and Inf inputs", "[base][nan]") {
  const index_t d = 4, E = 3, tokens = 9;
  BaseRouter<float> router({.d_model = d, .experts = E});
  test::randomize(router.weight().value, 3);
  auto x = test::random_matrix<float>(tokens, d, 4);
  x[1 * d + 2] = float(kNaN);
  x[4 * d + 0] = float(kInf);
  x[6 * d + 3] = float(-kInf);
  for (Mode mode : {Mode::eval, Mode::train}) {
    Routing<float> r;
    router.forward(x.matrix(), r, mode);
    const auto n = loads(std::span<const std::int32_t>(r.experts.data(), std::size_t(tokens)), E);
    if (mode == Mode::train)
      for (index_t c : n) CHECK(c == 3);
  }
}

TEST_CASE("BaseRouter backward matches finite differences", "[base][grad]") {
  const index_t tokens = GENERATE(8, 7, 1, 2);
  const Mode mode = GENERATE(Mode::eval, Mode::train);
  BaseRouter<double> router({.d_model = 5, .experts = 4});
  test::randomize(router.weight().value, 3, 0.7);
  INFO("T = " << tokens);
  check_router_gradients(router, tokens, mode);
}

TEST_CASE("MoE with BaseRouter: gradients of the whole layer match finite differences", "[base][grad][moe]") {
  const index_t d = 6, E = 4, G = 3, tokens = 8;
  const Mode mode = GENERATE(Mode::train, Mode::eval);
  SECTION("relu experts, Switch loss") {
    MoE layer(BaseRouter<double>({.d_model = d, .experts = E}), ReluExperts<double>({d, E, G, true}),
              WeightedSum<double>{}, SwitchBalanceLoss<double>(0.3));
    randomize_parameters(layer, 0.6);
    check_layer_gradients(layer, tokens, mode);
  }
  SECTION("gelu experts, entropy loss") {
    MoE layer(BaseRouter<double>({.d_model = d, .experts = E}), GeluExperts<double>({d, E, G, false}),
              WeightedSum<double>{}, EntropyLoss<double>(0.5));
    randomize_parameters(layer, 0.6);
    check_layer_gradients(layer, tokens, mode);
  }
}

TEST_CASE("MoE with BaseRouter in training gives every expert exactly T/E tokens", "[base][moe]") {
  const index_t d = 8, E = 4, tokens = 32;
  MoE layer(BaseRouter<float>({.d_model = d, .experts = E}), ReluExperts<float>({d, E, 5}));
  randomize_parameters(layer, 0.5);
  const auto x = test::random_matrix<float>(tokens, d, 9);
  Tensor<float> y({tokens, d});
  const auto out = layer.forward(x.matrix(), y.matrix(), Mode::train);
  for (index_t c : out.stats.tokens_per_expert) CHECK(c == tokens / E);
  layer.capacity.capacity_factor = 1.0;  // BASE balances by itself: a capacity on top is refused
  REQUIRE_THROWS_WITH(layer.forward(x.matrix(), y.matrix(), Mode::train),
                      Catch::Contains("BaseRouter sets its own capacity"));
}

TEST_CASE("BaseRouter rejects bad input", "[base][errors]") {
  using R = BaseRouter<double>;
  REQUIRE_THROWS_WITH(R({.d_model = 0, .experts = 3}), Catch::Contains("BaseRouter: d_model must be >= 1, got 0"));
  REQUIRE_THROWS_WITH(R({.d_model = 4, .experts = 0}), Catch::Contains("BaseRouter: experts must be >= 1, got 0"));
  R router({.d_model = 4, .experts = 3});
  CHECK(router.k() == 1);
  Tensor<double> x({5, 4}), wrong({5, 2});
  x.zero();
  Routing<double> r;
  REQUIRE_THROWS_WITH(router.forward(wrong.matrix(), r, Mode::train), Catch::Contains("BaseRouter: x must be [5, 4], got [5, 2]"));
  router.forward(x.matrix(), r, Mode::train);
  Tensor<double> dg({5, 1}), dl({5, 3}), dx({5, 4}), dx_wrong({4, 4});
  REQUIRE_THROWS_WITH(router.backward(x.matrix(), r, dg.matrix(), dl.matrix(), dx_wrong.matrix()),
                      Catch::Contains("BaseRouter: dx must be [5, 4], got [4, 4]"));
}
