// Expert-choice routing, DeepSeek-V3 group-limited top-k and the aux-loss-free selection bias:
// forward against naive double-precision references written from the formulas (plain loops),
// backward against central finite differences (router alone and whole MoE layers), tie rules,
// edge cases and bad input.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include <smoe/smoe.hpp>
#include <smoe/routing/expert_choice.hpp>
#include <smoe/routing/group_topk.hpp>
#include <smoe/routing/selection_bias.hpp>

#include "catch.hpp"
#include "helpers.hpp"

using namespace smoe;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ----- naive references (double, plain loops) -----

std::vector<double> gaussian(index_t n, std::uint64_t seed, double std = 1.0) {
  std::vector<double> v(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = std * standard_normal(seed, std::uint64_t(i), 9);
  return v;
}

// The values a T-typed tensor holds, as double (the reference's inputs).
template <class T>
std::vector<double> as_double(const std::vector<double>& v) {
  std::vector<double> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = double(T(v[i]));
  return out;
}

template <class T>
Tensor<T> to_tensor(const std::vector<double>& v, index_t rows, index_t cols) {
  Tensor<T> t({rows, cols});
  for (index_t i = 0; i < t.size(); ++i) t[i] = T(v[static_cast<std::size_t>(i)]);
  return t;
}

template <class R>
void set_weight(R& r, const std::vector<double>& w) {
  auto& p = r.weight().value;
  REQUIRE(p.size() == static_cast<index_t>(w.size()));
  for (index_t i = 0; i < p.size(); ++i) p[i] = typename R::scalar_type(w[static_cast<std::size_t>(i)]);
}

// s [T, E] = x [T, d] · Wᵀ.
std::vector<double> ref_logits(const std::vector<double>& x, const std::vector<double>& w, index_t T, index_t d,
                               index_t E) {
  std::vector<double> s(static_cast<std::size_t>(T * E), 0.0);
  for (index_t t = 0; t < T; ++t)
    for (index_t e = 0; e < E; ++e)
      for (index_t i = 0; i < d; ++i) s[t * E + e] += x[t * d + i] * w[e * d + i];
  return s;
}

double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

// Indices 0..n-1 ordered by descending score; equal scores keep index order (stable sort).
std::vector<int> descending(const std::vector<double>& score) {
  std::vector<int> idx(score.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return score[a] > score[b]; });
  return idx;
}

struct RefRouting {
  std::vector<int> ids;        // [T, K], -1 empty
  std::vector<double> gates;   // [T, K]
};

// Expert choice: S = softmax rows; expert e takes the C tokens with the largest S[:, e] (ties to
// the smaller token); row t lists the experts that took t in increasing id, padded with -1.
RefRouting ref_expert_choice(const std::vector<double>& s, index_t T, index_t E, double cf) {
  std::vector<double> S(s.size());
  for (index_t t = 0; t < T; ++t) {
    double z = 0;
    for (index_t e = 0; e < E; ++e) z += std::exp(s[t * E + e]);
    for (index_t e = 0; e < E; ++e) S[t * E + e] = std::exp(s[t * E + e]) / z;
  }
  index_t C = static_cast<index_t>(std::floor(double(T) * cf / double(E)));
  C = std::min(T, std::max<index_t>(1, C));
  if (T == 0) C = 0;
  std::vector<std::vector<bool>> took(static_cast<std::size_t>(E), std::vector<bool>(static_cast<std::size_t>(T), false));
  for (index_t e = 0; e < E; ++e) {
    std::vector<double> column(static_cast<std::size_t>(T));
    for (index_t t = 0; t < T; ++t) column[t] = S[t * E + e];
    const auto order = descending(column);
    for (index_t j = 0; j < C; ++j) took[e][order[j]] = true;
  }
  RefRouting r{std::vector<int>(static_cast<std::size_t>(T * E), -1), std::vector<double>(static_cast<std::size_t>(T * E), 0.0)};
  for (index_t t = 0; t < T; ++t) {
    index_t j = 0;
    for (index_t e = 0; e < E; ++e)
      if (took[e][t]) {
        r.ids[t * E + j] = int(e);
        r.gates[t * E + j] = S[t * E + e];
        ++j;
      }
  }
  return r;
}

// Group-limited top-k: q = sigmoid(s) + b; group score = sum of the group's two largest q (one
// expert: its q); best topk_groups groups (ties to the smaller group); top-k of q among their
// experts (ties to the smaller id); gate = scale · sigmoid(s) / Σ over the selected.
RefRouting ref_group_topk(const std::vector<double>& s, const std::vector<double>& b, index_t T, index_t E,
                          index_t K, index_t groups, index_t keep, double scale) {
  const index_t size = E / groups;
  RefRouting r;
  for (index_t t = 0; t < T; ++t) {
    std::vector<double> q(static_cast<std::size_t>(E));
    for (index_t e = 0; e < E; ++e) q[e] = sigmoid(s[t * E + e]) + b[e];
    std::vector<double> gscore(static_cast<std::size_t>(groups));
    for (index_t g = 0; g < groups; ++g) {
      std::vector<double> members(q.begin() + g * size, q.begin() + (g + 1) * size);
      std::sort(members.begin(), members.end(), std::greater<double>());
      gscore[g] = size == 1 ? members[0] : members[0] + members[1];
    }
    const auto gorder = descending(gscore);
    std::vector<bool> allowed(static_cast<std::size_t>(E), false);
    for (index_t j = 0; j < keep; ++j)
      for (index_t i = 0; i < size; ++i) allowed[gorder[j] * size + i] = true;
    std::vector<int> candidates;
    for (index_t e = 0; e < E; ++e)
      if (allowed[e]) candidates.push_back(int(e));
    std::stable_sort(candidates.begin(), candidates.end(), [&](int a, int c) { return q[a] > q[c]; });
    double z = 0;
    for (index_t j = 0; j < K; ++j) z += sigmoid(s[t * E + candidates[j]]);
    for (index_t j = 0; j < K; ++j) {
      r.ids.push_back(candidates[j]);
      r.gates.push_back(scale * sigmoid(s[t * E + candidates[j]]) / z);
    }
  }
  return r;
}

void require_ids(const Tensor<std::int32_t>& got, const std::vector<int>& expected) {
  REQUIRE(got.size() == static_cast<index_t>(expected.size()));
  for (index_t i = 0; i < got.size(); ++i) {
    INFO("assignment " << i);
    REQUIRE(got[i] == expected[i]);
  }
}

// ----- gradient helpers -----

template <HasParameters C>
void randomize_parameters(C& c, double std, std::uint64_t seed = 100) {
  c.for_each_parameter([&](std::string_view, auto& p) { test::randomize(p.value, seed++, std); });
}

// Σ gates ⊙ dg + Σ logits ⊙ dl: exercises both gradient paths of a router on its own.
template <class R>
double router_objective(R& router, const Tensor<double>& x, const Tensor<double>& dg, const Tensor<double>& dl) {
  Routing<double> r;
  router.forward(x.matrix(), r, Mode::train);
  double s = 0;
  for (index_t i = 0; i < r.gates.size(); ++i) s += r.gates[i] * dg[i];
  for (index_t i = 0; i < r.logits.size(); ++i) s += r.logits[i] * dl[i];
  return s;
}

template <class R>
void check_router_gradients(R& router, index_t tokens) {
  const index_t d = router.d_model(), E = router.experts(), K = router.k();
  auto x = test::random_matrix<double>(tokens, d, 41);
  const auto dg = test::random_matrix<double>(tokens, K, 42);
  const auto dl = test::random_matrix<double>(tokens, E, 43);
  Routing<double> r;
  router.forward(x.matrix(), r, Mode::train);
  Tensor<double> d_logits = dl, dx({tokens, d});
  dx.zero();
  zero_grad(router);
  router.backward(x.matrix(), r, dg.matrix(), d_logits.matrix(), dx.matrix());
  auto objective = [&] { return router_objective(router, x, dg, dl); };
  const auto res = check_parameter_gradients(router, objective, 1e-6, 2000);
  INFO("worst parameter " << res.worst_parameter << "[" << res.worst_index << "], error " << res.worst_error);
  CHECK(res.worst_error < 1e-7);
  test::require_input_gradient(x, dx, objective);
}

// Σ y ⊙ dy + aux: the objective whose gradient MoE::backward(dy) returns.
template <class Layer>
double objective(Layer& layer, const Tensor<double>& x, const Tensor<double>& dy) {
  Tensor<double> y({x.dim(0), x.dim(1)});
  const auto out = layer.forward(x.matrix(), y.matrix());
  double s = double(out.aux_loss);
  for (index_t i = 0; i < y.size(); ++i) s += y[i] * dy[i];
  return s;
}

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

}  // namespace

TEST_CASE("the expert-choice and group top-k routers satisfy the Router concept", "[routing][ec][group]") {
  STATIC_REQUIRE(Router<ExpertChoiceRouter<float>>);
  STATIC_REQUIRE(Router<ExpertChoiceRouter<double>>);
  STATIC_REQUIRE(Router<GroupTopKRouter<float>>);
  STATIC_REQUIRE(Router<GroupTopKRouter<double>>);
  STATIC_REQUIRE(HasParameters<ExpertChoiceRouter<float>>);
  STATIC_REQUIRE(HasParameters<GroupTopKRouter<float>>);
  STATIC_REQUIRE(!ExpertChoiceRouter<float>::token_choice);
  STATIC_REQUIRE(!HasRouterLoss<ExpertChoiceRouter<float>>);
  STATIC_REQUIRE(!HasRouterLoss<GroupTopKRouter<float>>);
}

// ===================================== expert choice =====================================

TEMPLATE_TEST_CASE("expert choice matches the naive reference", "[routing][ec]", float, double) {
  using T = TestType;
  struct Case {
    index_t tokens, E, d;
    double cf;
  };
  const Case c = GENERATE(Case{13, 4, 5, 2.0}, Case{16, 8, 6, 1.0}, Case{3, 8, 4, 2.0} /* T < E: C = 1 */,
                          Case{1, 4, 3, 2.0} /* T = 1 */, Case{10, 3, 4, 0.3} /* C = max(1, 1) */,
                          Case{7, 4, 3, 4.0} /* cf = E: C = T */, Case{5, 2, 3, 100.0} /* clipped to T */,
                          Case{40, 6, 8, 1.5}, Case{64, 4, 5, 0.5} /* C = 8 */, Case{70, 2, 3, 1.0} /* C = 35 > 16 */);
  INFO("T=" << c.tokens << " E=" << c.E << " d=" << c.d << " cf=" << c.cf);
  const auto x = as_double<T>(gaussian(c.tokens * c.d, 1));
  const auto w = as_double<T>(gaussian(c.E * c.d, 2, 0.7));
  ExpertChoiceRouter<T> router({.d_model = c.d, .experts = c.E, .capacity_factor = c.cf});
  set_weight(router, w);
  REQUIRE(router.k() == c.E);
  const auto xt = to_tensor<T>(x, c.tokens, c.d);
  Routing<T> r;
  router.forward(xt.matrix(), r, Mode::eval);
  REQUIRE(r.experts.shape() == std::vector<index_t>{c.tokens, c.E});
  REQUIRE(r.gates.shape() == std::vector<index_t>{c.tokens, c.E});
  const auto s = ref_logits(x, w, c.tokens, c.d, c.E);
  test::require_close(r.logits, s, test::tolerance<T>(), test::tolerance<T>(), "logits");
  const auto ref = ref_expert_choice(s, c.tokens, c.E, c.cf);
  require_ids(r.experts, ref.ids);
  test::require_close(r.gates, ref.gates, test::tolerance<T>(), 1e-30, "gates");
  // Every expert takes exactly C tokens.
  const index_t C = router.capacity(c.tokens);
  std::vector<index_t> count(static_cast<std::size_t>(c.E), 0);
  for (index_t i = 0; i < r.experts.size(); ++i)
    if (r.experts[i] >= 0) ++count[r.experts[i]];
  for (index_t e = 0; e < c.E; ++e) CHECK(count[e] == C);
}

TEST_CASE("expert choice capacity: C = min(T, max(1, floor(T·c/E)))", "[routing][ec]") {
  auto cap = [](index_t tokens, index_t E, double cf) {
    return ExpertChoiceRouterConfig{.d_model = 1, .experts = E, .capacity_factor = cf}.capacity(tokens);
  };
  CHECK(cap(10, 4, 2.0) == 5);
  CHECK(cap(11, 4, 2.0) == 5);  // floor(5.5)
  CHECK(cap(3, 8, 2.0) == 1);   // floor(0.75) = 0, at least 1
  CHECK(cap(1, 4, 2.0) == 1);
  CHECK(cap(7, 4, 4.0) == 7);   // c = E: every expert takes every token
  CHECK(cap(7, 4, 5.0) == 7);   // never more than T
  CHECK(cap(7, 4, 1e300) == 7);
  CHECK(cap(0, 4, 2.0) == 0);
  CHECK(cap(64, 8, 1.0) == 8);
}

TEST_CASE("expert choice edge cases", "[routing][ec]") {
  const index_t d = 3, E = 4;
  SECTION("T = 0") {
    ExpertChoiceRouter<double> router({.d_model = d, .experts = E});
    randomize_parameters(router, 1.0);
    Tensor<double> x({0, d}), dx({0, d}), dg({0, E}), dl({0, E});
    Routing<double> r;
    router.forward(x.matrix(), r, Mode::train);
    CHECK(r.tokens() == 0);
    CHECK(r.k() == E);
    CHECK(r.logits.shape() == std::vector<index_t>{0, E});
    zero_grad(router);
    router.backward(x.matrix(), r, dg.matrix(), dl.matrix(), dx.matrix());
    for (index_t i = 0; i < router.weight().grad.size(); ++i) CHECK(router.weight().grad[i] == 0.0);
  }
  SECTION("T = 1: every expert takes the single token") {
    ExpertChoiceRouter<double> router({.d_model = d, .experts = E, .capacity_factor = 0.1});
    randomize_parameters(router, 1.0);
    const auto x = test::random_matrix<double>(1, d, 5);
    Routing<double> r;
    router.forward(x.matrix(), r, Mode::eval);
    double sum = 0;
    for (index_t e = 0; e < E; ++e) {
      CHECK(r.experts[e] == e);
      sum += r.gates[e];
    }
    CHECK(sum == Approx(1.0).epsilon(1e-14));  // the gates are the whole softmax
  }
  SECTION("all-equal scores: ties go to the smaller token index") {
    const index_t tokens = 6;
    ExpertChoiceRouter<double> router({.d_model = d, .experts = E, .capacity_factor = 1.0});  // W = 0, C = 1
    const auto x = test::random_matrix<double>(tokens, d, 6);
    Routing<double> r;
    router.forward(x.matrix(), r, Mode::eval);
    // Every expert picks token 0, with gate 1/E; the other tokens get no expert.
    for (index_t e = 0; e < E; ++e) {
      CHECK(r.experts[e] == e);
      CHECK(r.gates[e] == Approx(0.25).epsilon(1e-15));
    }
    for (index_t i = E; i < tokens * E; ++i) {
      CHECK(r.experts[i] == -1);
      CHECK(r.gates[i] == 0.0);
    }
  }
  SECTION("duplicated tokens tie exactly: the smaller index wins") {
    const index_t tokens = 5, E2 = 3;
    ExpertChoiceRouter<double> router({.d_model = d, .experts = E2, .capacity_factor = 1.25});  // C = floor(2.08) = 2
    randomize_parameters(router, 1.0);
    auto x = test::random_matrix<double>(tokens, d, 7);
    for (index_t i = 0; i < d; ++i) x[3 * d + i] = x[1 * d + i];  // token 3 = token 1: equal scores
    Routing<double> r;
    router.forward(x.matrix(), r, Mode::eval);
    // An expert may take token 3 only together with token 1, never instead of it.
    auto has = [&](index_t t, index_t e) {
      for (index_t j = 0; j < E2; ++j)
        if (r.experts[t * E2 + j] == e) return true;
      return false;
    };
    for (index_t e = 0; e < E2; ++e)
      if (has(3, e)) CHECK(has(1, e));
    const auto& W = router.weight().value;
    const auto ref = ref_expert_choice(
        ref_logits({x.data(), x.data() + x.size()}, {W.data(), W.data() + W.size()}, tokens, d, E2), tokens, E2, 1.25);
    require_ids(r.experts, ref.ids);
  }
  SECTION("NaN tokens are never chosen before finite ones, ids stay in range") {
    const index_t tokens = 8;
    ExpertChoiceRouter<double> router({.d_model = d, .experts = E, .capacity_factor = 2.0});  // C = 4
    randomize_parameters(router, 1.0);
    auto x = test::random_matrix<double>(tokens, d, 8);
    x[1 * d + 0] = kNaN;
    x[4 * d + 2] = kNaN;
    x[6 * d + 1] = std::numeric_limits<double>::infinity();
    Routing<double> r;
    router.forward(x.matrix(), r, Mode::eval);
    for (index_t i = 0; i < r.experts.size(); ++i) REQUIRE((r.experts[i] >= -1 && r.experts[i] < E));
    for (index_t t : {1, 4, 6})
      for (index_t j = 0; j < E; ++j) CHECK(r.experts[t * E + j] == -1);  // 5 finite tokens, C = 4
  }
}

TEST_CASE("expert choice gradients match finite differences (router alone)", "[routing][ec][grad]") {
  const double cf = GENERATE(2.0, 1.0, 4.0);
  const index_t tokens = GENERATE(1, 9);
  INFO("cf=" << cf << " T=" << tokens);
  ExpertChoiceRouter<double> router({.d_model = 5, .experts = 4, .capacity_factor = cf});
  randomize_parameters(router, 0.8);
  check_router_gradients(router, tokens);
}

TEST_CASE("MoE with expert choice: gradients of the whole layer match finite differences", "[moe][ec][grad]") {
  const index_t d = 6, E = 4, G = 4, tokens = 9;
  auto check = [&](auto experts, auto... losses) {
    MoE layer(ExpertChoiceRouter<double>({.d_model = d, .experts = E, .capacity_factor = 1.5}), std::move(experts),
              WeightedSum<double>{}, losses...);
    randomize_parameters(layer, 0.6);
    check_layer_gradients(layer, tokens);
  };
  SECTION("relu, no loss") { check(ReluExperts<double>({d, E, G, true})); }
  SECTION("relu, entropy") { check(ReluExperts<double>({d, E, G, true}), EntropyLoss<double>(0.5)); }
  SECTION("relu, switch") { check(ReluExperts<double>({d, E, G, true}), SwitchBalanceLoss<double>(0.3)); }
  SECTION("gelu, entropy") { check(GeluExperts<double>({d, E, G, false}), EntropyLoss<double>(0.5)); }
  SECTION("gelu, switch") { check(GeluExperts<double>({d, E, G, false}), SwitchBalanceLoss<double>(0.3)); }
  SECTION("gelu, T = 1") {
    MoE layer(ExpertChoiceRouter<double>({.d_model = d, .experts = E}), GeluExperts<double>({d, E, G, true}),
              WeightedSum<double>{}, EntropyLoss<double>(0.5));
    randomize_parameters(layer, 0.6);
    check_layer_gradients(layer, 1);
  }
}

TEST_CASE("MoE with expert choice: output and stats match the reference routing", "[moe][ec]") {
  const index_t d = 5, E = 4, G = 3, tokens = 10;
  MoE layer(ExpertChoiceRouter<double>({.d_model = d, .experts = E, .capacity_factor = 1.0}),  // C = 2
            ReluExperts<double>({d, E, G, false}));
  randomize_parameters(layer, 0.7);
  const auto x = test::random_matrix<double>(tokens, d, 9);
  Tensor<double> y({tokens, d});
  const auto out = layer.forward(x.matrix(), y.matrix());
  const std::vector<double> xv(x.data(), x.data() + x.size());
  const auto& W = layer.router().weight().value;
  const auto ref = ref_expert_choice(ref_logits(xv, {W.data(), W.data() + W.size()}, tokens, d, E), tokens, E, 1.0);
  index_t without = 0;
  for (index_t t = 0; t < tokens; ++t) without += ref.ids[t * E] < 0 ? 1 : 0;
  CHECK(out.stats.tokens_without_expert == without);
  CHECK(without >= tokens - 2 * E);  // at most C·E = 8 tokens are routed
  for (index_t e = 0; e < E; ++e) CHECK(out.stats.tokens_per_expert[e] == 2);
  CHECK(out.stats.dropped == 0);
  // y[t] = Σ gate · relu(x W1[e]) W2[e], written out.
  const auto& w1 = layer.experts().w1().value;  // [E, d, G]
  const auto& w2 = layer.experts().w2().value;  // [E, G, d]
  std::vector<double> y_ref(static_cast<std::size_t>(tokens * d), 0.0);
  for (index_t t = 0; t < tokens; ++t)
    for (index_t j = 0; j < E; ++j) {
      const int e = ref.ids[t * E + j];
      if (e < 0) continue;
      for (index_t g = 0; g < G; ++g) {
        double h = 0;
        for (index_t i = 0; i < d; ++i) h += x[t * d + i] * w1[(e * d + i) * G + g];
        h = std::max(h, 0.0);
        for (index_t c = 0; c < d; ++c) y_ref[t * d + c] += ref.gates[t * E + j] * h * w2[(e * G + g) * d + c];
      }
    }
  test::require_close(y, y_ref, 1e-12, 1e-12, "y");
}

// ===================================== group top-k =====================================

TEMPLATE_TEST_CASE("group-limited top-k matches the naive reference", "[routing][group]", float, double) {
  using T = TestType;
  struct Case {
    index_t E, k, groups, keep;
    double scale;
  };
  const Case c = GENERATE(Case{8, 2, 4, 2, 1.0}, Case{8, 3, 4, 2, 2.5}, Case{12, 4, 3, 1, 1.0},
                          Case{6, 2, 6, 3, 1.5} /* one expert per group */, Case{6, 6, 1, 1, 1.0} /* K = E */,
                          Case{5, 2, 1, 1, 1.0} /* plain sigmoid top-k */, Case{16, 4, 4, 3, 2.5},
                          Case{8, 4, 2, 1, 1.0} /* k = the kept experts */, Case{40, 20, 4, 2, 1.0} /* k > 16 */,
                          Case{8, 2, 4, 4, 1.0} /* all groups kept */);
  const bool with_bias = GENERATE(false, true);
  const index_t tokens = 11, d = 5;
  INFO("E=" << c.E << " k=" << c.k << " groups=" << c.groups << " keep=" << c.keep << " scale=" << c.scale
            << " bias=" << with_bias);
  const auto x = as_double<T>(gaussian(tokens * d, 3));
  const auto w = as_double<T>(gaussian(c.E * d, 4, 0.8));
  const auto b = with_bias ? as_double<T>(gaussian(c.E, 5, 0.3)) : std::vector<double>(std::size_t(c.E), 0.0);
  GroupTopKRouter<T> router(
      {.d_model = d, .experts = c.E, .k = c.k, .n_groups = c.groups, .topk_groups = c.keep, .route_scale = c.scale});
  set_weight(router, w);
  for (index_t e = 0; e < c.E; ++e) router.bias().values[e] = T(b[e]);
  const auto xt = to_tensor<T>(x, tokens, d);
  Routing<T> r;
  router.forward(xt.matrix(), r, Mode::eval);
  REQUIRE(r.experts.shape() == std::vector<index_t>{tokens, c.k});
  const auto s = ref_logits(x, w, tokens, d, c.E);
  test::require_close(r.logits, s, test::tolerance<T>(), test::tolerance<T>(), "logits");
  const auto ref = ref_group_topk(s, b, tokens, c.E, c.k, c.groups, c.keep, c.scale);
  require_ids(r.experts, ref.ids);
  test::require_close(r.gates, ref.gates, 2 * test::tolerance<T>(), 1e-30, "gates");
  // load(): selections per expert of this forward.
  std::vector<index_t> count(static_cast<std::size_t>(c.E), 0);
  for (int e : ref.ids) ++count[e];
  REQUIRE(router.load().size() == std::size_t(c.E));
  for (index_t e = 0; e < c.E; ++e) CHECK(router.load()[e] == count[e]);
}

TEST_CASE("group top-k: the selection bias changes the selection, never the gate formula", "[routing][group]") {
  // d = 1, x = 1: the logits are the weight column, s = (2, 1, 0, -1).
  const std::vector<double> s{2.0, 1.0, 0.0, -1.0};
  Tensor<double> x({1, 1});
  x[0] = 1.0;
  auto run = [&](GroupTopKRouterConfig c, std::vector<double> bias) {
    GroupTopKRouter<double> router(c);
    set_weight(router, s);
    for (index_t e = 0; e < 4; ++e) router.bias().values[e] = bias[e];
    Routing<double> r;
    router.forward(x.matrix(), r, Mode::eval);
    return r;
  };
  const double s2 = sigmoid(2), s1 = sigmoid(1), s0 = sigmoid(0), sm1 = sigmoid(-1);
  SECTION("one group") {
    const GroupTopKRouterConfig c{.d_model = 1, .experts = 4, .k = 2};
    auto r = run(c, {0, 0, 0, 0});
    require_ids(r.experts, {0, 1});
    CHECK(r.gates[0] == Approx(s2 / (s2 + s1)).epsilon(1e-14));
    CHECK(r.gates[1] == Approx(s1 / (s2 + s1)).epsilon(1e-14));
    // Bias 1 on expert 2: q_2 = 0.5 + 1 beats q_0 = 0.88; its gate is still sigmoid(0) normalized.
    r = run(c, {0, 0, 1, 0});
    require_ids(r.experts, {2, 0});
    CHECK(r.gates[0] == Approx(s0 / (s0 + s2)).epsilon(1e-14));
    CHECK(r.gates[1] == Approx(s2 / (s0 + s2)).epsilon(1e-14));
  }
  SECTION("two groups of two, one kept") {
    const GroupTopKRouterConfig c{.d_model = 1, .experts = 4, .k = 2, .n_groups = 2, .topk_groups = 1,
                                  .route_scale = 2.5};
    auto r = run(c, {0, 0, 0, 0});  // group scores 0.88 + 0.73 > 0.5 + 0.27
    require_ids(r.experts, {0, 1});
    CHECK(r.gates[0] == Approx(2.5 * s2 / (s2 + s1)).epsilon(1e-14));
    // Bias 0.5 on group 1: 1.77 > 1.61, group 1 wins; gates from the unbiased sigmoids.
    r = run(c, {0, 0, 0.5, 0.5});
    require_ids(r.experts, {2, 3});
    CHECK(r.gates[0] == Approx(2.5 * s0 / (s0 + sm1)).epsilon(1e-14));
    CHECK(r.gates[1] == Approx(2.5 * sm1 / (s0 + sm1)).epsilon(1e-14));
    // The group score is the top-2 SUM, not the max: expert 2 alone is best (0.5 + 1.2 = 1.7 > 0.88),
    // but group 0's sum 1.61 beats group 1's 1.7 + (0.27 - 0.5) = 1.47.
    r = run(c, {0, 0, 1.2, -0.5});
    require_ids(r.experts, {0, 1});
  }
  SECTION("a bias so large the biased expert is always chosen") {
    const GroupTopKRouterConfig c{.d_model = 1, .experts = 4, .k = 1};
    const auto r = run(c, {0, 0, 0, 10});
    require_ids(r.experts, {3});
    CHECK(r.gates[0] == Approx(1.0).epsilon(1e-15));  // K = 1: the normalized gate is 1 whatever the bias
  }
}

TEST_CASE("group top-k edge cases", "[routing][group]") {
  const index_t d = 3;
  SECTION("all-equal scores: ties to the smaller group, then the smaller expert") {
    GroupTopKRouter<double> router({.d_model = d, .experts = 8, .k = 3, .n_groups = 4, .topk_groups = 2,
                                    .route_scale = 1.5});  // W = 0
    const auto x = test::random_matrix<double>(5, d, 10);
    Routing<double> r;
    router.forward(x.matrix(), r, Mode::eval);
    for (index_t t = 0; t < 5; ++t) {
      CHECK(r.experts[t * 3 + 0] == 0);
      CHECK(r.experts[t * 3 + 1] == 1);
      CHECK(r.experts[t * 3 + 2] == 2);
      for (index_t j = 0; j < 3; ++j) CHECK(r.gates[t * 3 + j] == Approx(0.5).epsilon(1e-15));
    }
  }
  SECTION("tied group scores go to the smaller group") {
    // Group 0 holds logits (0, 1), group 1 holds (1, 0): the same two sigmoids, an exact tie.
    GroupTopKRouter<double> router({.d_model = 1, .experts = 4, .k = 1, .n_groups = 2, .topk_groups = 1});
    const double logit[4] = {0.0, 1.0, 1.0, 0.0};
    for (index_t e = 0; e < 4; ++e) router.weight().value[e] = logit[e];
    Tensor<double> x({1, 1});
    x[0] = 1.0;
    Routing<double> r;
    router.forward(x.matrix(), r, Mode::eval);
    require_ids(r.experts, {1});  // group 0 kept; expert 2 (same score) is in the dropped group
    // With both groups kept, the tie between experts 1 and 2 goes to the smaller id.
    GroupTopKRouter<double> both({.d_model = 1, .experts = 4, .k = 1, .n_groups = 2, .topk_groups = 2});
    both.weight().value = router.weight().value;
    both.forward(x.matrix(), r, Mode::eval);
    require_ids(r.experts, {1});
  }
  SECTION("T = 0") {
    GroupTopKRouter<double> router({.d_model = d, .experts = 4, .k = 2, .n_groups = 2, .topk_groups = 1});
    randomize_parameters(router, 1.0);
    Tensor<double> x({0, d}), dx({0, d}), dg({0, 2}), dl({0, 4});
    Routing<double> r;
    router.forward(x.matrix(), r, Mode::train);
    CHECK(r.tokens() == 0);
    CHECK(r.k() == 2);
    for (index_t e = 0; e < 4; ++e) CHECK(router.load()[e] == 0);
    router.backward(x.matrix(), r, dg.matrix(), dl.matrix(), dx.matrix());
  }
  SECTION("T = 1, K = E, n_groups = 1: gates are the normalized sigmoids of every expert") {
    GroupTopKRouter<double> router({.d_model = d, .experts = 5, .k = 5});
    randomize_parameters(router, 1.0);
    const auto x = test::random_matrix<double>(1, d, 11);
    Routing<double> r;
    router.forward(x.matrix(), r, Mode::eval);
    double sum = 0;
    for (index_t j = 0; j < 5; ++j) sum += r.gates[j];
    CHECK(sum == Approx(1.0).epsilon(1e-14));
    std::set<int> seen(r.experts.data(), r.experts.data() + 5);
    CHECK(seen.size() == 5);
  }
  SECTION("n_groups = 1 selects what sigmoid top-k selects") {
    const index_t E = 7, K = 3, tokens = 20;
    GroupTopKRouter<double> group({.d_model = d, .experts = E, .k = K});
    SigmoidTopK<double> plain({.d_model = d, .experts = E, .k = K});
    randomize_parameters(group, 1.0);
    plain.weight().value = group.weight().value;
    const auto x = test::random_matrix<double>(tokens, d, 12);
    Routing<double> a, b;
    group.forward(x.matrix(), a, Mode::eval);
    plain.forward(x.matrix(), b, Mode::eval);
    for (index_t i = 0; i < a.experts.size(); ++i) REQUIRE(a.experts[i] == b.experts[i]);
    for (index_t t = 0; t < tokens; ++t) {
      double z = 0;
      for (index_t j = 0; j < K; ++j) z += b.gates[t * K + j];
      for (index_t j = 0; j < K; ++j) CHECK(a.gates[t * K + j] == Approx(b.gates[t * K + j] / z).epsilon(1e-14));
    }
  }
  SECTION("very negative logits: the gates still sum to route_scale (no 0/0)") {
    GroupTopKRouter<float> router({.d_model = 1, .experts = 4, .k = 2, .route_scale = 2.0});
    const float logit[4] = {-200.f, -201.f, -300.f, -400.f};  // sigmoid underflows to 0 in float
    for (index_t e = 0; e < 4; ++e) router.weight().value[e] = logit[e];
    Tensor<float> x({1, 1});
    x[0] = 1.f;
    Routing<float> r;
    router.forward(x.matrix(), r, Mode::eval);
    require_ids(r.experts, {0, 1});
    const double e1 = std::exp(-1.0);  // σ(-200)/σ(-201) = e (to 1e-87)
    CHECK(r.gates[0] == Approx(2.0 / (1 + e1)).epsilon(1e-6));
    CHECK(r.gates[1] == Approx(2.0 * e1 / (1 + e1)).epsilon(1e-6));
  }
  SECTION("NaN/Inf inputs never produce invalid or repeated ids") {
    const index_t E = 8, K = 3, tokens = 6;
    GroupTopKRouter<double> router({.d_model = d, .experts = E, .k = K, .n_groups = 4, .topk_groups = 2});
    randomize_parameters(router, 1.0);
    auto x = test::random_matrix<double>(tokens, d, 13);
    x[0 * d + 1] = kNaN;
    x[2 * d + 0] = std::numeric_limits<double>::infinity();
    x[3 * d + 2] = -std::numeric_limits<double>::infinity();
    router.weight().value[5 * d + 1] = kNaN;  // expert 5: NaN for every token
    Routing<double> r;
    router.forward(x.matrix(), r, Mode::eval);
    for (index_t t = 0; t < tokens; ++t) {
      std::set<int> seen;
      for (index_t j = 0; j < K; ++j) {
        const int e = r.experts[t * K + j];
        REQUIRE((e >= 0 && e < E));
        REQUIRE(seen.insert(e).second);
        if (t != 0) CHECK(e != 5);  // NaN ranks below every number
      }
    }
  }
}

TEST_CASE("group top-k gradients match finite differences (router alone)", "[routing][group][grad]") {
  struct Case {
    index_t E, k, groups, keep;
    double scale;
  };
  const Case c = GENERATE(Case{8, 2, 4, 2, 2.5}, Case{6, 3, 1, 1, 1.0}, Case{6, 6, 1, 1, 1.0}, Case{6, 2, 6, 3, 1.0});
  const index_t tokens = GENERATE(1, 9);
  INFO("E=" << c.E << " k=" << c.k << " groups=" << c.groups << " keep=" << c.keep << " T=" << tokens);
  GroupTopKRouter<double> router(
      {.d_model = 5, .experts = c.E, .k = c.k, .n_groups = c.groups, .topk_groups = c.keep, .route_scale = c.scale});
  randomize_parameters(router, 0.8);
  test::randomize(router.bias().values, 77, 0.3);
  const Tensor<double> bias_before = router.bias().values;
  check_router_gradients(router, tokens);
  for (index_t e = 0; e < c.E; ++e) CHECK(router.bias().values[e] == bias_before[e]);  // no gradient step touches it
}

TEST_CASE("MoE with group top-k: gradients of the whole layer match finite differences", "[moe][group][grad]") {
  const index_t d = 6, E = 6, G = 4, tokens = 7;
  auto check = [&](auto experts, auto... losses) {
    MoE layer(GroupTopKRouter<double>(
                  {.d_model = d, .experts = E, .k = 2, .n_groups = 3, .topk_groups = 2, .route_scale = 2.5}),
              std::move(experts), WeightedSum<double>{}, losses...);
    randomize_parameters(layer, 0.6);
    test::randomize(layer.router().bias().values, 78, 0.2);
    check_layer_gradients(layer, tokens);
  };
  SECTION("relu, no loss") { check(ReluExperts<double>({d, E, G, true})); }
  SECTION("relu, entropy") { check(ReluExperts<double>({d, E, G, true}), EntropyLoss<double>(0.5)); }
  SECTION("relu, switch") { check(ReluExperts<double>({d, E, G, true}), SwitchBalanceLoss<double>(0.3)); }
  SECTION("gelu, entropy") { check(GeluExperts<double>({d, E, G, false}), EntropyLoss<double>(0.5)); }
  SECTION("gelu, switch") { check(GeluExperts<double>({d, E, G, false}), SwitchBalanceLoss<double>(0.3)); }
  SECTION("gelu, T = 1, K = E") {
    MoE layer(GroupTopKRouter<double>({.d_model = d, .experts = E, .k = E}), GeluExperts<double>({d, E, G, true}),
              WeightedSum<double>{}, SwitchBalanceLoss<double>(0.3));
    randomize_parameters(layer, 0.6);
    check_layer_gradients(layer, 1);
  }
  SECTION("with a capacity limit (token-choice: allowed)") {
    MoE layer(GroupTopKRouter<double>({.d_model = d, .experts = E, .k = 2, .n_groups = 3, .topk_groups = 2}),
              ReluExperts<double>({d, E, G, true}), WeightedSum<double>{}, EntropyLoss<double>(0.5));
    layer.capacity.capacity_factor = 1.0;
    randomize_parameters(layer, 0.6);
    check_layer_gradients(layer, tokens);
  }
}

// ===================================== selection bias =====================================

TEST_CASE("selection bias update: b_e += u · sign(mean load − load_e)", "[routing][bias]") {
  SelectionBias<double> b(4);
  for (index_t e = 0; e < 4; ++e) CHECK(b[e] == 0.0);
  b.values[1] = 0.5;
  b.values[2] = -0.25;
  const std::vector<index_t> load{3, 1, 2, 2};  // mean 2: expert 0 over, 1 under, 2 and 3 at the mean
  b.update(load, 0.1);
  CHECK(b[0] == Approx(-0.1).epsilon(1e-15));
  CHECK(b[1] == Approx(0.6).epsilon(1e-15));
  CHECK(b[2] == -0.25);  // sign(0) = 0
  CHECK(b[3] == 0.0);
  const std::vector<index_t> load2{1, 2, 2, 2};  // mean 1.75
  b.update(load2, 0.01);
  CHECK(b[0] == Approx(-0.09).epsilon(1e-14));
  CHECK(b[1] == Approx(0.59).epsilon(1e-14));
  CHECK(b[2] == Approx(-0.26).epsilon(1e-14));
  CHECK(b[3] == Approx(-0.01).epsilon(1e-14));
  b.update(std::vector<index_t>{0, 0, 0, 0}, 0.5);  // nothing routed: every load is the mean
  CHECK(b[3] == Approx(-0.01).epsilon(1e-14));
  b.update(load2, 0.0);  // u = 0: no change
  CHECK(b[1] == Approx(0.59).epsilon(1e-14));
}

TEST_CASE("the selection bias is a buffer, not a trained parameter", "[routing][bias]") {
  GroupTopKRouter<float> router({.d_model = 3, .experts = 4, .k = 2, .n_groups = 2, .topk_groups = 1});
  std::vector<std::string> params, buffers;
  router.for_each_parameter([&](std::string_view name, auto&) { params.emplace_back(name); });
  router.for_each_buffer([&](std::string_view name, auto& t) {
    buffers.emplace_back(name);
    CHECK(t.size() == 4);
  });
  CHECK(params == std::vector<std::string>{"weight"});
  CHECK(buffers == std::vector<std::string>{"bias"});
  MoE layer(std::move(router), ReluExperts<float>({3, 4, 2}));
  index_t n = 0;
  layer.for_each_parameter([&](std::string_view name, auto&) {
    CHECK(name != std::string_view("router.bias"));
    ++n;
  });
  CHECK(n == 3);  // router.weight, experts.w1, experts.w2
}

TEST_CASE("aux-loss-free balancing evens out a skewed router", "[routing][bias]") {
  // Expert 0 and 1 are favored by every token; repeated bias updates move tokens elsewhere.
  const index_t d = 4, E = 8, K = 2, tokens = 128;
  GroupTopKRouter<double> router({.d_model = d, .experts = E, .k = K, .n_groups = 4, .topk_groups = 2});
  randomize_parameters(router, 0.3);
  for (index_t i = 0; i < d; ++i) router.weight().value[0 * d + i] += 1.0, router.weight().value[1 * d + i] += 1.0;
  auto x = test::random_matrix<double>(tokens, d, 14);
  for (index_t t = 0; t < tokens; ++t) x[t * d] = std::abs(x[t * d]) + 1.0;  // positive first feature
  Routing<double> r;
  auto spread = [&] {
    router.forward(x.matrix(), r, Mode::train);
    const auto load = router.load();
    return *std::max_element(load.begin(), load.end()) - *std::min_element(load.begin(), load.end());
  };
  const index_t before = spread();
  for (int step = 0; step < 400; ++step) {
    spread();
    router.bias().update(router.load(), 0.005);
  }
  const index_t after = spread();
  INFO("max - min load: before " << before << ", after " << after);
  CHECK(before >= 60);
  CHECK(after <= 12);
}

// ===================================== bad input =====================================

TEST_CASE("expert choice, group top-k and the selection bias reject bad input", "[routing][errors]") {
  using T = float;
  auto group = [](GroupTopKRouterConfig c) { return GroupTopKRouter<T>(c); };
  REQUIRE_THROWS_WITH(group({.d_model = 4, .experts = 6, .k = 1, .n_groups = 4}),
                      Catch::Contains("n_groups must divide experts = 6 (equal groups), got 4"));
  REQUIRE_THROWS_WITH(group({.d_model = 4, .experts = 6, .k = 1, .n_groups = 0}),
                      Catch::Contains("n_groups must be in [1, experts = 6], got 0"));
  REQUIRE_THROWS_WITH(group({.d_model = 4, .experts = 6, .k = 1, .n_groups = 12}),
                      Catch::Contains("n_groups must be in [1, experts = 6], got 12"));
  REQUIRE_THROWS_WITH(group({.d_model = 4, .experts = 6, .k = 1, .n_groups = 3, .topk_groups = 4}),
                      Catch::Contains("topk_groups must be in [1, n_groups = 3], got 4"));
  REQUIRE_THROWS_WITH(group({.d_model = 4, .experts = 6, .k = 1, .n_groups = 3, .topk_groups = 0}),
                      Catch::Contains("topk_groups must be in [1, n_groups = 3], got 0"));
  REQUIRE_THROWS_WITH(group({.d_model = 4, .experts = 6, .k = 3, .n_groups = 3, .topk_groups = 1}),
                      Catch::Contains("k must be in [1, topk_groups · experts / n_groups = 2], got 3"));
  REQUIRE_THROWS_WITH(group({.d_model = 4, .experts = 6, .k = 7}),
                      Catch::Contains("k must be in [1, topk_groups · experts / n_groups = 6], got 7"));
  REQUIRE_THROWS_WITH(group({.d_model = 4, .experts = 6, .k = 0}),
                      Catch::Contains("k must be in [1, topk_groups · experts / n_groups = 6], got 0"));
  REQUIRE_THROWS_WITH(group({.d_model = 4, .experts = 6, .k = 1, .route_scale = 0.0}),
                      Catch::Contains("route_scale must be finite and > 0, got 0"));
  REQUIRE_THROWS_WITH(group({.d_model = 4, .experts = 6, .k = 1, .route_scale = kNaN}),
                      Catch::Contains("route_scale must be finite and > 0"));
  REQUIRE_THROWS_WITH(group({.d_model = 0, .experts = 6, .k = 1}), Catch::Contains("d_model must be >= 1, got 0"));
  REQUIRE_THROWS_WITH(group({.d_model = 4, .experts = 0, .k = 1}), Catch::Contains("experts must be >= 1, got 0"));

  auto ec = [](ExpertChoiceRouterConfig c) { return ExpertChoiceRouter<T>(c); };
  REQUIRE_THROWS_WITH(ec({.d_model = 4, .experts = 3, .capacity_factor = 0.0}),
                      Catch::Contains("capacity_factor must be finite and > 0 (average experts per token), got 0"));
  REQUIRE_THROWS_WITH(ec({.d_model = 4, .experts = 3, .capacity_factor = -1.0}),
                      Catch::Contains("capacity_factor must be finite and > 0 (average experts per token), got -1"));
  REQUIRE_THROWS_WITH(ec({.d_model = 4, .experts = 3, .capacity_factor = kNaN}), Catch::Contains("capacity_factor"));
  REQUIRE_THROWS_WITH(ec({.d_model = 4, .experts = 3, .capacity_factor = std::numeric_limits<double>::infinity()}),
                      Catch::Contains("capacity_factor"));
  REQUIRE_THROWS_WITH(ec({.d_model = 4, .experts = 0}), Catch::Contains("experts must be >= 1, got 0"));
  REQUIRE_THROWS_WITH(ec({.d_model = -1, .experts = 3}), Catch::Contains("d_model must be >= 1, got -1"));

  // Wrong shapes.
  ExpertChoiceRouter<T> router({.d_model = 4, .experts = 3});
  Tensor<T> x({5, 3});
  x.zero();
  Routing<T> r;
  REQUIRE_THROWS_WITH(router.forward(x.matrix(), r, Mode::eval), Catch::Contains("x must be [5, 4], got [5, 3]"));
  GroupTopKRouter<T> g({.d_model = 4, .experts = 6, .k = 2});
  REQUIRE_THROWS_WITH(g.forward(x.matrix(), r, Mode::eval), Catch::Contains("x must be [5, 4], got [5, 3]"));

  // The capacity policy belongs to token-choice routers.
  MoE layer(ExpertChoiceRouter<T>({.d_model = 4, .experts = 3}), ReluExperts<T>({4, 3, 2}));
  layer.capacity.capacity_factor = 1.25;
  Tensor<T> x4({5, 4}), y({5, 4});
  x4.zero();
  REQUIRE_THROWS_WITH(layer.forward(x4.matrix(), y.matrix()),
                      Catch::Contains("capacity applies to token-choice routers; ExpertChoiceRouter sets its own"));

  // Bias update.
  SelectionBias<T> b(3);
  REQUIRE_THROWS_WITH(b.update(std::vector<index_t>{1, 2}, 0.1),
                      Catch::Contains("tokens_per_expert must have 3 entries (one per expert), got 2"));
  REQUIRE_THROWS_WITH(b.update(std::vector<index_t>{1, 2, 3}, -0.1),
                      Catch::Contains("u (update speed) must be finite and >= 0, got -0.1"));
  REQUIRE_THROWS_WITH(b.update(std::vector<index_t>{1, 2, 3}, kNaN), Catch::Contains("u (update speed)"));
  REQUIRE_THROWS_WITH(b.update(std::vector<index_t>{1, -2, 3}, 0.1),
                      Catch::Contains("tokens_per_expert[1] must be >= 0, got -2"));
}
