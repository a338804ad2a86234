// The whole MoE layer: forward against a naive reference, finite-difference gradients for every
// router × activation × loss, a user-defined router, validation mode, bad input, determinism.
#include <smoe/smoe.hpp>

#include "catch.hpp"
#include "helpers.hpp"
#include "reference.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

using namespace smoe;
namespace ref = smoe::test::ref;

namespace {

template <HasParameters C>
void randomize_parameters(C& c, double std, std::uint64_t seed = 100) {
  c.for_each_parameter([&](std::string_view, auto& p) { test::randomize(p.value, seed++, std); });
}

template <class T>
std::vector<double> values_of(Parameter<T>& p) {
  return {p.value.data(), p.value.data() + p.value.size()};
}

template <class T, class G>
auto make_router(index_t d, index_t E, index_t K, G gate) {
  return TopKRouter<T, G>({.d_model = d, .experts = E, .k = K}, gate);
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

// Checks every parameter gradient and dx of `layer` against central differences.
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

template <class Act, class G, class... Losses>
void check_combination(G gate, Losses... losses) {
  const index_t d = 6, E = 5, G_ = 4, K = 2, tokens = 7;
  MoE layer(make_router<double>(d, E, K, gate), FeedForwardExperts<double, Act>({d, E, G_, true}), WeightedSum<double>{},
            losses...);
  randomize_parameters(layer, 0.6);
  check_layer_gradients(layer, tokens);
}

template <class Act, class G>
void check_all_losses(G gate) {
  SECTION("no loss") { check_combination<Act>(gate); }
  SECTION("switch") { check_combination<Act>(gate, SwitchBalanceLoss<double>(0.3)); }
  SECTION("z") { check_combination<Act>(gate, RouterZLoss<double>(0.2)); }
  SECTION("entropy") { check_combination<Act>(gate, EntropyLoss<double>(0.5)); }
  SECTION("importance") { check_combination<Act>(gate, ImportanceLoss<double>(0.4)); }
  SECTION("all four") {
    check_combination<Act>(gate, SwitchBalanceLoss<double>(0.1), RouterZLoss<double>(0.1), EntropyLoss<double>(0.1),
                           ImportanceLoss<double>(0.1));
  }
}

template <class A>
constexpr ref::Act ref_act() {
  if constexpr (std::is_same_v<A, Relu>) return ref::Act::relu;
  if constexpr (std::is_same_v<A, Gelu>) return ref::Act::gelu;
  return ref::Act::swiglu;
}

}  // namespace

TEMPLATE_TEST_CASE("MoE gradients match finite differences for every router, activation and loss", "[moe][grad]",
                   Relu, Gelu, SwiGlu) {
  SECTION("softmax top-k") { check_all_losses<TestType>(SoftmaxGate{.renormalize = false}); }
  SECTION("softmax top-k, renormalized") { check_all_losses<TestType>(SoftmaxGate{.renormalize = true}); }
  SECTION("sigmoid top-k") { check_all_losses<TestType>(SigmoidGate{}); }
}

TEMPLATE_PRODUCT_TEST_CASE("MoE forward matches the naive reference", "[moe]", FeedForwardExperts,
                           ((float, Relu), (double, Relu), (float, Gelu), (double, Gelu), (float, SwiGlu),
                            (double, SwiGlu))) {
  using T = typename TestType::scalar_type;
  using Act = typename TestType::activation;
  const index_t d = 8, E = 6, G = 5, tokens = 13;
  const index_t K = GENERATE(1, 2, 6);
  const int gate_kind = GENERATE(0, 1, 2);
  const bool bias = GENERATE(false, true);
  auto run = [&](auto gate, ref::Gate ref_gate) {
    MoE layer(make_router<T>(d, E, K, gate), TestType({d, E, G, bias}));
    randomize_parameters(layer, 0.5);
    const auto x = test::random_matrix<T>(tokens, d, 4);
    Tensor<T> y({tokens, d});
    const auto out = layer.forward(x.matrix(), y.matrix());
    ref::Layer r{.d = int(d), .E = int(E), .G = int(G), .K = int(K), .act = ref_act<Act>(), .gate = ref_gate};
    r.router = values_of(layer.router().weight());
    r.w1 = values_of(layer.experts().w1());
    r.w2 = values_of(layer.experts().w2());
    if (bias) {
      r.b1 = values_of(layer.experts().b1());
      r.b2 = values_of(layer.experts().b2());
    }
    std::vector<double> xd(x.data(), x.data() + x.size());
    test::require_close(y, r.forward(xd), 10 * test::tolerance<T>(), 10 * test::tolerance<T>(), "y");
    index_t total = 0;
    for (index_t c : out.stats.tokens_per_expert) total += c;
    CHECK(total == tokens * K);
    CHECK(out.stats.dropped == 0);
  };
  if (gate_kind == 0) run(SoftmaxGate{.renormalize = false}, ref::Gate::softmax);
  if (gate_kind == 1) run(SoftmaxGate{.renormalize = true}, ref::Gate::softmax_renorm);
  if (gate_kind == 2) run(SigmoidGate{}, ref::Gate::sigmoid);
}

TEST_CASE("with K = E and every gate 1, the MoE layer is the dense MLP of the concatenated experts", "[moe][dense]") {
  // A router that sends every token to every expert with gate 1 (user-defined, no parameters).
  struct AllExperts {
    using scalar_type = double;
    index_t E, d;
    index_t experts() const { return E; }
    index_t k() const { return E; }
    index_t d_model() const { return d; }
    void forward(ConstMatrixView<double> x, Routing<double>& r, Mode) {
      r.logits.resize({x.rows, 0});
      r.experts.resize({x.rows, E});
      r.gates.resize({x.rows, E});
      for (index_t i = 0; i < x.rows * E; ++i) r.experts[i] = std::int32_t(i % E), r.gates[i] = 1.0;
    }
    void backward(ConstMatrixView<double>, const Routing<double>&, ConstMatrixView<double>, MatrixView<double>,
                  MatrixView<double>) {}
  };
  const index_t d = 6, E = 4, G = 3, tokens = 5;
  MoE layer(AllExperts{E, d}, ReluExperts<double>({d, E, G}));
  randomize_parameters(layer, 0.5);
  DenseMLP<double, Relu> dense({.d_model = d, .hidden = E * G});
  for (index_t e = 0; e < E; ++e)
    for (index_t i = 0; i < d; ++i)
      for (index_t j = 0; j < G; ++j) dense.w1().value[i * E * G + e * G + j] = layer.experts().w1().value[(e * d + i) * G + j];
  for (index_t e = 0; e < E; ++e)
    for (index_t j = 0; j < G; ++j)
      for (index_t c = 0; c < d; ++c) dense.w2().value[(e * G + j) * d + c] = layer.experts().w2().value[(e * G + j) * d + c];
  const auto x = test::random_matrix<double>(tokens, d, 2);
  Tensor<double> y_moe({tokens, d}), y_dense({tokens, d});
  layer.forward(x.matrix(), y_moe.matrix());
  dense.forward(x.matrix(), y_dense.matrix());
  test::require_close(y_moe, y_dense, 1e-12, 1e-12, "y");
}

// A user-defined router in a few lines: logits x Wᵀ, top-k, gate = tanh(logit).
struct TanhRouter {
  using scalar_type = double;
  index_t d, E, K;
  Parameter<double> weight{{E, d}};
  index_t experts() const { return E; }
  index_t k() const { return K; }
  index_t d_model() const { return d; }
  template <class F>
  void for_each_parameter(F&& f) {
    f("weight", weight);
  }
  void forward(ConstMatrixView<double> x, Routing<double>& r, Mode) {
    r.logits.resize({x.rows, E});
    r.experts.resize({x.rows, K});
    r.gates.resize({x.rows, K});
    for (index_t t = 0; t < x.rows; ++t) {
      for (index_t e = 0; e < E; ++e) {
        double s = 0;
        for (index_t i = 0; i < d; ++i) s += x(t, i) * weight.value[e * d + i];
        r.logits[t * E + e] = s;
      }
      select_topk(r.logits.data() + t * E, E, K, r.experts.data() + t * K);
      for (index_t j = 0; j < K; ++j) r.gates[t * K + j] = std::tanh(r.logits[t * E + r.experts[t * K + j]]);
    }
  }
  void backward(ConstMatrixView<double> x, const Routing<double>& r, ConstMatrixView<double> d_gates,
                MatrixView<double> d_logits, MatrixView<double> dx) {
    for (index_t t = 0; t < x.rows; ++t) {
      for (index_t j = 0; j < K; ++j) {
        const double g = r.gates[t * K + j];
        d_logits(t, r.experts[t * K + j]) += d_gates(t, j) * (1 - g * g);
      }
      for (index_t e = 0; e < E; ++e)
        for (index_t i = 0; i < d; ++i) {
          weight.grad[e * d + i] += d_logits(t, e) * x(t, i);
          dx(t, i) += d_logits(t, e) * weight.value[e * d + i];
        }
    }
  }
};
static_assert(Router<TanhRouter>);

TEST_CASE("a user-defined router plugs into MoE<> and gets correct gradients", "[moe][custom]") {
  MoE layer(TanhRouter{5, 4, 2}, GeluExperts<double>({5, 4, 3}), WeightedSum<double>{}, EntropyLoss<double>(0.3));
  randomize_parameters(layer, 0.7);
  check_layer_gradients(layer, 6);
}

TEST_CASE("sigma-MoE initialization has the paper's statistics", "[moe][init]") {
  const index_t d = 256, E = 16, G = 64;
  MoE layer(SigmoidTopK<double>({d, E, 4}), ReluExperts<double>({d, E, G, true}));
  sigma_moe_init(layer, {.scale = 2.0, .seed = 5});
  auto stats = [](const Tensor<double>& t) {
    double s = 0, sq = 0;
    for (index_t i = 0; i < t.size(); ++i) s += t[i], sq += t[i] * t[i];
    const double n = double(t.size());
    return std::sqrt(sq / n - (s / n) * (s / n));
  };
  CHECK(stats(layer.experts().w1().value) == Approx(2.0 / std::sqrt(double(d))).epsilon(0.01));
  CHECK(stats(layer.experts().w2().value) == Approx(2.0 / std::sqrt(double(E * G))).epsilon(0.01));
  const auto& w = layer.router().weight().value;
  CHECK(stats(w) == Approx(2.0 / std::sqrt(double(d))).epsilon(0.03));  // the sample std before renormalization
  double first = 0;
  for (index_t e = 0; e < E; ++e) {
    double norm = 0;
    for (index_t i = 0; i < d; ++i) norm += w[e * d + i] * w[e * d + i];
    if (e == 0) first = norm;
    CHECK(norm == Approx(first).epsilon(1e-12));
  }
  CHECK(layer.experts().b1().value[3] == 0.0);
  // Same seed, same weights; another seed, other weights.
  MoE again(SigmoidTopK<double>({d, E, 4}), ReluExperts<double>({d, E, G, true}));
  sigma_moe_init(again, {.scale = 2.0, .seed = 5});
  CHECK(again.experts().w2().value[17] == layer.experts().w2().value[17]);
  sigma_moe_init(again, {.scale = 2.0, .seed = 6});
  CHECK(again.experts().w2().value[17] != layer.experts().w2().value[17]);
}

TEST_CASE("MoE rejects bad input with messages naming the argument", "[moe][errors]") {
  using T = float;
  MoE layer(SigmoidTopK<T>({4, 3, 2}), ReluExperts<T>({4, 3, 2}));
  Tensor<T> x({5, 4}), y({5, 4}), wrong({5, 3});
  x.zero();
  REQUIRE_THROWS_WITH(layer.forward(wrong.matrix(), y.matrix()), Catch::Contains("x must be [5, 4], got [5, 3]"));
  REQUIRE_THROWS_WITH(layer.forward(x.matrix(), wrong.matrix()), Catch::Contains("y must be [5, 4], got [5, 3]"));
  REQUIRE_THROWS_WITH(layer.backward(x.matrix(), y.matrix()), Catch::Contains("before forward"));
  layer.forward(x.matrix(), y.matrix());
  Tensor<T> dy6({6, 4});
  REQUIRE_THROWS_WITH(layer.backward(dy6.matrix(), y.matrix()), Catch::Contains("dy must be [5, 4], got [6, 4]"));
  REQUIRE_THROWS_WITH(SigmoidTopK<T>({4, 3, 4}), Catch::Contains("k must be in [1, experts = 3], got 4"));
  REQUIRE_THROWS_WITH(SigmoidTopK<T>({4, 3, 0}), Catch::Contains("k must be in [1, experts = 3], got 0"));
  REQUIRE_THROWS_WITH(MoE(SigmoidTopK<T>({4, 3, 2}), ReluExperts<T>({4, 5, 2})),
                      Catch::Contains("router.experts() (= experts.experts()) must be 5, got 3"));
  REQUIRE_THROWS_WITH(MoE(SigmoidTopK<T>({4, 3, 2}), ReluExperts<T>({8, 3, 2})), Catch::Contains("d_model"));
  REQUIRE_THROWS_WITH(SigmoidTopK<T>({.d_model = 4, .experts = 3, .k = 1, .expert_dropout = {.rate = 1.0}}),
                      Catch::Contains("expert_dropout must be in [0, 1), got 1"));
}

TEST_CASE("a router returning an out-of-range id is reported, not followed", "[moe][errors]") {
  struct BadRouter {
    using scalar_type = float;
    index_t experts() const { return 3; }
    index_t k() const { return 1; }
    index_t d_model() const { return 2; }
    void forward(ConstMatrixView<float> x, Routing<float>& r, Mode) {
      r.experts.resize({x.rows, 1});
      r.gates.resize({x.rows, 1});
      r.experts.fill(3);
      r.gates.fill(1.f);
    }
    void backward(ConstMatrixView<float>, const Routing<float>&, ConstMatrixView<float>, MatrixView<float>,
                  MatrixView<float>) {}
  };
  MoE layer(BadRouter{}, ReluExperts<float>({2, 3, 2}));
  Tensor<float> x({2, 2}), y({2, 2});
  x.zero();
  REQUIRE_THROWS_WITH(layer.forward(x.matrix(), y.matrix()),
                      Catch::Contains("expert id at (token 0, k 0) must be in [-1, 3), got 3"));
}

TEST_CASE("NaN and Inf never route out of bounds; validation mode names the first bad row", "[moe][nan]") {
  using T = float;
  MoE layer(SoftmaxTopK<T>({4, 5, 2}), ReluExperts<T>({4, 5, 3}), WeightedSum<T>{}, SwitchBalanceLoss<T>(0.01),
            EntropyLoss<T>(0.01));
  randomize_parameters(layer, 0.5);
  auto x = test::random_matrix<T>(6, 4, 1);
  x[3 * 4 + 1] = std::numeric_limits<T>::quiet_NaN();
  x[5 * 4 + 0] = std::numeric_limits<T>::infinity();
  Tensor<T> y({6, 4}), dx({6, 4});
  layer.validate_inputs = true;
  REQUIRE_THROWS_WITH(layer.forward(x.matrix(), y.matrix()), Catch::Contains("x row 3 is not finite"));
  layer.validate_inputs = false;
  const auto out = layer.forward(x.matrix(), y.matrix(), Mode::train);
  for (index_t i = 0; i < 6 * 2; ++i) {
    const auto e = layer.routing().experts[i];
    CHECK((e >= 0 && e < 5));
  }
  CHECK(out.stats.assignments == 12);
  layer.backward(x.matrix(), dx.matrix());  // must not crash or read out of bounds (ASan job)
  for (index_t t : {0, 1, 2, 4})
    for (index_t c = 0; c < 4; ++c) CHECK(std::isfinite(y[t * 4 + c]));
}

TEST_CASE("empty batches and single tokens work", "[moe][edge]") {
  MoE layer(SigmoidTopK<double>({3, 4, 4}), SwiGluExperts<double>({3, 4, 2}), WeightedSum<double>{},
            SwitchBalanceLoss<double>(1), RouterZLoss<double>(1), EntropyLoss<double>(1), ImportanceLoss<double>(1));
  randomize_parameters(layer, 0.5);
  Tensor<double> x({0, 3}), y({0, 3}), dx({0, 3});
  const auto out = layer.forward(x.matrix(), y.matrix(), Mode::train);
  CHECK(out.aux_loss == 0.0);
  CHECK(out.stats.assignments == 0);
  CHECK(out.stats.fraction_dropped == 0.0);
  layer.backward(y.matrix(), dx.matrix());
  SECTION("T = 1, K = E") { check_layer_gradients(layer, 1); }
}

TEST_CASE("expert dropout is training-only, seeded and reproducible", "[moe][dropout]") {
  const index_t d = 8, E = 8, K = 2, tokens = 64;
  auto make = [&] {
    MoE layer(SigmoidTopK<float>({.d_model = d, .experts = E, .k = K, .expert_dropout = {.rate = 0.5, .seed = 9}}),
              ReluExperts<float>({d, E, 4}));
    sigma_moe_init(layer, {.seed = 1});
    return layer;
  };
  auto a = make(), b = make();
  const auto x = test::random_matrix<float>(tokens, d, 3);
  Tensor<float> y({tokens, d});
  auto ids = [&](auto& layer, Mode mode) {
    layer.forward(x.matrix(), y.matrix(), mode);
    const auto& e = layer.routing().experts;
    return std::vector<std::int32_t>(e.data(), e.data() + e.size());
  };
  const auto eval_a = ids(a, Mode::eval);
  CHECK(ids(a, Mode::eval) == eval_a);
  const auto train_a = ids(a, Mode::train), train_b = ids(b, Mode::train);
  CHECK(train_a == train_b);        // same seed, same step
  CHECK(train_a != eval_a);         // half the experts removed changes the choice
  CHECK(ids(a, Mode::train) != train_a);  // the next step draws new masks
  b.router().set_step(1);
  a.router().set_step(1);
  CHECK(ids(a, Mode::train) == ids(b, Mode::train));
}

#if defined(_OPENMP)
TEST_CASE("results are bitwise identical for any thread count", "[moe][determinism]") {
  const index_t d = 32, E = 8, tokens = 200;
  MoE layer(SoftmaxTopK<float>({d, E, 2}), GeluExperts<float>({d, E, 16}), WeightedSum<float>{},
            EntropyLoss<float>(0.01));
  sigma_moe_init(layer, {.seed = 4});
  const auto x = test::random_matrix<float>(tokens, d, 5), dy = test::random_matrix<float>(tokens, d, 6);
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    Tensor<float> y({tokens, d}), dx({tokens, d});
    zero_grad(layer);
    layer.forward(x.matrix(), y.matrix());
    layer.backward(dy.matrix(), dx.matrix());
    std::vector<float> all(y.data(), y.data() + y.size());
    all.insert(all.end(), dx.data(), dx.data() + dx.size());
    layer.for_each_parameter([&](std::string_view, auto& p) { all.insert(all.end(), p.grad.data(), p.grad.data() + p.grad.size()); });
    return all;
  };
  const auto one = run(1), two = run(2);
  omp_set_num_threads(omp_get_num_procs());
  CHECK(one == two);
}
#endif

TEST_CASE("capacity drops over-capacity assignments by priority, exactly and with exact gradients", "[moe][capacity]") {
  const index_t d = 5, E = 4, K = 2, tokens = 9;
  const auto priority = GENERATE(CapacityPolicy::Priority::position, CapacityPolicy::Priority::gate);
  MoE layer(SoftmaxTopK<double>({d, E, K}, SoftmaxGate{.renormalize = true}), GeluExperts<double>({d, E, 3}),
            WeightedSum<double>{}, ImportanceLoss<double>(0.3), EntropyLoss<double>(0.2));
  randomize_parameters(layer, 0.8);
  layer.capacity = {.capacity_factor = 0.5, .priority = priority};  // C = ceil(0.5 · 9 · 2 / 4) = 3
  const auto x = test::random_matrix<double>(tokens, d, 12);
  Tensor<double> y({tokens, d});
  const auto out = layer.forward(x.matrix(), y.matrix(), Mode::train);

  // Naive reference of the drop rule on the router's own choice.
  const auto& r = layer.routing();
  std::vector<std::pair<double, index_t>> order;  // (sort key, flat index (t, k))
  for (index_t j = 0; j < K; ++j)
    for (index_t t = 0; t < tokens; ++t)
      order.push_back({priority == CapacityPolicy::Priority::gate ? -r.gates[t * K + j] : 0.0, t * K + j});
  std::stable_sort(order.begin(), order.end(), [](auto& a, auto& b) { return a.first < b.first; });
  std::vector<int> load(E, 0);
  std::vector<std::int32_t> expected(static_cast<std::size_t>(tokens * K));
  index_t dropped = 0;
  for (auto [key, i] : order) {
    const auto e = r.experts[i];
    expected[i] = load[e] < 3 ? (++load[e], e) : (++dropped, -1);
  }
  const auto& kept = layer.dispatched_experts();
  CHECK(std::vector<std::int32_t>(kept.data(), kept.data() + kept.size()) == expected);
  CHECK(out.stats.dropped == dropped);
  CHECK(dropped > 0);
  CHECK(out.stats.fraction_dropped == Approx(double(dropped) / double(tokens * K)));
  for (index_t c : out.stats.tokens_per_expert) CHECK(c <= 3);
  // y is the gated sum over the kept assignments only.
  const auto w1 = values_of(layer.experts().w1()), w2 = values_of(layer.experts().w2());
  std::vector<double> y_ref;
  for (index_t t = 0; t < tokens; ++t) {
    std::vector<double> row(d, 0.0);
    for (index_t j = 0; j < K; ++j) {
      const auto e = expected[t * K + j];
      if (e < 0) continue;
      const auto o = ref::expert(ref::Act::gelu, int(d), 3, x.data() + t * d, &w1[e * d * 3], &w2[e * 3 * d], nullptr, nullptr);
      for (index_t c = 0; c < d; ++c) row[c] += r.gates[t * K + j] * o[c];
    }
    y_ref.insert(y_ref.end(), row.begin(), row.end());
  }
  test::require_close(y, y_ref, 1e-12, 1e-12, "y");
  check_layer_gradients(layer, tokens);
}

TEST_CASE("routing statistics match their definitions", "[moe][stats]") {
  const index_t d = 4, E = 5, K = 2, tokens = 11;
  MoE layer(SigmoidTopK<double>({d, E, K}), ReluExperts<double>({d, E, 3}));
  randomize_parameters(layer, 1.0);
  layer.capacity = {.capacity_factor = 0.4};  // C = ceil(0.4 · 22 / 5) = 2: some tokens lose both
  const auto x = test::random_matrix<double>(tokens, d, 40);
  Tensor<double> y({tokens, d});
  const auto s = layer.forward(x.matrix(), y.matrix()).stats;
  const auto& kept = layer.dispatched_experts();
  const auto& logits = layer.routing().logits;
  std::vector<index_t> load(E, 0);
  index_t without = 0, assigned = 0;
  for (index_t t = 0; t < tokens; ++t) {
    bool any = false;
    for (index_t j = 0; j < K; ++j)
      if (kept[t * K + j] >= 0) ++load[kept[t * K + j]], ++assigned, any = true;
    without += any ? 0 : 1;
  }
  CHECK(s.tokens_per_expert == load);
  CHECK(s.assignments == assigned);
  CHECK(s.dropped == tokens * K - assigned);
  CHECK(s.tokens_without_expert == without);
  std::vector<double> p(E, 0.0);
  for (index_t t = 0; t < tokens; ++t) {
    double z = 0;
    for (index_t e = 0; e < E; ++e) z += std::exp(logits[t * E + e]);
    for (index_t e = 0; e < E; ++e) p[e] += std::exp(logits[t * E + e]) / z / double(tokens);
  }
  double H = 0, mean = double(assigned) / double(E), var = 0;
  for (double v : p) H -= v * std::log(v);
  for (index_t c : load) var += (double(c) - mean) * (double(c) - mean) / double(E);
  CHECK(s.routing_entropy == Approx(H).epsilon(1e-12));
  CHECK(s.load_cv == Approx(std::sqrt(var) / mean).epsilon(1e-12));
  std::ostringstream table, csv;
  print_routing_stats(table, s);
  write_routing_stats_csv_header(csv, E);
  write_routing_stats_csv_row(csv, 7, 0, s);
  CHECK_THAT(table.str(), Catch::Contains("tokens without expert " + std::to_string(without)));
  CHECK_THAT(csv.str(), Catch::StartsWith("step,layer,assignments,dropped"));
  CHECK_THAT(csv.str(), Catch::Contains("\n7,0," + std::to_string(assigned) + ","));
}

TEST_CASE("a negative capacity factor is refused", "[moe][capacity][errors]") {
  MoE layer(SigmoidTopK<float>({2, 2, 1}), ReluExperts<float>({2, 2, 2}));
  layer.capacity.capacity_factor = -1;
  Tensor<float> x({3, 2}), y({3, 2});
  x.zero();
  REQUIRE_THROWS_WITH(layer.forward(x.matrix(), y.matrix()), Catch::Contains("capacity_factor must be >= 0"));
}
