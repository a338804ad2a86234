// smoe/interop/torch.hpp (and dlpack.hpp with libtorch): the TorchLayer module against smoe's own
// layers (bit for bit), against central differences in float64 (gradcheck) for three routers with
// their aux losses, torch's AdamW against smoe::AdamW, shared storage both ways, save/load, the
// errors, and the DLPack round trip through at::toDLPack / at::fromDLPack.
//
// libtorch's C++ API has no torch::autograd::gradcheck (it is Python's), so gradcheck below is the
// same check written out: central differences (eps 1e-6) of the module's float64 forward against
// its autograd gradients, for x and every parameter, with Python's default tolerances.
#include <smoe/interop/torch.hpp>  // first: the header compiles on its own

#include <ATen/DLConvertor.h>
#include <torch/optim/adamw.h>
#include <torch/serialize.h>

// glog (through c10) and Catch2 both define CHECK: the tests mean Catch2's.
#undef CHECK

#include <smoe/interop/dlpack.hpp>
#include <smoe/smoe.hpp>

#include <sstream>

#include "catch.hpp"
#include "helpers.hpp"

using namespace smoe;

namespace {

constexpr index_t d = 6, E = 5, K = 2, G = 4, tokens = 9;

template <class T>
using SigmaMoE = MoE<SigmoidTopK<T>, ReluExperts<T>, WeightedSum<T>, EntropyLoss<T>, RouterZLoss<T>>;

template <class T>
SigmaMoE<T> make_sigma_moe(std::uint64_t seed = 42) {
  SigmaMoE<T> layer(SigmoidTopK<T>({.d_model = d, .experts = E, .k = K}),
                    ReluExperts<T>({.d_model = d, .experts = E, .hidden = G, .bias = true}), WeightedSum<T>{},
                    EntropyLoss<T>(0.3), RouterZLoss<T>(0.05));
  sigma_moe_init(layer, {.seed = seed});
  return layer;
}

// Every parameter N(0, std²) from a seed (gradient checks want biases away from zero too).
template <class L>
void randomize_parameters(L& layer, std::uint64_t seed, double std = 0.5) {
  layer.for_each_parameter([&](std::string_view, auto& p) { test::randomize(p.value, seed++, std); });
}

torch::Tensor random_tensor(torch::IntArrayRef shape, torch::Dtype dtype, std::uint64_t seed) {
  torch::Tensor t = torch::empty(shape, torch::TensorOptions().dtype(torch::kFloat64));
  double* p = t.data_ptr<double>();
  for (index_t i = 0; i < t.numel(); ++i) p[i] = standard_normal(seed, std::uint64_t(i), 5);
  return t.to(dtype);
}

// The torch tensor's elements as doubles (contiguous order).
std::vector<double> values(const torch::Tensor& t) {
  const torch::Tensor c = t.detach().to(torch::kFloat64).contiguous();
  return {c.data_ptr<double>(), c.data_ptr<double>() + c.numel()};
}

// The gradient check: loss = Σ y ⊙ w + aux_weight · aux (aux_weight 0: aux left out of the loss).
template <class M>
void gradcheck(M& module, double aux_weight, std::uint64_t seed) {
  module->eval();
  const torch::Tensor x0 = random_tensor({tokens, d}, torch::kFloat64, seed);
  const torch::Tensor w = random_tensor({tokens, d}, torch::kFloat64, seed + 1);
  auto objective = [&](const torch::Tensor& x) {
    torch::NoGradGuard no_grad;
    const TorchLayerOutput o = module->forward(x);
    return (o.y * w).sum().template item<double>() + aux_weight * o.aux_loss.template item<double>();
  };
  module->zero_grad();
  torch::Tensor x = x0.clone().requires_grad_(true);
  const TorchLayerOutput o = module->forward(x);
  torch::Tensor loss = (o.y * w).sum();
  if (aux_weight != 0) loss = loss + aux_weight * o.aux_loss;
  loss.backward();

  const double eps = 1e-6, atol = 1e-5, rtol = 1e-3;  // torch.autograd.gradcheck's defaults
  auto compare = [&](const char* what, torch::Tensor target, const torch::Tensor& analytic) {
    REQUIRE(analytic.defined());
    const std::vector<double> a = values(analytic);
    double* v = target.data_ptr<double>();
    for (index_t i = 0; i < target.numel(); ++i) {
      const double saved = v[i];
      v[i] = saved + eps;
      const double plus = objective(x0);
      v[i] = saved - eps;
      const double minus = objective(x0);
      v[i] = saved;
      const double numeric = (plus - minus) / (2 * eps);
      INFO(what << "[" << i << "]: autograd " << a[i] << ", central difference " << numeric);
      CHECK(std::abs(a[i] - numeric) <= atol + rtol * std::abs(numeric));
    }
  };
  torch::Tensor xs = x0;  // objective reads x0: perturb it in place
  compare("x", xs, x.grad());
  torch::NoGradGuard no_grad;
  for (auto& p : module->named_parameters()) compare(p.key().c_str(), p.value(), p.value().grad());
}

}  // namespace

TEST_CASE("TorchLayer gradients match central differences (gradcheck, float64) with the aux loss",
          "[torch][grad]") {
  const double aux_weight = GENERATE(1.0, 0.5, 0.0);  // 1: one backward; else the aux term's second
  INFO("aux weight " << aux_weight);
  SECTION("sigmoid top-k, entropy and z losses") {
    auto layer = make_sigma_moe<double>();
    randomize_parameters(layer, 7);
    auto module = make_torch_layer(std::move(layer));
    gradcheck(module, aux_weight, 11);
  }
  SECTION("softmax top-k with renormalization, switch and z losses") {
    MoE layer(TopKRouter<double, SoftmaxGate>({.d_model = d, .experts = E, .k = K}, SoftmaxGate{.renormalize = true}),
              ReluExperts<double>({.d_model = d, .experts = E, .hidden = G, .bias = true}), WeightedSum<double>{},
              SwitchBalanceLoss<double>(0.2), RouterZLoss<double>(0.1));
    randomize_parameters(layer, 17);
    auto module = make_torch_layer(std::move(layer));
    gradcheck(module, aux_weight, 21);
  }
  SECTION("expert choice, z and importance losses") {
    MoE layer(ExpertChoiceRouter<double>({.d_model = d, .experts = E, .capacity_factor = 2.0}),
              ReluExperts<double>({.d_model = d, .experts = E, .hidden = G, .bias = true}), WeightedSum<double>{},
              RouterZLoss<double>(0.2), ImportanceLoss<double>(0.3));
    randomize_parameters(layer, 27);
    auto module = make_torch_layer(std::move(layer));
    gradcheck(module, aux_weight, 31);
  }
}

TEST_CASE("TorchLayer equals smoe's own layer bit for bit, forward and backward", "[torch]") {
  SigmaMoE<float> reference = make_sigma_moe<float>();
  auto module = make_torch_layer(make_sigma_moe<float>());
  const bool strided = GENERATE(false, true);  // a non-contiguous x is made contiguous first
  INFO("non-contiguous x: " << strided);
  torch::Tensor x = random_tensor({tokens, d}, torch::kFloat32, 3);
  if (strided) x = random_tensor({d, tokens}, torch::kFloat32, 3).t();
  const torch::Tensor dy = random_tensor({tokens, d}, torch::kFloat32, 4);
  REQUIRE(x.is_contiguous() == !strided);

  // smoe alone, on the same values (contiguous copies), Mode::train as torch's default training mode.
  Tensor<float> xs({tokens, d}), ys({tokens, d}), dys({tokens, d}), dxs({tokens, d});
  const torch::Tensor xc = x.contiguous(), dyc = dy.contiguous();
  std::copy_n(xc.data_ptr<float>(), xs.size(), xs.data());
  std::copy_n(dyc.data_ptr<float>(), dys.size(), dys.data());
  const MoEOutput<float> out = reference.forward(xs.matrix(), ys.matrix(), Mode::train);
  zero_grad(reference);
  reference.backward(dys.matrix(), dxs.matrix());

  REQUIRE(module->is_training());
  module->zero_grad();
  torch::Tensor xg = x.detach().requires_grad_(true);
  const TorchLayerOutput o = module->forward(xg);
  ((o.y * dy).sum() + o.aux_loss).backward();

  REQUIRE(o.y.sizes() == x.sizes());
  REQUIRE(o.aux_loss.dim() == 0);
  CHECK(o.aux_loss.item<float>() == out.aux_loss);
  const std::vector<float> y(o.y.data_ptr<float>(), o.y.data_ptr<float>() + o.y.numel());
  CHECK(std::equal(y.begin(), y.end(), ys.data()));
  const torch::Tensor dx = xg.grad().contiguous();
  CHECK(std::equal(dx.data_ptr<float>(), dx.data_ptr<float>() + dx.numel(), dxs.data()));
  std::map<std::string, const Parameter<float>*> smoe_parameters;
  reference.for_each_parameter([&](std::string_view n, Parameter<float>& p) { smoe_parameters[std::string(n)] = &p; });
  const auto named = module->named_parameters();
  REQUIRE(named.size() == smoe_parameters.size());
  for (const auto& p : named) {
    INFO("parameter " << p.key());
    REQUIRE(smoe_parameters.count(p.key()) == 1);
    const Parameter<float>& q = *smoe_parameters[p.key()];
    const torch::Tensor g = p.value().grad();
    CHECK(std::equal(g.data_ptr<float>(), g.data_ptr<float>() + g.numel(), q.grad.data()));
  }
  // Routing statistics of the last forward.
  REQUIRE(module->routing_stats().size() == 1);
  CHECK(module->routing_stats()[0].tokens_per_expert == out.stats.tokens_per_expert);
  CHECK(module->routing_stats()[0].assignments == tokens * K);
}

TEST_CASE("TorchLayer over a TransformerBlock: [B, L, d] sequences, equal to the smoe block", "[torch]") {
  using Block = TransformerBlock<CausalSelfAttention<float>, SigmaMoE<float>>;
  auto make_block = [] { return Block(CausalSelfAttention<float>({.d_model = d, .heads = 3}), make_sigma_moe<float>()); };
  Block reference = make_block();
  randomize_parameters(reference, 50, 0.3);
  Block wrapped = make_block();
  randomize_parameters(wrapped, 50, 0.3);
  auto module = make_torch_layer(std::move(wrapped));
  const index_t B = 2, L = 4;
  const torch::Tensor x = random_tensor({B, L, d}, torch::kFloat32, 8);
  const torch::Tensor dy = random_tensor({B, L, d}, torch::kFloat32, 9);
  Tensor<float> xs({B * L, d}), ys({B * L, d}), dys({B * L, d}), dxs({B * L, d});
  std::copy_n(x.data_ptr<float>(), xs.size(), xs.data());
  std::copy_n(dy.data_ptr<float>(), dys.size(), dys.data());
  const auto out = reference.forward(xs.matrix(), ys.matrix(), B, Mode::train);
  reference.backward(dys.matrix(), dxs.matrix());

  torch::Tensor xg = x.clone().requires_grad_(true);
  const TorchLayerOutput o = module->forward(xg);
  ((o.y * dy).sum() + o.aux_loss).backward();
  CHECK(o.aux_loss.item<float>() == out.aux_loss);
  CHECK(std::equal(o.y.data_ptr<float>(), o.y.data_ptr<float>() + o.y.numel(), ys.data()));
  CHECK(std::equal(xg.grad().data_ptr<float>(), xg.grad().data_ptr<float>() + xg.numel(), dxs.data()));
  const auto named = module->named_parameters();
  CHECK(named.contains("ffn.router.weight"));
  CHECK(named.contains("attn_norm.weight"));
  CHECK(module->routing_stats().size() == 1);
  REQUIRE_THROWS_WITH(module->forward(torch::zeros({B * L, d})),
                      Catch::Contains("TorchLayer: x must be [B, L, d_model = 6] (sequences, positions, features), got [8, 6]"));
}

namespace {
// Forward and backward through the module and through a twin smoe layer: outputs, aux loss, dx and
// every named gradient bit-equal; returns the module's parameter names.
template <class L>
std::vector<std::string> check_against_twin(L reference, L twin) {
  auto module = make_torch_layer(std::move(twin));
  const torch::Tensor x = random_tensor({tokens, d}, torch::kFloat32, 13), dy = random_tensor({tokens, d}, torch::kFloat32, 14);
  Tensor<float> xs({tokens, d}), ys({tokens, d}), dys({tokens, d}), dxs({tokens, d});
  std::copy_n(x.data_ptr<float>(), xs.size(), xs.data());
  std::copy_n(dy.data_ptr<float>(), dys.size(), dys.data());
  float aux = 0;
  if constexpr (requires { reference.forward(xs.matrix(), ys.matrix(), Mode::train).aux_loss; })
    aux = reference.forward(xs.matrix(), ys.matrix(), Mode::train).aux_loss;
  else
    reference.forward(xs.matrix(), ys.matrix());
  reference.backward(dys.matrix(), dxs.matrix());
  torch::Tensor xg = x.clone().requires_grad_(true);
  const TorchLayerOutput o = module->forward(xg);
  ((o.y * dy).sum() + o.aux_loss).backward();
  CHECK(o.aux_loss.item<float>() == aux);
  CHECK(std::equal(o.y.data_ptr<float>(), o.y.data_ptr<float>() + o.y.numel(), ys.data()));
  CHECK(std::equal(xg.grad().data_ptr<float>(), xg.grad().data_ptr<float>() + xg.numel(), dxs.data()));
  std::map<std::string, const Parameter<float>*> grads;
  for_each_layer_parameter(reference, [&](std::string_view n, Parameter<float>& p) { grads[std::string(n)] = &p; });
  std::vector<std::string> names;
  for (const auto& p : module->named_parameters()) {
    INFO("parameter " << p.key());
    names.push_back(p.key());
    REQUIRE(grads.count(p.key()) == 1);
    const torch::Tensor g = p.value().grad();
    CHECK(std::equal(g.data_ptr<float>(), g.data_ptr<float>() + g.numel(), grads[p.key()]->grad.data()));
  }
  CHECK(names.size() == grads.size());
  return names;
}
}  // namespace

TEST_CASE("TorchLayer over a MoEStack, a ResidualMoE and a DenseMLP equals smoe's own", "[torch]") {
  SECTION("a two-layer stack: names layers.{l}.…, one routing statistic per layer") {
    auto make = [] { return MoEStack<SigmaMoE<float>>(2, [](index_t l) { return make_sigma_moe<float>(10 + l); }); };
    const auto names = check_against_twin(make(), make());
    CHECK(std::find(names.begin(), names.end(), "layers.1.router.weight") != names.end());
    auto module = make_torch_layer(make());
    module->forward(random_tensor({tokens, d}, torch::kFloat32, 1));
    CHECK(module->routing_stats().size() == 2);
  }
  SECTION("PR-MoE residual expert") {
    auto make = [] { return ResidualMoE<SigmaMoE<float>>(make_sigma_moe<float>(), {.hidden = 5, .bias = true}); };
    ResidualMoE<SigmaMoE<float>> a = make(), b = make();
    randomize_parameters(a, 90, 0.3);
    randomize_parameters(b, 90, 0.3);
    const auto names = check_against_twin(std::move(a), std::move(b));
    CHECK(std::find(names.begin(), names.end(), "residual.w1") != names.end());
  }
  SECTION("a dense MLP: no aux loss, no routing statistics") {
    auto make = [] {
      DenseMLP<float> mlp({.d_model = d, .hidden = 7, .bias = true});
      dense_init(mlp, {.seed = 4});
      return mlp;
    };
    check_against_twin(make(), make());
    auto module = make_torch_layer(make());
    const TorchLayerOutput o = module->forward(random_tensor({tokens, d}, torch::kFloat32, 1));
    CHECK(o.aux_loss.item<float>() == 0.0f);
    CHECK(module->routing_stats().empty());
  }
}

TEST_CASE("one torch::optim::AdamW step equals smoe::AdamW within 1e-6", "[torch][adamw]") {
  SigmaMoE<float> reference = make_sigma_moe<float>();
  auto module = make_torch_layer(make_sigma_moe<float>());
  const double lr = 1e-2, wd = 0.1;
  torch::optim::AdamW torch_adamw(module->parameters(),
                                  torch::optim::AdamWOptions(lr).betas({0.9, 0.999}).eps(1e-8).weight_decay(wd));
  AdamW<float> smoe_adamw({.lr = lr, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = wd});
  Tensor<float> xs({tokens, d}), ys({tokens, d}), dys({tokens, d}), dxs({tokens, d});
  for (int step = 0; step < 2; ++step) {  // two steps: the bias corrections at t = 2 too
    const torch::Tensor x = random_tensor({tokens, d}, torch::kFloat32, 60 + step);
    const torch::Tensor dy = random_tensor({tokens, d}, torch::kFloat32, 70 + step);
    std::copy_n(x.data_ptr<float>(), xs.size(), xs.data());
    std::copy_n(dy.data_ptr<float>(), dys.size(), dys.data());
    reference.forward(xs.matrix(), ys.matrix(), Mode::train);
    zero_grad(reference);
    reference.backward(dys.matrix(), dxs.matrix());
    smoe_adamw.step(reference);

    torch_adamw.zero_grad();
    const TorchLayerOutput o = module->forward(x);
    ((o.y * dy).sum() + o.aux_loss).backward();
    torch_adamw.step();
  }
  std::map<std::string, const Parameter<float>*> smoe_parameters;
  reference.for_each_parameter([&](std::string_view n, Parameter<float>& p) { smoe_parameters[std::string(n)] = &p; });
  for (const auto& p : module->named_parameters()) {
    INFO("parameter " << p.key());
    test::require_close(values(p.value()), smoe_parameters.at(p.key())->value, 0.0, 1e-6, p.key().c_str());
  }
}

TEST_CASE("TorchLayer parameters share storage with smoe's, both directions", "[torch]") {
  auto module = make_torch_layer(make_sigma_moe<float>());
  Parameter<float>* w1 = nullptr;
  module->layer().for_each_parameter([&](std::string_view n, Parameter<float>& p) {
    if (n == "experts.w1") w1 = &p;
  });
  REQUIRE(w1 != nullptr);
  torch::Tensor p = module->named_parameters()["experts.w1"];
  CHECK(p.data_ptr() == static_cast<void*>(w1->value.data()));
  CHECK(p.grad().data_ptr() == static_cast<void*>(w1->grad.data()));
  CHECK(p.sizes() == torch::IntArrayRef(w1->value.shape()));
  {
    torch::NoGradGuard no_grad;
    p.fill_(3.5f);  // torch → smoe
  }
  CHECK(w1->value[0] == 3.5f);
  CHECK(w1->value[w1->value.size() - 1] == 3.5f);
  w1->value[1] = -2.0f;  // smoe → torch
  w1->grad[2] = 4.0f;
  CHECK(p.flatten()[1].item<float>() == -2.0f);
  CHECK(p.grad().flatten()[2].item<float>() == 4.0f);

  // zero_grad(set_to_none) drops torch's .grad(); the next backward re-attaches the shared one.
  module->zero_grad(/*set_to_none=*/true);
  CHECK(!p.grad().defined());
  const TorchLayerOutput o = module->forward(random_tensor({tokens, d}, torch::kFloat32, 5));
  (o.y.sum() + o.aux_loss).backward();
  REQUIRE(p.grad().defined());
  CHECK(p.grad().data_ptr() == static_cast<void*>(w1->grad.data()));
  CHECK(p.grad().abs().sum().item<float>() > 0);
  // A frozen parameter gets no .grad(), so torch's optimizers leave it alone.
  torch::Tensor router = module->named_parameters()["router.weight"];
  router.requires_grad_(false);
  const torch::Tensor before = router.clone();
  torch::optim::AdamW frozen(module->parameters(), torch::optim::AdamWOptions(0.1));
  frozen.zero_grad();
  const TorchLayerOutput o2 = module->forward(random_tensor({tokens, d}, torch::kFloat32, 6));
  (o2.y.sum() + o2.aux_loss).backward();
  frozen.step();
  CHECK(!router.grad().defined());
  CHECK(torch::equal(router, before));
  CHECK(!torch::equal(p, p.detach().clone().fill_(3.5f)));  // w1 trained (it was all 3.5 but two)
  router.requires_grad_(true);
  // The wrappers keep the layer alive: a parameter outlives its module.
  torch::Tensor kept = module->named_parameters()["router.weight"];
  const float first = kept.flatten()[0].item<float>();
  module = nullptr;
  CHECK(kept.flatten()[0].item<float>() == first);
}

TEST_CASE("torch::save / torch::load round-trip a TorchLayer, keeping the shared storage", "[torch]") {
  auto saved = make_torch_layer(make_sigma_moe<float>(1));
  auto loaded = make_torch_layer(make_sigma_moe<float>(2));
  std::stringstream file;
  torch::save(saved, file);
  const torch::Tensor x = random_tensor({tokens, d}, torch::kFloat32, 6);
  CHECK(!torch::equal(saved->forward(x).y, loaded->forward(x).y));
  torch::load(loaded, file);
  for (const auto& p : saved->named_parameters()) {
    INFO("parameter " << p.key());
    CHECK(torch::equal(p.value(), loaded->named_parameters()[p.key()]));
  }
  CHECK(torch::equal(saved->forward(x).y, loaded->forward(x).y));
  loaded->layer().for_each_parameter([&](std::string_view n, Parameter<float>& p) {
    CHECK(loaded->named_parameters()[std::string(n)].data_ptr() == static_cast<void*>(p.value.data()));
  });
}

TEST_CASE("TorchLayer: NoGradGuard builds no graph; stale backward, dtype, device, shape errors", "[torch][errors]") {
  auto module = make_torch_layer(make_sigma_moe<float>());
  const torch::Tensor x = random_tensor({3, tokens, d}, torch::kFloat32, 9);  // any leading dims
  {
    torch::NoGradGuard no_grad;
    const TorchLayerOutput o = module->forward(x.requires_grad_(true));
    CHECK(!o.y.requires_grad());
    CHECK(!o.y.grad_fn());
    CHECK(o.y.sizes() == x.sizes());
  }
  using Catch::Contains;
  const TorchLayerOutput first = module->forward(x);
  REQUIRE(first.y.grad_fn());
  module->forward(x);  // the layer's caches now belong to this forward
  REQUIRE_THROWS_WITH(first.y.sum().backward(), Contains("TorchLayer: backward of a forward that is not the layer's last"));
  REQUIRE_THROWS_WITH(module->forward(x.to(torch::kFloat64)),
                      Contains("TorchLayer: x dtype must be Float (the layer's scalar type), got Double"));
  REQUIRE_THROWS_WITH(module->forward(torch::empty({2, d}, torch::TensorOptions().device(torch::kMeta))),
                      Contains("TorchLayer: x device must be cpu, got meta"));
  REQUIRE_THROWS_WITH(module->forward(torch::zeros({4, d + 1})), Contains("x must be [..., d_model = 6], got [4, 7]"));
  REQUIRE_THROWS_WITH(module->forward(torch::Tensor()), Contains("x must be a tensor, got an undefined one"));
  REQUIRE_THROWS_WITH(module->to(torch::kFloat64), Contains("TorchLayer: to(Double) is not supported"));
  REQUIRE_NOTHROW(module->to(torch::kFloat32));
}

TEST_CASE("docs/interop.md: a torch MLP swapped for a smoe MoE layer trains", "[torch][docs]") {
  torch::manual_seed(3);
  // example-begin interop_swap
  // Before: torch::nn::Sequential ffn(torch::nn::Linear(d, 4 * d), torch::nn::ReLU(), torch::nn::Linear(4 * d, d));
  using SigmaMoE = smoe::MoE<smoe::SigmoidTopK<float>, smoe::ReluExperts<float>, smoe::WeightedSum<float>,
                             smoe::EntropyLoss<float>>;
  SigmaMoE moe(smoe::SigmoidTopK<float>({.d_model = d, .experts = 8, .k = 2}),
               smoe::ReluExperts<float>({.d_model = d, .experts = 8, .hidden = d / 2}), smoe::WeightedSum<float>{},
               smoe::EntropyLoss<float>(0.001));
  smoe::sigma_moe_init(moe, {.seed = 1});
  smoe::TorchLayer<SigmaMoE> ffn(std::move(moe));  // a torch module: register_module("ffn", ffn) in yours

  torch::optim::AdamW optimizer(ffn->parameters(), torch::optim::AdamWOptions(1e-2));
  torch::Tensor x = torch::randn({4, 16, d});  // any leading dimensions; float32 on the CPU
  auto [y, aux_loss] = ffn->forward(x);        // y: x's shape; aux_loss: a 0-d tensor in autograd
  torch::Tensor loss = torch::mse_loss(y, torch::tanh(x)) + aux_loss;  // aux with weight 1: one backward
  optimizer.zero_grad();
  loss.backward();  // smoe's backward: x.grad (if x requires it) and every parameter's .grad()
  optimizer.step();
  const smoe::RoutingStats& stats = ffn->routing_stats().at(0);  // tokens per expert, entropy, drops
  // example-end interop_swap
  CHECK(stats.assignments == 4 * 16 * 2);
  CHECK(y.sizes() == x.sizes());
  double first = loss.item<double>(), last = first;
  for (int step = 0; step < 100; ++step) {
    auto [y2, aux2] = ffn->forward(x);
    torch::Tensor l = torch::mse_loss(y2, torch::tanh(x)) + aux2;
    optimizer.zero_grad();
    l.backward();
    optimizer.step();
    last = l.item<double>();
  }
  INFO("loss " << first << " -> " << last);
  CHECK(last < 0.5 * first);
}

TEST_CASE("DLPack round trip with libtorch: at::toDLPack → from_dlpack, to_dlpack → at::fromDLPack", "[torch][dlpack]") {
  SECTION("a torch tensor viewed by smoe without a copy, released once") {
    torch::Tensor t = torch::arange(12, torch::kFloat32).reshape({3, 4});
    {
      DLPackView<float> v = from_dlpack<float>(at::toDLPack(t), "t");
      CHECK(v.view().data == t.data_ptr<float>());
      CHECK((v.view().rows == 3 && v.view().cols == 4 && v.view()(2, 1) == 9.0f));
      v.view()(0, 0) = 42.0f;
    }
    CHECK(t[0][0].item<float>() == 42.0f);
    DLManagedTensor* transposed = at::toDLPack(t.t());
    REQUIRE_THROWS_WITH(from_dlpack<float>(transposed, "t"), Catch::Contains("t last dimension must be contiguous"));
    transposed->deleter(transposed);  // refused: still ours
    DLManagedTensor* doubles = at::toDLPack(t.to(torch::kFloat64));
    REQUIRE_THROWS_WITH(from_dlpack<float>(doubles, "t"), Catch::Contains("t dtype must be float32, got float64"));
    doubles->deleter(doubles);
  }
  SECTION("a smoe tensor in torch without a copy, kept alive until torch lets go") {
    auto owner = std::make_shared<Tensor<double>>(Tensor<double>({2, 5}));
    for (index_t i = 0; i < owner->size(); ++i) (*owner)[i] = double(i);
    const std::weak_ptr<Tensor<double>> watch = owner;
    torch::Tensor t = at::fromDLPack(to_dlpack(owner->matrix(), owner));
    owner.reset();
    CHECK(t.data_ptr<double>() == watch.lock()->data());
    CHECK((t.size(0) == 2 && t.size(1) == 5 && t.scalar_type() == torch::kFloat64));
    CHECK(t[1][3].item<double>() == 8.0);
    t = torch::Tensor();
    CHECK(watch.expired());
    Tensor<float> moved({4, 2});
    moved.fill(1.5f);
    torch::Tensor u = at::fromDLPack(to_dlpack(std::move(moved)));
    CHECK(u.sum().item<float>() == 12.0f);
  }
}
