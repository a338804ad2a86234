// Training infrastructure: AdamW against a naive double implementation written from the formulas
// (and against pinned PyTorch values), global gradient-norm clipping, the warm-up + cosine
// schedule, gradient accumulation, and checkpoints: a bit-exact round trip, a bit-identical
// resumed run, and transactional loading of corrupted files.
#include <smoe/io/checkpoint.hpp>

#include <smoe/combine/weighted_sum.hpp>
#include <smoe/experts/feed_forward_experts.hpp>
#include <smoe/layers/dense_mlp.hpp>
#include <smoe/layers/moe.hpp>
#include <smoe/losses/switch_balance.hpp>
#include <smoe/routing/group_topk.hpp>
#include <smoe/routing/sigmoid_topk.hpp>
#include <smoe/train/accumulate.hpp>
#include <smoe/train/adamw.hpp>
#include <smoe/train/clip.hpp>
#include <smoe/train/schedule.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <map>
#include <numbers>
#include <set>
#include <string>
#include <vector>

#include <unistd.h>

#include "catch.hpp"
#include "helpers.hpp"

using namespace smoe;
using smoe::io::Counters;
using smoe::io::Dtype;
using smoe::io::SafetensorsFile;
using smoe::io::SafetensorsWriter;
using Bytes = std::vector<std::uint8_t>;

namespace {

// The message of the smoe::error that `f` throws; fails the test when it throws nothing.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const smoe::error& e) {
    return e.what();
  }
  FAIL("expected a smoe::error");
  return {};
}

void check_message(const std::string& message, std::initializer_list<const char*> parts) {
  INFO("message: " << message);
  for (const char* part : parts) {
    INFO("expected part: " << part);
    CHECK(message.find(part) != std::string::npos);
  }
}

template <HasParameters C>
void randomize_parameters(C& c, std::uint64_t seed, double std = 0.5) {
  c.for_each_parameter([&](std::string_view, auto& p) { test::randomize(p.value, seed++, std); });
}

// Fills every gradient from a seed; every 5th element is 0 (moments stay 0 there at first).
template <HasParameters C>
void random_gradients(C& c, std::uint64_t seed) {
  c.for_each_parameter([&](std::string_view, auto& p) {
    test::randomize(p.grad, seed++, 0.3);
    for (index_t i = 0; i < p.grad.size(); i += 5) p.grad[i] = 0;
  });
}

template <class U>
std::vector<double> to_double(const Tensor<U>& t) {
  return {t.data(), t.data() + t.size()};
}

// ---------------------------------------------------------------------------------------------
// A naive AdamW straight from the formulas, in double:
//   m = β1 m + (1 − β1) g;  v = β2 v + (1 − β2) g²;  m̂ = m / (1 − β1^t);  v̂ = v / (1 − β2^t)
//   p −= lr · (m̂ / (√v̂ + ε) + λ · p)   (λ = 0 for excluded parameters)
struct NaiveAdamW {
  double b1 = 0, b2 = 0, eps = 0, wd = 0;
  std::set<std::string> no_decay;
  int t = 0;
  std::map<std::string, std::vector<double>> p, m, v;

  void step(double lr, const std::map<std::string, std::vector<double>>& grads) {
    ++t;
    for (const auto& [name, g] : grads) {
      auto& pp = p.at(name);
      auto& mm = m[name];
      auto& vv = v[name];
      mm.resize(g.size(), 0.0);
      vv.resize(g.size(), 0.0);
      const double lambda = no_decay.contains(name) ? 0.0 : wd;
      for (std::size_t i = 0; i < g.size(); ++i) {
        mm[i] = b1 * mm[i] + (1 - b1) * g[i];
        vv[i] = b2 * vv[i] + (1 - b2) * g[i] * g[i];
        const double mhat = mm[i] / (1 - std::pow(b1, t));
        const double vhat = vv[i] / (1 - std::pow(b2, t));
        pp[i] -= lr * (mhat / (std::sqrt(vhat) + eps) + lambda * pp[i]);
      }
    }
  }
};

template <class T>
void check_adamw_against_naive(double weight_decay, bool exclude_biases) {
  DenseMLP<T> mlp({.d_model = 3, .hidden = 4, .bias = true});
  randomize_parameters(mlp, 10);
  NoDecayRule rule = exclude_biases ? no_decay_if_name_ends_with({"b1", "b2"}) : NoDecayRule{};
  AdamW<T> opt({.lr = 0.05, .beta1 = 0.8, .beta2 = 0.95, .eps = 1e-6, .weight_decay = weight_decay}, rule);
  NaiveAdamW ref;
  ref.b1 = 0.8, ref.b2 = 0.95, ref.eps = 1e-6, ref.wd = weight_decay;
  if (exclude_biases) ref.no_decay = {"b1", "b2"};
  mlp.for_each_parameter([&](std::string_view name, auto& p) { ref.p[std::string(name)] = to_double(p.value); });
  CHECK(opt.decays("w1") == (weight_decay > 0));
  CHECK(opt.decays("b1") == (weight_decay > 0 && !exclude_biases));

  const std::vector<double> lrs = {0.05, 0.1, 0.02, 0.07, 0.0, 0.03};
  for (std::size_t s = 0; s < lrs.size(); ++s) {
    random_gradients(mlp, 100 + 10 * s);
    std::map<std::string, std::vector<double>> grads;
    mlp.for_each_parameter([&](std::string_view name, auto& p) { grads[std::string(name)] = to_double(p.grad); });
    opt.set_lr(lrs[s]);
    opt.step(mlp);
    ref.step(lrs[s], grads);
    CHECK(opt.steps() == s + 1);
    mlp.for_each_parameter([&](std::string_view name, auto& p) {
      INFO("step " << s + 1 << " parameter " << name);
      const std::string n(name);
      test::require_close(p.value, ref.p.at(n), test::tolerance<T>(), sizeof(T) == 8 ? 1e-14 : 1e-6, "value");
      test::require_close(opt.state().at(n).m, ref.m.at(n), test::tolerance<T>(), 1e-14, "m");
      test::require_close(opt.state().at(n).v, ref.v.at(n), test::tolerance<T>(), 1e-14, "v");
    });
  }
}

}  // namespace

TEMPLATE_TEST_CASE("AdamW matches a naive implementation of the formulas", "[train][adamw]", float, double) {
  SECTION("without weight decay") { check_adamw_against_naive<TestType>(0.0, false); }
  SECTION("with weight decay") { check_adamw_against_naive<TestType>(0.3, false); }
  SECTION("with weight decay, biases excluded") { check_adamw_against_naive<TestType>(0.3, true); }
}

namespace {
struct TwoTensors {
  Parameter<double> weight{std::vector<index_t>{4}}, bias{std::vector<index_t>{2}};
  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("layer.weight"), weight);
    f(std::string_view("layer.bias"), bias);
  }
};
}  // namespace

TEST_CASE("AdamW reproduces torch.optim.AdamW", "[train][adamw]") {
  // Produced once with PyTorch 1.13 (python3), in float64:
  //   import torch
  //   p = torch.tensor([0.5, -1.25, 2.0, 0.0], dtype=torch.float64)
  //   b = torch.tensor([0.3, -0.7], dtype=torch.float64)
  //   opt = torch.optim.AdamW([{"params": [p]}, {"params": [b], "weight_decay": 0.0}],
  //                           lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, foreach=False)
  //   gp = [[0.1, -0.2, 0.3, 0.0], [-0.4, 0.5, 0.05, 1e-3], [0.2, 0.2, -0.6, -2.0]]
  //   gb = [[1.0, -3.0], [0.5, 0.25], [-2.0, 0.0]]
  //   for s, lr in enumerate([0.1, 0.05, 0.02]):
  //       for g in opt.param_groups: g["lr"] = lr
  //       p.grad = torch.tensor(gp[s], dtype=torch.float64)
  //       b.grad = torch.tensor(gb[s], dtype=torch.float64)
  //       opt.step()
  //   print(", ".join(f"{x:.17g}" for x in p.tolist())); print(", ".join(f"{x:.17g}" for x in b.tolist()))
  TwoTensors model;
  const double p0[] = {0.5, -1.25, 2.0, 0.0}, b0[] = {0.3, -0.7};
  std::copy(std::begin(p0), std::end(p0), model.weight.value.data());
  std::copy(std::begin(b0), std::end(b0), model.bias.value.data());
  const double gp[3][4] = {{0.1, -0.2, 0.3, 0.0}, {-0.4, 0.5, 0.05, 1e-3}, {0.2, 0.2, -0.6, -2.0}};
  const double gb[3][2] = {{1.0, -3.0}, {0.5, 0.25}, {-2.0, 0.0}};
  const double lrs[3] = {0.1, 0.05, 0.02};
  AdamW<double> opt({.lr = 0.1, .beta1 = 0.9, .beta2 = 0.99, .eps = 1e-8, .weight_decay = 0.1},
                    no_decay_if_name_ends_with({"bias"}));
  for (int s = 0; s < 3; ++s) {
    std::copy(gp[s], gp[s] + 4, model.weight.grad.data());
    std::copy(gb[s], gb[s] + 2, model.bias.grad.data());
    opt.set_lr(lrs[s]);
    opt.step(model);
  }
  const std::vector<double> torch_p = {0.42230471384312751, -1.1624383454484872, 1.833597858712751,
                                       -0.024335142954826069};
  const std::vector<double> torch_b = {0.15744408882734576, -0.56022666588277392};
  test::require_close(model.weight.value, torch_p, 1e-14, 1e-15, "layer.weight");
  test::require_close(model.bias.value, torch_b, 1e-14, 1e-15, "layer.bias");
}

namespace {
struct Duplicated {
  Parameter<float> a{std::vector<index_t>{2}};
  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("same"), a);
    f(std::string_view("same"), a);
  }
};
}  // namespace

TEST_CASE("AdamW rejects bad hyperparameters and a model that does not match its state", "[train][adamw]") {
  check_message(error_of([] { AdamW<float>({.lr = -1}); }), {"AdamW", "lr", ">= 0", "-1"});
  check_message(error_of([] { AdamW<float>({.beta1 = 1.0}); }), {"beta1", "[0, 1)", "1"});
  check_message(error_of([] { AdamW<float>({.beta2 = -0.5}); }), {"beta2", "-0.5"});
  check_message(error_of([] { AdamW<float>({.eps = 0}); }), {"eps", "> 0"});
  check_message(error_of([] { AdamW<float>({.weight_decay = std::nan("")}); }), {"weight_decay", "nan"});
  AdamW<float> opt;
  check_message(error_of([&] { opt.set_lr(INFINITY); }), {"set_lr", "lr", "inf"});
  CHECK(opt.lr() == 1e-3);

  Duplicated dup;
  check_message(error_of([&] { opt.step(dup); }), {"parameter 'same'", "more than once"});
  CHECK(opt.steps() == 0);

  DenseMLP<float> a({.d_model = 3, .hidden = 4, .bias = true}), wider({.d_model = 3, .hidden = 5, .bias = true}),
      no_bias({.d_model = 3, .hidden = 4});
  randomize_parameters(a, 1);
  random_gradients(a, 2);
  opt.step(a);
  randomize_parameters(wider, 3);
  random_gradients(wider, 4);
  const auto before = to_double(wider.w1().value);
  check_message(error_of([&] { opt.step(wider); }), {"parameter 'w1'", "shape must be [3, 4]", "got [3, 5]"});
  CHECK(to_double(wider.w1().value) == before);  // nothing was updated
  check_message(error_of([&] { opt.step(no_bias); }), {"holds state for parameter 'b1'", "did not visit"});
  CHECK(opt.steps() == 1);
  opt.reset();
  opt.step(wider);  // a reset optimizer adopts any model
  CHECK(opt.steps() == 1);
}

// ---------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("clip_grad_norm measures and scales like a naive computation", "[train][clip]", float, double) {
  using T = TestType;
  DenseMLP<T> mlp({.d_model = 4, .hidden = 6, .bias = true});
  random_gradients(mlp, 5);
  double sum = 0;
  std::vector<std::vector<double>> before;
  mlp.for_each_parameter([&](std::string_view, auto& p) {
    before.push_back(to_double(p.grad));
    for (double g : before.back()) sum += g * g;
  });
  const double naive = std::sqrt(sum);
  REQUIRE(naive > 0.5);
  CHECK(grad_norm(mlp) == Approx(naive).epsilon(1e-13));

  SECTION("above the threshold every gradient is scaled by max_norm / (norm + 1e-6)") {
    const double max_norm = naive / 3;
    const ClipResult r = clip_grad_norm(mlp, max_norm);
    CHECK(r.finite());
    CHECK(r.clipped());
    CHECK(r.norm == Approx(naive).epsilon(1e-13));
    const double coef = max_norm / (naive + 1e-6);
    CHECK(r.scale == Approx(coef).epsilon(1e-13));
    std::size_t i = 0;
    mlp.for_each_parameter([&](std::string_view name, auto& p) {
      std::vector<double> expected = before[i++];
      for (double& g : expected) g *= coef;
      test::require_close(p.grad, expected, test::tolerance<T>(), 0.0, std::string(name).c_str());
    });
    CHECK(grad_norm(mlp) == Approx(max_norm).epsilon(1e-5));
  }
  SECTION("below the threshold nothing changes") {
    const ClipResult r = clip_grad_norm(mlp, naive * 1.01);
    CHECK_FALSE(r.clipped());
    CHECK(r.scale == 1.0);
    std::size_t i = 0;
    mlp.for_each_parameter([&](std::string_view, auto& p) { CHECK(to_double(p.grad) == before[i++]); });
    CHECK(clip_grad_norm(mlp, INFINITY).scale == 1.0);  // +inf: measure only
  }
  SECTION("a NaN or infinite gradient is reported and nothing is scaled") {
    for (T bad : {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity()}) {
      mlp.b2().grad[1] = bad;
      const auto w1 = to_double(mlp.w1().grad);
      const ClipResult r = clip_grad_norm(mlp, 1e-3);
      CHECK_FALSE(r.finite());
      CHECK(r.scale == 1.0);
      CHECK(to_double(mlp.w1().grad) == w1);
      if (std::isinf(bad)) CHECK(std::isinf(r.norm));
      if (std::isnan(bad)) CHECK(std::isnan(r.norm));
    }
  }
  SECTION("zero gradients have norm 0 and stay 0") {
    zero_grad(mlp);
    const ClipResult r = clip_grad_norm(mlp, 1.0);
    CHECK(r.norm == 0.0);
    CHECK_FALSE(r.clipped());
  }
  SECTION("max_norm must be > 0") {
    check_message(error_of([&] { (void)clip_grad_norm(mlp, 0.0); }), {"clip_grad_norm", "max_norm", "> 0", "0"});
    check_message(error_of([&] { (void)clip_grad_norm(mlp, std::nan("")); }), {"max_norm", "nan"});
  }
}

TEST_CASE("grad_norm of gradients too large to square is still finite", "[train][clip]") {
  DenseMLP<double> mlp({.d_model = 1, .hidden = 1});
  mlp.w1().grad[0] = 3e200;
  mlp.w2().grad[0] = -4e200;
  CHECK(grad_norm(mlp) == Approx(5e200).epsilon(1e-14));
  const ClipResult r = clip_grad_norm(mlp, 1.0);
  CHECK(r.finite());
  CHECK(mlp.w1().grad[0] == Approx(0.6).epsilon(1e-12));
  CHECK(mlp.w2().grad[0] == Approx(-0.8).epsilon(1e-12));
}

// ---------------------------------------------------------------------------------------------

TEST_CASE("CosineSchedule: warm-up, cosine and the constant tail", "[train][schedule]") {
  const CosineSchedule s({.peak_lr = 1.0, .min_lr = 0.1, .warmup_steps = 10, .total_steps = 110});
  CHECK(s(0) == 0.0);
  CHECK(s(1) == Approx(0.1).epsilon(1e-15));
  CHECK(s(5) == Approx(0.5).epsilon(1e-15));
  CHECK(s(9) == Approx(0.9).epsilon(1e-15));
  CHECK(s(10) == 1.0);                                     // the peak, start of the cosine
  CHECK(s(60) == Approx(0.55).epsilon(1e-15));             // halfway: min + (peak − min) / 2
  CHECK(s(35) == Approx(0.1 + 0.45 * (1 + std::cos(std::numbers::pi / 4))).epsilon(1e-15));
  CHECK(s(109) == Approx(0.1 + 0.45 * (1 + std::cos(std::numbers::pi * 99 / 100))).epsilon(1e-15));
  CHECK(s(109) > 0.1);
  CHECK(s(110) == 0.1);
  CHECK(s(1'000'000) == 0.1);
  for (std::uint64_t step = 10; step < 110; ++step) CHECK(s(step + 1) <= s(step));  // monotone decay

  const CosineSchedule no_warmup({.peak_lr = 2.0, .min_lr = 0.0, .warmup_steps = 0, .total_steps = 4});
  CHECK(no_warmup(0) == 2.0);
  CHECK(no_warmup(2) == Approx(1.0).epsilon(1e-15));
  CHECK(no_warmup(4) == 0.0);
  const CosineSchedule only_warmup({.peak_lr = 1.0, .min_lr = 0.25, .warmup_steps = 4, .total_steps = 4});
  CHECK(only_warmup(2) == 0.5);
  CHECK(only_warmup(4) == 0.25);
}

TEST_CASE("CosineSchedule rejects bad arguments", "[train][schedule]") {
  check_message(error_of([] { CosineSchedule({.peak_lr = 0, .total_steps = 10}); }), {"CosineSchedule", "peak_lr", "> 0"});
  check_message(error_of([] { CosineSchedule({.peak_lr = INFINITY, .total_steps = 10}); }), {"peak_lr", "inf"});
  check_message(error_of([] { CosineSchedule({.peak_lr = 1, .min_lr = 2, .total_steps = 10}); }),
                {"min_lr", "[0, peak_lr = 1]", "got 2"});
  check_message(error_of([] { CosineSchedule({.peak_lr = 1, .min_lr = -0.1, .total_steps = 10}); }), {"min_lr", "-0.1"});
  check_message(error_of([] { CosineSchedule({.peak_lr = 1, .total_steps = 0}); }), {"total_steps", ">= 1", "got 0"});
  check_message(error_of([] { CosineSchedule({.peak_lr = 1, .warmup_steps = 11, .total_steps = 10}); }),
                {"warmup_steps", "<= total_steps = 10", "got 11"});
}

// ---------------------------------------------------------------------------------------------

namespace {
// Gradients of L = (1/N) Σ_t ½‖mlp(x_t) − target_t‖² for rows [first, last), backward seeded
// with dy = weight · (y − target) / n (the micro-batch's own mean-loss gradient, times weight).
template <class T>
void accumulate_squared_error(DenseMLP<T>& mlp, const Tensor<T>& x, const Tensor<T>& target, index_t first,
                              index_t last, double weight) {
  const index_t n = last - first, d = x.dim(1);
  Tensor<T> xs({n, d}), y({n, d}), dy({n, d}), dx({n, d});
  for (index_t i = 0; i < n * d; ++i) xs[i] = x[first * d + i];
  mlp.forward(xs.matrix(), y.matrix());
  for (index_t i = 0; i < n * d; ++i) dy[i] = T(weight * double(y[i] - target[first * d + i]) / double(n));
  mlp.backward(dy.matrix(), dx.matrix());
}

template <class T>
std::vector<std::vector<double>> gradients_of(DenseMLP<T>& mlp) {
  std::vector<std::vector<double>> out;
  mlp.for_each_parameter([&](std::string_view, auto& p) { out.push_back(to_double(p.grad)); });
  return out;
}
}  // namespace

TEMPLATE_TEST_CASE("gradient accumulation over micro-batches equals the full batch", "[train][accumulate]", float,
                   double) {
  using T = TestType;
  const index_t N = 12, d = 4;
  DenseMLP<T> mlp({.d_model = d, .hidden = 6, .bias = true});
  randomize_parameters(mlp, 20);
  const auto x = test::random_matrix<T>(N, d, 21), target = test::random_matrix<T>(N, d, 22);
  zero_grad(mlp);
  accumulate_squared_error(mlp, x, target, 0, N, 1.0);
  const auto full = gradients_of(mlp);
  auto require_equal_to_full = [&](const char* what) {
    const auto acc = gradients_of(mlp);
    for (std::size_t i = 0; i < full.size(); ++i) test::require_close(acc[i], full[i], test::tolerance<T>(), 1e-7, what);
  };

  SECTION("equal micro-batches, each its own mean, then scale_gradients(1 / M)") {
    zero_grad(mlp);
    for (index_t m = 0; m < 3; ++m) accumulate_squared_error(mlp, x, target, 4 * m, 4 * m + 4, 1.0);
    scale_gradients(mlp, 1.0 / 3);
    require_equal_to_full("scaled after accumulating");
  }
  SECTION("unequal micro-batches weighted by micro_batch_weight(n_i, N)") {
    zero_grad(mlp);
    const index_t bounds[] = {0, 5, 9, 12};
    for (int m = 0; m < 3; ++m)
      accumulate_squared_error(mlp, x, target, bounds[m], bounds[m + 1],
                               micro_batch_weight(bounds[m + 1] - bounds[m], N));
    require_equal_to_full("weighted micro-batches");
  }
  SECTION("without the scale the sum is M times the full gradient") {
    zero_grad(mlp);
    for (index_t m = 0; m < 3; ++m) accumulate_squared_error(mlp, x, target, 4 * m, 4 * m + 4, 1.0);
    CHECK(gradients_of(mlp)[0][1] == Approx(3 * full[0][1]).epsilon(1e-5));
  }
  check_message(error_of([] { (void)micro_batch_weight(5, 4); }), {"micro_tokens", "[0, batch_tokens = 4]", "got 5"});
  check_message(error_of([] { (void)micro_batch_weight(0, 0); }), {"batch_tokens", ">= 1"});
  check_message(error_of([&] { scale_gradients(mlp, INFINITY); }), {"scale_gradients", "factor", "inf"});
}

TEST_CASE("a Switch balance loss is a batch statistic: micro-batches do not add up to it", "[train][accumulate]") {
  // Documents the caveat in train/accumulate.hpp: with dy = 0 only the aux loss drives the router.
  const index_t N = 32, d = 4, E = 4;
  MoE layer(SigmoidTopK<double>({.d_model = d, .experts = E, .k = 1}), ReluExperts<double>({d, E, 3}),
            WeightedSum<double>{}, SwitchBalanceLoss<double>(1.0));
  randomize_parameters(layer, 30, 1.0);
  const auto x = test::random_matrix<double>(N, d, 31);
  auto router_grad = [&](index_t micro) {
    zero_grad(layer);
    for (index_t first = 0; first < N; first += micro) {
      Tensor<double> xs({micro, d}), y({micro, d}), dy({micro, d}), dx({micro, d});
      for (index_t i = 0; i < micro * d; ++i) xs[i] = x[first * d + i];
      dy.zero();
      layer.forward(xs.matrix(), y.matrix());
      layer.backward(dy.matrix(), dx.matrix());
    }
    scale_gradients(layer, double(micro) / double(N));
    return to_double(layer.router().weight().grad);
  };
  const auto full = router_grad(N), accumulated = router_grad(8);
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < full.size(); ++i) diff += std::abs(full[i] - accumulated[i]), scale += std::abs(full[i]);
  CHECK(diff > 1e-3 * scale);
}

// ---------------------------------------------------------------------------------------------
// Checkpoints. A composite: a sigma-MoE layer with expert dropout (its router's step counter
// matters), a dense MLP, and a DeepSeek-V3 group router layer whose selection bias is a buffer.
namespace {

constexpr index_t net_d = 6, net_tokens = 24;

template <class T>
struct Net {
  using SigmaMoE = MoE<SigmoidTopK<T>, ReluExperts<T>, WeightedSum<T>, SwitchBalanceLoss<T>>;
  using GroupMoE = MoE<GroupTopKRouter<T>, ReluExperts<T>>;
  SigmaMoE moe;
  DenseMLP<T> mlp;
  GroupMoE gmoe;

  explicit Net(std::uint64_t seed, double dropout = 0.3)
      : moe(SigmoidTopK<T>({.d_model = net_d, .experts = 4, .k = 2, .expert_dropout = {.rate = dropout, .seed = 9}}),
            ReluExperts<T>({.d_model = net_d, .experts = 4, .hidden = 5, .bias = true}), WeightedSum<T>{},
            SwitchBalanceLoss<T>(0.05)),
        mlp({.d_model = net_d, .hidden = 8, .bias = true}),
        gmoe(GroupTopKRouter<T>({.d_model = net_d, .experts = 4, .k = 2, .n_groups = 2, .topk_groups = 1}),
             ReluExperts<T>({.d_model = net_d, .experts = 4, .hidden = 3})) {
    randomize_parameters(*this, seed);
  }

  template <class F>
  void for_each_parameter(F&& f) {
    moe.for_each_parameter(with_prefix("moe.", f));
    mlp.for_each_parameter(with_prefix("mlp.", f));
    gmoe.for_each_parameter(with_prefix("gmoe.", f));
  }
  template <class F>
  void for_each_buffer(F&& f) {
    gmoe.router().for_each_buffer(with_prefix("gmoe.router.", f));
  }

  // L = (1/n) Σ_t ½‖y_t − target_t‖² + aux, y = h2 + gmoe(h2), h2 = h1 + mlp(h1), h1 = x + moe(x).
  double forward_backward(const Tensor<T>& x, const Tensor<T>& target) {
    const index_t n = x.dim(0), d = net_d;
    Tensor<T> a({n, d}), h1({n, d}), h2({n, d}), y({n, d}), dy({n, d}), dx({n, d});
    double loss = double(moe.forward(x.matrix(), a.matrix(), Mode::train).aux_loss);
    for (index_t i = 0; i < n * d; ++i) h1[i] = x[i] + a[i];
    mlp.forward(h1.matrix(), a.matrix());
    for (index_t i = 0; i < n * d; ++i) h2[i] = h1[i] + a[i];
    loss += double(gmoe.forward(h2.matrix(), a.matrix(), Mode::train).aux_loss);
    for (index_t i = 0; i < n * d; ++i) {
      y[i] = h2[i] + a[i];
      const double r = double(y[i]) - double(target[i]);
      loss += 0.5 * r * r / double(n);
      dy[i] = T(r / double(n));
    }
    gmoe.backward(dy.matrix(), dx.matrix());
    for (index_t i = 0; i < n * d; ++i) dy[i] += dx[i];  // dh2
    mlp.backward(dy.matrix(), dx.matrix());
    for (index_t i = 0; i < n * d; ++i) dy[i] += dx[i];  // dh1
    moe.backward(dy.matrix(), dx.matrix());
    return loss;
  }
};

// Everything a run carries between steps.
template <class T>
struct Run {
  Net<T> net;
  AdamW<T> opt{{.lr = 0, .weight_decay = 0.1}, no_decay_if_name_ends_with({"b1", "b2"})};
  CosineSchedule schedule{{.peak_lr = 0.02, .min_lr = 0.002, .warmup_steps = 3, .total_steps = 12}};
  std::uint64_t step = 0, position = 0;

  explicit Run(std::uint64_t seed) : net(seed) {}

  // One training step on the batch at the current data position; returns the loss.
  double train_step() {
    const auto x = test::random_matrix<T>(net_tokens, net_d, 1000 + position);
    const auto target = test::random_matrix<T>(net_tokens, net_d, 900000 + position);
    position += net_tokens;
    zero_grad(net);
    const double loss = net.forward_backward(x, target);
    const ClipResult clip = clip_grad_norm(net, 0.5);
    REQUIRE(clip.finite());
    opt.set_lr(schedule(step));
    opt.step(net);
    net.gmoe.router().bias().update(net.gmoe.router().load(), 0.01);
    ++step;
    return loss;
  }

  Counters counters() { return {{"step", step}, {"data_position", position}, {"moe.router.step", net.moe.router().step()}}; }
  void apply(const Counters& c) {
    step = c.at("step");
    position = c.at("data_position");
    net.moe.router().set_step(c.at("moe.router.step"));
  }
};

template <class U>
Bytes bits_of(const Tensor<U>& t) {
  const auto* p = reinterpret_cast<const std::uint8_t*>(t.data());
  Bytes b(p, p + t.size() * index_t(sizeof(U)));
  for (index_t d : t.shape())  // the shape is part of the state
    for (int k = 0; k < 8; ++k) b.push_back(std::uint8_t(std::uint64_t(d) >> (8 * k)));
  return b;
}

// Every bit of state: parameter values and gradients, buffers, optimizer moments and step, counters.
using Snapshot = std::map<std::string, Bytes>;
template <class T>
Snapshot snapshot(Net<T>& net, const AdamW<T>& opt, const Counters& counters = {}) {
  Snapshot s;
  net.for_each_parameter([&](std::string_view name, auto& p) {
    s["value " + std::string(name)] = bits_of(p.value);
    s["grad " + std::string(name)] = bits_of(p.grad);
  });
  net.for_each_buffer([&](std::string_view name, auto& t) { s["buffer " + std::string(name)] = bits_of(t); });
  for (const auto& [name, st] : opt.state()) {
    s["m " + name] = bits_of(st.m);
    s["v " + name] = bits_of(st.v);
  }
  Tensor<std::uint64_t> step({1});
  step[0] = opt.steps();
  s["optim steps"] = bits_of(step);
  for (const auto& [key, value] : counters) {
    Tensor<std::uint64_t> c({1});
    c[0] = value;
    s["counter " + key] = bits_of(c);
  }
  return s;
}

// A fresh temporary directory for this test binary, removed at exit.
const std::filesystem::path& scratch_dir() {
  struct Dir {
    std::filesystem::path path =
        std::filesystem::temp_directory_path() / ("smoe_test_training_" + std::to_string(::getpid()));
    Dir() {
      std::filesystem::remove_all(path);
      std::filesystem::create_directories(path);
    }
    ~Dir() {
      std::error_code ec;
      std::filesystem::remove_all(path, ec);
    }
  };
  static const Dir dir;
  return dir.path;
}

Bytes read_bytes(const std::filesystem::path& path) {
  const auto f = SafetensorsFile::load(path);  // validates; the bytes themselves come from the stream
  std::ifstream in(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), {});
}

void write_bytes(const std::filesystem::path& path, const Bytes& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
}

// The file rebuilt tensor by tensor: `edit` may write a replacement for a tensor (return true)
// or let it be copied unchanged (return false); `meta` edits the metadata; `extra` adds tensors.
Bytes rebuild(const Bytes& original, const std::function<bool(const std::string&, SafetensorsWriter&)>& edit,
              const std::function<void(std::map<std::string, std::string>&)>& meta = {},
              const std::function<void(SafetensorsWriter&)>& extra = {}) {
  const auto f = SafetensorsFile::parse(original);
  SafetensorsWriter w;
  std::map<std::string, std::string> m(f.metadata().begin(), f.metadata().end());
  if (meta) meta(m);
  for (const auto& [k, v] : m) w.set_metadata(k, v);
  for (const std::string& name : f.names())
    if (!edit(name, w)) w.add_raw(name, f.info(name).dtype, f.info(name).shape, f.raw(name));
  if (extra) extra(w);
  return w.bytes();
}

}  // namespace

TEMPLATE_TEST_CASE("checkpoint round trip restores every bit of the training state", "[io][checkpoint]", float,
                   double) {
  using T = TestType;
  Run<T> a(1);
  for (int s = 0; s < 3; ++s) a.train_step();
  const auto path = scratch_dir() / (std::string("roundtrip_") + (sizeof(T) == 4 ? "f32" : "f64") + ".safetensors");
  const Counters saved = a.counters();
  io::save_checkpoint(path, a.net, a.opt, saved);
  CHECK_FALSE(std::filesystem::exists(path.string() + ".tmp"));

  // The file's names and metadata are the documented, stable ones.
  const auto file = SafetensorsFile::load(path);
  const Dtype dt = io::dtype_of<T>::value;
  for (const char* name : {"moe.router.weight", "moe.experts.w1", "moe.experts.b2", "mlp.w1", "mlp.b2",
                           "gmoe.router.weight", "gmoe.experts.w2", "gmoe.router.bias", "optim.m.moe.router.weight",
                           "optim.v.mlp.b1", "optim.m.gmoe.experts.w1"}) {
    INFO(name);
    REQUIRE(file.contains(name));
    CHECK(file.info(name).dtype == dt);
  }
  CHECK_FALSE(file.contains("optim.m.gmoe.router.bias"));  // a buffer has no optimizer state
  CHECK(file.info("optim.step").dtype == Dtype::i64);
  CHECK(file.info("optim.step").shape.empty());
  CHECK(file.read<std::int64_t>("optim.step")[0] == 3);
  CHECK(file.metadata().at("format") == "smoe.checkpoint");
  CHECK(file.metadata().at("format_version") == "1");
  CHECK(file.metadata().at("optimizer") == "AdamW");
  CHECK(file.metadata().at("counter.step") == "3");
  CHECK(file.metadata().at("counter.data_position") == std::to_string(3 * net_tokens));
  CHECK(file.metadata().at("counter.moe.router.step") == "3");
  CHECK(std::stod(file.metadata().at("optim.weight_decay")) == 0.1);
  CHECK(file.size() == 3 * 12 + 1 + 1);  // 12 parameters, their m and v, 1 buffer, optim.step

  Run<T> b(77);  // other weights, a fresh optimizer, other counters
  b.train_step();
  Counters restored{{"step", 0}, {"data_position", 0}, {"moe.router.step", 0}};
  io::load_checkpoint(path, b.net, b.opt, restored);
  CHECK(restored == saved);
  zero_grad(a.net);  // gradients are not part of a checkpoint
  zero_grad(b.net);
  CHECK(snapshot(b.net, b.opt, restored) == snapshot(a.net, a.opt, saved));

  // Weights only: the optimizer state is unexpected unless allowed.
  Net<T> weights_only(5);
  check_message(error_of([&] { io::load_checkpoint(path, weights_only); }),
                {"unexpected tensor 'optim.", "no optimizer was given", "allow_extra"});
  io::load_checkpoint(path, weights_only, {.allow_extra = true});
  const AdamW<T> unused;
  zero_grad(weights_only);
  auto s1 = snapshot(weights_only, unused), s2 = snapshot(a.net, unused);
  CHECK(s1 == s2);

  // Saving without an optimizer, then loading into a model with counters.
  io::save_checkpoint(path, a.net, Counters{{"step", 42}});
  Counters only_step{{"step", 0}};
  io::load_checkpoint(path, weights_only, only_step);
  CHECK(only_step.at("step") == 42);
}

TEST_CASE("a resumed run continues the loss trajectory bit-identically", "[io][checkpoint]") {
  using T = float;
  const int total = 8, k = 4;
  Run<T> uninterrupted(3);
  std::vector<double> expected;
  for (int s = 0; s < total; ++s) expected.push_back(uninterrupted.train_step());

  const auto path = scratch_dir() / "resume.safetensors";
  {
    Run<T> first(3);
    for (int s = 0; s < k; ++s) CHECK(first.train_step() == expected[s]);
    io::save_checkpoint(path, first.net, first.opt, first.counters());
  }  // the first process ends

  Run<T> resumed(12345);  // freshly constructed with other weights
  Counters c = resumed.counters();
  io::load_checkpoint(path, resumed.net, resumed.opt, c);
  resumed.apply(c);
  CHECK(resumed.step == std::uint64_t(k));
  for (int s = k; s < total; ++s) {
    INFO("step " << s);
    CHECK(resumed.train_step() == expected[s]);  // bit-identical, not approximately equal
  }
  CHECK(snapshot(resumed.net, resumed.opt) == snapshot(uninterrupted.net, uninterrupted.opt));

  // The control: the same resume without restoring the router's step counter draws other
  // expert-dropout masks, so the test above would notice a checkpoint that lost it.
  Run<T> forgetful(12345);
  Counters c2 = forgetful.counters();
  io::load_checkpoint(path, forgetful.net, forgetful.opt, c2);
  forgetful.step = c2.at("step");
  forgetful.position = c2.at("data_position");
  bool differs = false;
  for (int s = k; s < total; ++s) differs = differs || forgetful.train_step() != expected[s];
  CHECK(differs);
}

TEST_CASE("a corrupted checkpoint throws, naming the problem, and changes nothing", "[io][checkpoint]") {
  using T = float;
  Run<T> source(1);
  source.train_step();
  source.train_step();
  const auto good_path = scratch_dir() / "good.safetensors";
  io::save_checkpoint(good_path, source.net, source.opt, source.counters());
  const Bytes good = read_bytes(good_path);

  Run<T> target(2);  // the state that must survive every failed load
  target.train_step();
  Counters counters = target.counters();
  const Snapshot before = snapshot(target.net, target.opt, counters);
  const auto bad_path = scratch_dir() / "bad.safetensors";

  auto load_bytes = [&](const Bytes& bytes, io::LoadOptions options = {}) {
    write_bytes(bad_path, bytes);
    const std::string message = error_of([&] { io::load_checkpoint(bad_path, target.net, target.opt, counters, options); });
    CHECK(snapshot(target.net, target.opt, counters) == before);
    return message;
  };
  auto drop = [](const char* dropped) {
    return [dropped](const std::string& name, SafetensorsWriter&) { return name == dropped; };
  };
  auto keep = [](const std::string&, SafetensorsWriter&) { return false; };

  SECTION("missing parameter") {
    check_message(load_bytes(rebuild(good, drop("mlp.w2"))),
                  {"load_checkpoint('", "bad.safetensors", "missing tensor 'mlp.w2'", "parameter", "F32 [8, 6]"});
  }
  SECTION("missing buffer") {
    check_message(load_bytes(rebuild(good, drop("gmoe.router.bias"))),
                  {"missing tensor 'gmoe.router.bias'", "buffer", "F32 [4]"});
  }
  SECTION("missing optimizer state") {
    check_message(load_bytes(rebuild(good, drop("optim.v.moe.experts.w1"))),
                  {"missing tensor 'optim.v.moe.experts.w1'", "second moment", "'moe.experts.w1'", "F32 [4, 6, 5]",
                   "without the optimizer"});
    check_message(load_bytes(rebuild(good, drop("optim.step"))), {"missing tensor 'optim.step'"});
  }
  SECTION("wrong shape") {
    auto edit = [](const std::string& name, SafetensorsWriter& w) {
      if (name != "mlp.b1") return false;
      Tensor<float> t({9});
      t.zero();
      w.add(name, t);
      return true;
    };
    check_message(load_bytes(rebuild(good, edit)), {"tensor 'mlp.b1'", "shape must be [8], got [9]"});
  }
  SECTION("wrong dtype") {
    auto edit = [&](const std::string& name, SafetensorsWriter& w) {
      if (name != "moe.router.weight" && name != "optim.step") return false;
      const auto f = SafetensorsFile::parse(good);
      if (name == "optim.step")
        w.add(name, f.read_as<std::int32_t>(name));
      else
        w.add(name, f.read_as<double>(name));
      return true;
    };
    check_message(load_bytes(rebuild(good, edit)), {"tensor 'moe.router.weight'", "dtype must be F32, got F64"});
    auto step_only = [&](const std::string& name, SafetensorsWriter& w) { return name == "optim.step" && edit(name, w); };
    check_message(load_bytes(rebuild(good, step_only)), {"tensor 'optim.step'", "dtype must be I64, got I32"});
  }
  SECTION("truncated file") {
    Bytes cut(good.begin(), good.end() - 10);
    check_message(load_bytes(cut), {"load_checkpoint", "run past the data buffer"});
    check_message(load_bytes(Bytes(good.begin(), good.begin() + 5)), {"truncated"});
    check_message(load_bytes(Bytes(good.begin(), good.begin() + 100)), {"header length", "past the end"});
    check_message(load_bytes(Bytes{}), {"truncated"});
  }
  SECTION("garbage header") {
    Bytes garbage = good;
    for (std::size_t i = 9; i < 40; ++i) garbage[i] = std::uint8_t('#');
    check_message(load_bytes(garbage), {"load_checkpoint", "not valid JSON"});
    garbage = good;
    garbage[8] = '[';
    check_message(load_bytes(garbage), {"must start with '{'"});
  }
  SECTION("unexpected extra tensor") {
    auto extra = [](SafetensorsWriter& w) {
      Tensor<float> t({2});
      t.zero();
      w.add("mlp.extra", t);
    };
    const Bytes with_extra = rebuild(good, keep, {}, extra);
    check_message(load_bytes(with_extra), {"unexpected tensor 'mlp.extra'", "F32 [2]", "no parameter or buffer"});
    write_bytes(bad_path, with_extra);
    io::load_checkpoint(bad_path, target.net, target.opt, counters, {.allow_extra = true});
    CHECK(snapshot(target.net, target.opt, counters) != before);  // allowed: it loaded
  }
  SECTION("counters: missing, malformed, unexpected") {
    auto set = [](std::string key, std::string value) {
      return [key, value](std::map<std::string, std::string>& m) {
        if (value.empty())
          m.erase(key);
        else
          m[key] = value;
      };
    };
    check_message(load_bytes(rebuild(good, keep, set("counter.data_position", ""))),
                  {"missing counter 'data_position'"});
    for (const char* bad : {"12x", "-3", "+4", " 5", "18446744073709551616"}) {
      INFO(bad);
      check_message(load_bytes(rebuild(good, keep, set("counter.step", bad))),
                    {"counter 'step'", "decimal integer", bad});
    }
    check_message(load_bytes(rebuild(good, keep, set("counter.epoch", "2"))), {"unexpected counter 'epoch'", "allow_extra"});
  }
  SECTION("another format or version") {
    auto set_version = [](std::map<std::string, std::string>& m) { m["format_version"] = "2"; };
    check_message(load_bytes(rebuild(good, keep, set_version)), {"format_version", "'1'", "got '2'"});
    auto set_optimizer = [](std::map<std::string, std::string>& m) { m["optimizer"] = "SGD"; };
    check_message(load_bytes(rebuild(good, keep, set_optimizer)), {"SGD", "AdamW"});
  }
  SECTION("a checkpoint of another model") {
    // The same names with a smaller MLP: every mismatch is caught before anything is copied.
    DenseMLP<T> small({.d_model = net_d, .hidden = 7, .bias = true});
    const auto path = scratch_dir() / "mlp.safetensors";
    io::save_checkpoint(path, small);
    const std::string message = error_of([&] { io::load_checkpoint(path, target.net, target.opt, counters); });
    check_message(message, {"missing tensor 'moe.router.weight'"});
    CHECK(snapshot(target.net, target.opt, counters) == before);
  }
  SECTION("no such file") {
    const std::string message =
        error_of([&] { io::load_checkpoint(scratch_dir() / "absent.safetensors", target.net, target.opt, counters); });
    check_message(message, {"load_checkpoint", "absent.safetensors", "cannot open"});
    CHECK(snapshot(target.net, target.opt, counters) == before);
  }
}

namespace {
struct Clash {
  Parameter<float> a{std::vector<index_t>{2}};
  Tensor<float> buffer{2};
  std::string buffer_name = "a";
  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("a"), a);
  }
  template <class F>
  void for_each_buffer(F&& f) {
    f(std::string_view(buffer_name), buffer);
  }
};
}  // namespace

TEST_CASE("saving is atomic and refuses ambiguous names", "[io][checkpoint]") {
  Run<float> run(1);
  run.train_step();
  const auto path = scratch_dir() / "atomic.safetensors";
  io::save_checkpoint(path, run.net, run.opt, run.counters());
  const Bytes first = read_bytes(path);

  // A save that fails before writing (names clash) or while writing (the temporary cannot be
  // created) leaves the previous checkpoint in place.
  Clash clash;
  clash.buffer.zero();
  check_message(error_of([&] { io::save_checkpoint(path, clash); }),
                {"save_checkpoint('", "two tensors named 'a'", "parameter", "buffer"});
  clash.buffer_name = "optim.m.a";
  check_message(error_of([&] { io::save_checkpoint(path, clash); }), {"'optim.m.a'", "reserved"});
  std::filesystem::create_directory(path.string() + ".tmp");
  run.train_step();
  check_message(error_of([&] { io::save_checkpoint(path, run.net, run.opt, run.counters()); }),
                {"save_checkpoint", "cannot open", ".tmp"});
  CHECK(read_bytes(path) == first);
  std::filesystem::remove(path.string() + ".tmp");

  // A successful save replaces the file and leaves no temporary behind.
  io::save_checkpoint(path, run.net, run.opt, run.counters());
  CHECK(read_bytes(path) != first);
  CHECK_FALSE(std::filesystem::exists(path.string() + ".tmp"));

  // An optimizer that belongs to another model is refused.
  DenseMLP<float> mlp({.d_model = 2, .hidden = 2});
  check_message(error_of([&] { io::save_checkpoint(path, mlp, run.opt); }),
                {"optimizer holds state for parameter", "which the model does not have"});
  check_message(error_of([&] { io::save_checkpoint(scratch_dir() / "no" / "such" / "dir.safetensors", mlp); }),
                {"cannot open"});
}
