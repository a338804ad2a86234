#include "device_test_support.hpp"

// The routers beyond top-k on the device (noisy top-k, ...), each against its CPU twin: routing
// outputs, backward (d_logits, dx, every weight gradient) and a whole MoE layer.

namespace smoe_cuda_routers_test {

inline std::vector<std::int32_t> ids_of(const Tensor<std::int32_t>& t) {
  return std::vector<std::int32_t>(t.data(), t.data() + t.size());
}

// One forward and backward of a router on both sides (same parameters, same x), compared: logits,
// ids (exactly), gates; d_logits, dx and every parameter gradient, from random d_gates and d_logits.
// The device outputs are poisoned with NaN before each call. Returns the device's gates and dx
// (for bitwise comparisons across runs).
template <class HostRouter, class DeviceRouter>
std::vector<float> compare_router_step(HostRouter& host, DeviceRouter& device, const Tensor<float>& x, Mode mode,
                                       std::uint64_t seed) {
  const index_t tokens = x.dim(0), d = x.dim(1), E = host.experts(), K = host.k();
  const auto xd = to_device(x);
  Routing<float> hr;
  host.forward(x.matrix(), hr, mode);
  Routing<float, dev> dr;
  dr.logits = device_nan<float>({tokens, E});
  dr.gates = device_nan<float>({tokens, K});
  device.forward(xd.matrix(), dr, mode);
  require_close_scaled(to_host(dr.logits), hr.logits, 1e-5, "logits");
  CHECK(ids_of(to_host(dr.experts)) == ids_of(hr.experts));
  require_close_scaled(to_host(dr.gates), hr.gates, 1e-5, "gates");

  const Tensor<float> d_gates = random_matrix<float>(tokens, K, seed + 2);
  Tensor<float> d_logits = random_matrix<float>(tokens, E, seed + 3, 0.1);
  Tensor<float> dx = random_matrix<float>(tokens, d, seed + 4);
  auto d_logits_d = to_device(d_logits), dx_d = to_device(dx);
  zero_grad(host);
  zero_grad(device);
  host.backward(x.matrix(), hr, d_gates.matrix(), d_logits.matrix(), dx.matrix());
  device.backward(xd.matrix(), dr, to_device(d_gates).matrix(), d_logits_d.matrix(), dx_d.matrix());
  require_close_scaled(to_host(d_logits_d), d_logits, 1e-5, "d_logits");
  require_close_scaled(to_host(dx_d), dx, 1e-5, "dx");
  for_each_parameter_pair(host, device, [&](std::string_view name, auto& hp, auto& dp) {
    require_close_scaled(to_host(dp.grad), hp.grad, 1e-5, std::string(name) + ".grad");
  });
  std::vector<float> out;
  for (const auto& t : {to_host(dr.gates), to_host(dx_d), to_host(d_logits_d)}) out.insert(out.end(), t.data(), t.data() + t.size());
  return out;
}

inline bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  // No memcmp of an empty vector's null data (UBSan).
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

// ------------------------------------------------------------------ NoisyTopK

inline void check_noisy(NoisyTopKConfig config, Mode mode, index_t tokens, std::uint64_t seed) {
  INFO("E " << config.experts << ", k " << config.k << ", load_coef " << config.load_coef << ", tokens " << tokens
            << (mode == Mode::train ? ", train" : ", eval"));
  const index_t d = config.d_model, E = config.experts;
  NoisyTopK<float> host(config);
  NoisyTopK<float, dev> device(config);
  host.weight().value = random_matrix<float>(E, d, seed, 0.5);
  host.noise_weight().value = random_matrix<float>(E, d, seed + 1, 0.5);
  copy_parameters_to_device(host, device);
  const Tensor<float> x = random_matrix<float>(tokens, d, seed + 5);
  for (int step = 0; step < 2; ++step) {  // two steps: the noise follows the step counter
    compare_router_step(host, device, x, mode, seed + 10 * step);
    require_close_scaled(to_host(device.noisy_logits()), host.noisy_logits(), 1e-5, "noisy logits");
    CHECK(device.aux_loss() == Approx(host.aux_loss()).epsilon(1e-5).margin(1e-7));
    CHECK(device.load_loss() == Approx(host.load_loss()).epsilon(1e-5).margin(1e-7));
  }
  CHECK(device.step() == host.step());
}

// ------------------------------------------------------------------ ExpertChoiceRouter

inline void check_expert_choice(ExpertChoiceRouterConfig config, index_t tokens, std::uint64_t seed, double x_scale = 1.0) {
  INFO("E " << config.experts << ", capacity_factor " << config.capacity_factor << ", tokens " << tokens);
  const index_t d = config.d_model, E = config.experts;
  ExpertChoiceRouter<float> host(config);
  ExpertChoiceRouter<float, dev> device(config);
  host.weight().value = random_matrix<float>(E, d, seed, 0.5);
  copy_parameters_to_device(host, device);
  const Tensor<float> x = random_matrix<float>(tokens, d, seed + 5, x_scale);
  compare_router_step(host, device, x, Mode::train, seed);
}

// ------------------------------------------------------------------ SBaseRouter

inline void check_sbase(SBaseRouterConfig config, Mode mode, index_t tokens, std::uint64_t seed) {
  INFO("E " << config.experts << ", k " << config.k << ", iters " << config.sinkhorn_iters << ", tokens " << tokens
            << (mode == Mode::train ? ", train" : ", eval"));
  const index_t d = config.d_model, E = config.experts;
  SBaseRouter<float> host(config);
  SBaseRouter<float, dev> device(config);
  host.weight().value = random_matrix<float>(E, d, seed, 0.5);
  copy_parameters_to_device(host, device);
  const Tensor<float> x = random_matrix<float>(tokens, d, seed + 5, 2.0);
  compare_router_step(host, device, x, mode, seed);
  if (mode == Mode::train && config.sinkhorn_iters > 0)
    require_close_scaled(to_host(device.balanced_scores()), host.balanced_scores(), 1e-5, "balanced scores");
}

// ------------------------------------------------------------------ BaseRouter

inline void check_base(BaseRouterConfig config, Mode mode, index_t tokens, std::uint64_t seed) {
  INFO("E " << config.experts << ", tokens " << tokens << (mode == Mode::train ? ", train" : ", eval"));
  const index_t d = config.d_model, E = config.experts;
  BaseRouter<float> host(config);
  BaseRouter<float, dev> device(config);
  host.weight().value = random_matrix<float>(E, d, seed, 0.5);
  copy_parameters_to_device(host, device);
  const Tensor<float> x = random_matrix<float>(tokens, d, seed + 5);
  compare_router_step(host, device, x, mode, seed);
}


// ------------------------------------------------------------------ ProductKeyRouter

// keys and x at `scale`; integer-valued when `integer` (many exact ties at both selection stages).
inline void check_pkm_router(ProductKeyRouterConfig config, index_t tokens, std::uint64_t seed, bool integer = false) {
  INFO("N " << config.n_keys << ", H " << config.heads << ", K " << config.k << ", activation "
            << int(config.activation) << ", tokens " << tokens << (integer ? ", integer" : ""));
  ProductKeyRouter<float> host(config);
  ProductKeyRouter<float, dev> device(config);
  auto fill = [&](Tensor<float>& t, std::uint64_t s) {
    const auto shape = t.shape();
    t = random_matrix<float>(shape[0] * shape[1], shape[2], s);
    t.resize(shape);  // same size: the values stay
    if (integer)
      for (index_t i = 0; i < t.size(); ++i) t[i] = std::round(2 * t[i]);
  };
  fill(host.keys_a().value, seed);
  fill(host.keys_b().value, seed + 1);
  copy_parameters_to_device(host, device);
  Tensor<float> x = random_matrix<float>(tokens, config.d_model, seed + 2);
  if (integer)
    for (index_t i = 0; i < x.size(); ++i) x[i] = std::round(2 * x[i]);
  const auto first = compare_router_step(host, device, x, Mode::train, seed + 3);
  CHECK(bitwise_equal(compare_router_step(host, device, x, Mode::train, seed + 3), first));
}

}  // namespace smoe_cuda_routers_test

using namespace smoe_cuda_routers_test;

TEST_CASE("cuda NoisyTopK: the CPU's noise, selection, gates, load loss and gradients", "[cuda][router][noisy]") {
  check_noisy({.d_model = 12, .experts = 8, .k = 2, .seed = 3}, Mode::train, 45, 1);
  check_noisy({.d_model = 12, .experts = 8, .k = 2, .load_coef = 0.1, .seed = 3}, Mode::train, 45, 2);
  check_noisy({.d_model = 12, .experts = 8, .k = 2, .load_coef = 0.1, .seed = 3}, Mode::eval, 45, 3);
  check_noisy({.d_model = 9, .experts = 16, .k = 4, .load_coef = 0.5, .seed = 7}, Mode::train, 300, 4);  // 2 load blocks
  check_noisy({.d_model = 7, .experts = 5, .k = 1, .load_coef = 0.1, .seed = 1}, Mode::train, 1, 5);     // one token
  check_noisy({.d_model = 6, .experts = 6, .k = 6, .load_coef = 0.1, .seed = 2}, Mode::train, 20, 6);    // k = E
  check_noisy({.d_model = 4, .experts = 4, .k = 2, .load_coef = 0.1}, Mode::train, 0, 7);                // no tokens
  check_noisy({.d_model = 4, .experts = 40, .k = 31, .load_coef = 0.1}, Mode::train, 10, 8);             // largest k
}

TEST_CASE("cuda NoisyTopK: the noise changes the selection, bitwise reruns, errors", "[cuda][router][noisy]") {
  const index_t d = 8, E = 8, tokens = 64;
  NoisyTopKConfig config{.d_model = d, .experts = E, .k = 2, .load_coef = 0.1, .seed = 11};
  NoisyTopK<float> host(config);
  NoisyTopK<float, dev> device(config);
  host.weight().value = random_matrix<float>(E, d, 1, 0.1);
  host.noise_weight().value = random_matrix<float>(E, d, 2, 0.5);
  copy_parameters_to_device(host, device);
  const Tensor<float> x = random_matrix<float>(tokens, d, 3);
  Routing<float, dev> train, eval;
  device.forward(to_device(x).matrix(), train, Mode::train);
  device.forward(to_device(x).matrix(), eval, Mode::eval);
  CHECK(ids_of(to_host(train.experts)) != ids_of(to_host(eval.experts)));  // the test sees the noise

  device.set_step(0);
  host.set_step(0);
  const auto a = compare_router_step(host, device, x, Mode::train, 4);
  device.set_step(0);
  host.set_step(0);
  const auto b = compare_router_step(host, device, x, Mode::train, 4);
  CHECK(bitwise_equal(a, b));

  Tensor<float, dev> wrong({5, d + 1});
  Routing<float, dev> r;
  CHECK_THROWS_WITH(device.forward(std::as_const(wrong).matrix(), r, Mode::train), Catch::Contains("x must be [5, 8], got [5, 9]"));
  CHECK_THROWS_WITH((NoisyTopK<float, dev>({.d_model = 4, .experts = 64, .k = 32})),
                    Catch::Contains("k must be <= 31"));
  CHECK_THROWS_WITH((NoisyTopK<float, dev>({.d_model = 4, .experts = 8, .k = 9})), Catch::Contains("k must be in [1, experts = 8], got 9"));
}

TEST_CASE("cuda NoisyTopK: bf16 activations on fp32 routing", "[cuda][router][noisy]") {
  const index_t d = 16, E = 8, tokens = 40;
  NoisyTopKConfig config{.d_model = d, .experts = E, .k = 2, .load_coef = 0.1, .seed = 5};
  NoisyTopK<float> host(config);
  NoisyTopK<bf16, dev> device(config);
  host.weight().value = random_matrix<float>(E, d, 1, 0.5);
  host.noise_weight().value = random_matrix<float>(E, d, 2, 0.5);
  copy_parameters_to_device(host, device);
  const Tensor<float> x = rounded<bf16>(random_matrix<float>(tokens, d, 3));
  Routing<float> hr;
  Routing<float, dev> dr;
  host.forward(x.matrix(), hr, Mode::train);
  device.forward(to_device<bf16>(x).matrix(), dr, Mode::train);
  require_close_scaled(to_host(dr.logits), hr.logits, 1e-5, "logits");  // fp32 sums of bf16-exact inputs
  CHECK(ids_of(to_host(dr.experts)) == ids_of(hr.experts));
  require_close_scaled(to_host(dr.gates), hr.gates, 1e-5, "gates");
  const Tensor<float> d_gates = random_matrix<float>(tokens, 2, 4);
  Tensor<float> d_logits({tokens, E}), dx({tokens, d});
  d_logits.zero();
  dx.zero();
  auto d_logits_d = to_device(d_logits);
  auto dx_d = to_device<bf16>(dx);
  zero_grad(host);
  zero_grad(device);
  host.backward(x.matrix(), hr, d_gates.matrix(), d_logits.matrix(), dx.matrix());
  device.backward(to_device<bf16>(x).matrix(), dr, to_device(d_gates).matrix(), d_logits_d.matrix(), dx_d.matrix());
  require_close_scaled(to_host<float>(dx_d), dx, 2e-2, "dx");
  require_close_scaled(to_host(device.noise_weight().grad), host.noise_weight().grad, 1e-5, "noise_weight.grad");
}

TEST_CASE("cuda MoE with noisy top-k: the router's load loss joins the aux loss", "[cuda][moe][noisy]") {
  const index_t d = 16, E = 8, G = 12;
  SECTION("load loss and an importance loss") {
    NoisyTopKConfig rc{.d_model = d, .experts = E, .k = 2, .load_coef = 0.1, .seed = 4};
    MoE host(NoisyTopK<float>(rc), ReluExperts<float>({d, E, G}), WeightedSum<float>{}, ImportanceLoss<float>(0.1));
    MoE device(NoisyTopK<float, dev>(rc), ReluExperts<float, dev>({d, E, G}), WeightedSum<float, dev>{},
               ImportanceLoss<float, dev>(0.1));
    check_layer(host, device, 70, 1, 3);
    CHECK(device.read_losses().router_loss != 0.0f);
  }
  SECTION("no load loss, one token") {
    NoisyTopKConfig rc{.d_model = d, .experts = E, .k = 1, .seed = 4};
    MoE host(NoisyTopK<float>(rc), GeluExperts<float>({d, E, G}));
    MoE device(NoisyTopK<float, dev>(rc), GeluExperts<float, dev>({d, E, G}));
    check_layer(host, device, 1, 2);
  }
}

TEST_CASE("cuda ExpertChoiceRouter: the CPU's picks, ties, layout and gradients", "[cuda][router][expert_choice]") {
  check_expert_choice({.d_model = 12, .experts = 8}, 50, 1);
  check_expert_choice({.d_model = 12, .experts = 8, .capacity_factor = 0.5}, 64, 2);
  check_expert_choice({.d_model = 7, .experts = 4, .capacity_factor = 1e9}, 30, 3);  // C = T: every pair
  check_expert_choice({.d_model = 7, .experts = 16, .capacity_factor = 0.01}, 30, 4); // C = 1
  check_expert_choice({.d_model = 5, .experts = 3}, 1, 5);                            // one token
  check_expert_choice({.d_model = 5, .experts = 3}, 0, 6);                            // no tokens
  check_expert_choice({.d_model = 9, .experts = 6, .capacity_factor = 1.5}, 300, 7);
  check_expert_choice({.d_model = 4, .experts = 5}, 40, 8, 0.0);  // x = 0: every score ties, smaller tokens win

  SECTION("NaN scores rank below numbers") {
    const index_t d = 4, E = 4, tokens = 12;
    ExpertChoiceRouter<float> host({.d_model = d, .experts = E});
    ExpertChoiceRouter<float, dev> device({.d_model = d, .experts = E});
    host.weight().value = random_matrix<float>(E, d, 1, 0.5);
    copy_parameters_to_device(host, device);
    Tensor<float> x = random_matrix<float>(tokens, d, 2);
    x[3 * d] = std::numeric_limits<float>::quiet_NaN();
    Routing<float> hr;
    Routing<float, dev> dr;
    host.forward(x.matrix(), hr, Mode::train);
    device.forward(to_device(x).matrix(), dr, Mode::train);
    CHECK(ids_of(to_host(dr.experts)) == ids_of(hr.experts));
    for (index_t j = 0; j < E; ++j) CHECK(to_host(dr.experts)[3 * E + j] == -1);
  }
  SECTION("two runs are bitwise equal; errors") {
    ExpertChoiceRouter<float> host({.d_model = 6, .experts = 5});
    ExpertChoiceRouter<float, dev> device({.d_model = 6, .experts = 5});
    host.weight().value = random_matrix<float>(5, 6, 1, 0.5);
    copy_parameters_to_device(host, device);
    const Tensor<float> x = random_matrix<float>(33, 6, 2);
    CHECK(bitwise_equal(compare_router_step(host, device, x, Mode::train, 3), compare_router_step(host, device, x, Mode::train, 3)));
    Tensor<float, dev> wrong({5, 7});
    Routing<float, dev> r;
    CHECK_THROWS_WITH(device.forward(std::as_const(wrong).matrix(), r, Mode::train), Catch::Contains("x must be [5, 6], got [5, 7]"));
    CHECK_THROWS_WITH((ExpertChoiceRouter<float, dev>({.d_model = 6, .experts = 5, .capacity_factor = 0})),
                      Catch::Contains("capacity_factor must be finite and > 0"));
  }
}

TEST_CASE("cuda MoE with expert choice: tokens with 0..E experts", "[cuda][moe][expert_choice]") {
  const index_t d = 16, E = 8, G = 12;
  ExpertChoiceRouterConfig rc{.d_model = d, .experts = E, .capacity_factor = 2.0};
  MoE host(ExpertChoiceRouter<float>(rc), SwiGluExperts<float>({d, E, G}), WeightedSum<float>{}, RouterZLoss<float>(0.01));
  MoE device(ExpertChoiceRouter<float, dev>(rc), SwiGluExperts<float, dev>({d, E, G}), WeightedSum<float, dev>{},
             RouterZLoss<float, dev>(0.01));
  check_layer(host, device, 60, 1);
}

TEST_CASE("cuda sinkhorn_balance: the CPU's iterations, blocks and non-finite rules", "[cuda][router][sbase]") {
  for (const index_t tokens : {0, 1, 7, 300}) {
    for (const index_t iters : {0, 1, 5}) {
      const index_t E = 6;
      INFO("tokens " << tokens << ", iters " << iters);
      Tensor<float> z = random_matrix<float>(tokens, E, 10 + tokens, 3.0);
      if (tokens >= 7) {
        for (index_t e = 0; e < E; ++e) z[2 * E + e] = -std::numeric_limits<float>::infinity();  // a row without mass
        z[4 * E + 1] = std::numeric_limits<float>::quiet_NaN();
        z[5 * E + 3] = std::numeric_limits<float>::infinity();
      }
      Tensor<float> host({tokens, E});
      sinkhorn_balance(std::as_const(z).matrix(), iters, host.matrix());
      const auto zd = to_device(z);
      auto device = device_nan<float>({tokens, E});
      SinkhornWorkspace<float> work;
      sinkhorn_balance(cuda_stream{}, zd.matrix(), iters, device.matrix(), work);
      const auto got = to_host(device);
      for (index_t i = 0; i < host.size(); ++i) {
        INFO("element " << i);
        if (std::isnan(host[i]) || std::isinf(host[i]))
          CHECK((std::isnan(got[i]) ? std::isnan(host[i]) : got[i] == host[i]));
        else
          CHECK(got[i] == Approx(host[i]).epsilon(1e-5).margin(1e-5));
      }
    }
  }
}

TEST_CASE("cuda SBaseRouter: Sinkhorn-balanced selection, sigmoid gates, gradients", "[cuda][router][sbase]") {
  check_sbase({.d_model = 12, .experts = 8, .k = 2}, Mode::train, 50, 1);
  check_sbase({.d_model = 12, .experts = 8, .k = 2}, Mode::eval, 50, 2);
  check_sbase({.d_model = 12, .experts = 8, .k = 2, .sinkhorn_iters = 0}, Mode::train, 50, 3);
  check_sbase({.d_model = 8, .experts = 16, .k = 4, .sinkhorn_iters = 10}, Mode::train, 300, 4);  // several blocks
  check_sbase({.d_model = 5, .experts = 4, .k = 4, .sinkhorn_iters = 2}, Mode::train, 20, 5);    // k = E
  check_sbase({.d_model = 5, .experts = 4, .k = 1}, Mode::train, 1, 6);                          // one token
  check_sbase({.d_model = 5, .experts = 4, .k = 1}, Mode::train, 0, 7);                          // no tokens
  SECTION("the balancing changes the selection; bitwise reruns; errors") {
    const index_t d = 6, E = 4, tokens = 64;
    SBaseRouter<float> host({.d_model = d, .experts = E, .k = 1});
    SBaseRouter<float, dev> device({.d_model = d, .experts = E, .k = 1});
    host.weight().value = random_matrix<float>(E, d, 1, 0.5);
    for (index_t c = 0; c < d; ++c) host.weight().value[c] += 2.0f;  // expert 0 favoured: balancing moves tokens
    copy_parameters_to_device(host, device);
    Tensor<float> x = random_matrix<float>(tokens, d, 2);
    for (index_t i = 0; i < x.size(); ++i) x[i] = std::abs(x[i]);
    Routing<float, dev> train, eval;
    device.forward(to_device(x).matrix(), train, Mode::train);
    device.forward(to_device(x).matrix(), eval, Mode::eval);
    CHECK(ids_of(to_host(train.experts)) != ids_of(to_host(eval.experts)));
    CHECK(bitwise_equal(compare_router_step(host, device, x, Mode::train, 3), compare_router_step(host, device, x, Mode::train, 3)));
    Tensor<float, dev> wrong({5, d + 1});
    Routing<float, dev> r;
    CHECK_THROWS_WITH(device.forward(std::as_const(wrong).matrix(), r, Mode::train), Catch::Contains("x must be [5, 6], got [5, 7]"));
    CHECK_THROWS_WITH((SBaseRouter<float, dev>({.d_model = 4, .experts = 4, .k = 1, .sinkhorn_iters = -1})),
                      Catch::Contains("sinkhorn_iters must be >= 0, got -1"));
  }
}

TEST_CASE("cuda MoE with S-BASE routing", "[cuda][moe][sbase]") {
  const index_t d = 16, E = 8, G = 12;
  SBaseRouterConfig rc{.d_model = d, .experts = E, .k = 2, .sinkhorn_iters = 4};
  MoE host(SBaseRouter<float>(rc), ReluExperts<float>({d, E, G}), WeightedSum<float>{}, EntropyLoss<float>(0.01));
  MoE device(SBaseRouter<float, dev>(rc), ReluExperts<float, dev>({d, E, G}), WeightedSum<float, dev>{},
             EntropyLoss<float, dev>(0.01));
  check_layer(host, device, 150, 1);
}

TEST_CASE("cuda BaseRouter: the host's balanced assignment, device gates and gradients", "[cuda][router][base]") {
  check_base({.d_model = 12, .experts = 8}, Mode::train, 64, 1);   // E divides T
  check_base({.d_model = 12, .experts = 8}, Mode::train, 50, 2);   // it does not
  check_base({.d_model = 12, .experts = 8}, Mode::eval, 50, 3);    // greedy
  check_base({.d_model = 6, .experts = 8}, Mode::train, 5, 4);     // T < E: distinct experts
  check_base({.d_model = 6, .experts = 3}, Mode::train, 1, 5);     // one token
  check_base({.d_model = 6, .experts = 3}, Mode::train, 0, 6);     // no tokens
  check_base({.d_model = 6, .experts = 1}, Mode::train, 9, 7);     // one expert
  SECTION("training balances the load; bitwise reruns; errors") {
    const index_t d = 6, E = 4, tokens = 40;
    BaseRouter<float> host({.d_model = d, .experts = E});
    BaseRouter<float, dev> device({.d_model = d, .experts = E});
    host.weight().value = random_matrix<float>(E, d, 1, 0.5);
    for (index_t c = 0; c < d; ++c) host.weight().value[c] += 2.0f;
    copy_parameters_to_device(host, device);
    const Tensor<float> x = random_matrix<float>(tokens, d, 2);
    Routing<float, dev> r;
    device.forward(to_device(x).matrix(), r, Mode::train);
    std::vector<int> load(E, 0);
    for (const std::int32_t id : ids_of(to_host(r.experts))) ++load.at(std::size_t(id));
    CHECK(load == std::vector<int>(E, tokens / E));
    CHECK(bitwise_equal(compare_router_step(host, device, x, Mode::train, 3), compare_router_step(host, device, x, Mode::train, 3)));
    Tensor<float, dev> wrong({5, d + 1});
    CHECK_THROWS_WITH(device.forward(std::as_const(wrong).matrix(), r, Mode::train), Catch::Contains("x must be [5, 6], got [5, 7]"));
    auto dg = device_nan<float>({tokens, 2});
    auto dl = device_nan<float>({tokens, E});
    auto dx = device_nan<float>({tokens, d});
    const auto xd = to_device(x);
    CHECK_THROWS_WITH(device.backward(xd.matrix(), r, std::as_const(dg).matrix(), dl.matrix(), dx.matrix()),
                      Catch::Contains("d_gates must be [40, 1], got [40, 2]"));
  }
}

TEST_CASE("cuda MoE with BASE routing", "[cuda][moe][base]") {
  const index_t d = 16, E = 8, G = 12;
  MoE host(BaseRouter<float>({d, E}), ReluExperts<float>({d, E, G}), WeightedSum<float>{}, SwitchBalanceLoss<float>(0.01));
  MoE device(BaseRouter<float, dev>({d, E}), ReluExperts<float, dev>({d, E, G}), WeightedSum<float, dev>{},
             SwitchBalanceLoss<float, dev>(0.01));
  check_layer(host, device, 44, 1);
}

// ------------------------------------------------------------------ expert capacity

TEST_CASE("cuda apply_capacity: the CPU's drops for both priorities", "[cuda][capacity]") {
  struct Case {
    index_t tokens, K, E;
    double factor;
    CapacityPolicy::Priority priority;
  };
  using P = CapacityPolicy::Priority;
  for (const Case& c : {Case{50, 2, 8, 1.0, P::position}, Case{50, 2, 8, 1.0, P::gate}, Case{64, 4, 8, 0.5, P::position},
                        Case{64, 4, 8, 0.5, P::gate}, Case{30, 1, 4, 0.01, P::gate}, Case{30, 3, 4, 100.0, P::position},
                        Case{1, 2, 4, 0.1, P::position}, Case{0, 2, 4, 1.0, P::gate}, Case{200, 2, 16, 1.25, P::gate}}) {
    INFO("tokens " << c.tokens << ", K " << c.K << ", E " << c.E << ", factor " << c.factor << ", by gate "
                   << (c.priority == P::gate));
    RandomRouting rr = random_routing(c.tokens, c.K, c.E, 7 + c.tokens, 0.1);
    if (c.tokens > 3) rr.ids[3] = std::int32_t(c.E + 2);  // an invalid id: never counted, never dropped
    for (index_t i = 0; i + 5 < rr.gates.size(); i += 5) rr.gates[i + 1] = rr.gates[i];  // gate ties
    Routing<float> hr;
    hr.experts = rr.ids;
    hr.gates = rr.gates;
    const CapacityPolicy policy{.capacity_factor = c.factor, .priority = c.priority};
    Tensor<std::int32_t> kept;
    const index_t dropped = apply_capacity(policy, c.E, hr, kept);
    Tensor<std::int32_t, dev> kept_d;
    CapacityWorkspace work;
    const auto ids_d = to_device(rr.ids);
    const auto gates_d = to_device(rr.gates);
    apply_capacity(policy, c.E, ids_d.matrix(), gates_d.matrix(), kept_d, work, cuda_stream{});
    CHECK(ids_of(to_host(kept_d)) == ids_of(kept));
    CHECK(to_host(work.dropped)[0] == dropped);
    if (c.factor <= 0.5 && c.tokens >= 30) CHECK(dropped > 0);  // the cases above do drop
  }
}

TEST_CASE("cuda MoE with expert capacity: the CPU's drops, outputs, gradients and statistics", "[cuda][moe][capacity]") {
  const index_t d = 16, E = 8, G = 12;
  for (const auto priority : {CapacityPolicy::Priority::position, CapacityPolicy::Priority::gate}) {
    TopKRouterConfig rc{.d_model = d, .experts = E, .k = 2};
    MoE host(TopKRouter<float, SoftmaxGate>(rc, {true}), SwiGluExperts<float>({d, E, G}), WeightedSum<float>{},
             SwitchBalanceLoss<float>(0.01));
    MoE device(TopKRouter<float, SoftmaxGate, dev>(rc, {true}), SwiGluExperts<float, dev>({d, E, G}),
               WeightedSum<float, dev>{}, SwitchBalanceLoss<float, dev>(0.01));
    host.capacity = device.capacity = {.capacity_factor = 0.75, .priority = priority};
    check_layer(host, device, 64, 1);
    CHECK(device.routing_stats().dropped > 0);
    CHECK(device.routing_stats().dropped == host.routing().dropped);
    CHECK(ids_of(to_host(device.dispatched_experts())) == ids_of(host.dispatched_experts()));
  }
  SECTION("refused for routers that set their own capacity, and for a bad factor") {
    MoE device(ExpertChoiceRouter<float, dev>({.d_model = d, .experts = E}), ReluExperts<float, dev>({d, E, G}));
    Tensor<float, dev> x({4, d}), y({4, d});
    x.zero();
    device.capacity = {.capacity_factor = 1.0};
    CHECK_THROWS_WITH(device.forward(std::as_const(x).matrix(), y.matrix(), Mode::train),
                      Catch::Contains("capacity applies to token-choice routers"));
    MoE topk(SigmoidTopK<float, dev>({.d_model = d, .experts = E, .k = 2}), ReluExperts<float, dev>({d, E, G}));
    topk.capacity = {.capacity_factor = -1.0};
    CHECK_THROWS_WITH(topk.forward(std::as_const(x).matrix(), y.matrix(), Mode::train),
                      Catch::Contains("capacity_factor must be >= 0 (0 = dropless), got -1"));
  }
}

TEST_CASE("cuda ProductKeyRouter: the CPU's ids (ties too), gates and gradients for every activation", "[cuda][router][pkm]") {
  for (const auto act : {PkmActivation::relu, PkmActivation::softmax, PkmActivation::softmax_across_heads}) {
    check_pkm_router({.d_model = 12, .n_keys = 9, .heads = 3, .k = 4, .activation = act}, 37, 1);
    check_pkm_router({.d_model = 8, .n_keys = 6, .heads = 2, .k = 3, .activation = act}, 41, 2, true);  // exact ties
    check_pkm_router({.d_model = 4, .n_keys = 5, .heads = 1, .k = 5, .activation = act}, 9, 3);  // K = N: every pair
    check_pkm_router({.d_model = 6, .n_keys = 4, .heads = 2, .k = 1, .activation = act}, 1, 4);  // one token, K = 1
    check_pkm_router({.d_model = 6, .n_keys = 4, .heads = 2, .k = 2, .activation = act}, 0, 5);  // no tokens
  }
  SECTION("errors") {
    CHECK_THROWS_WITH((ProductKeyRouter<float, dev>({.d_model = 8, .n_keys = 40, .heads = 1, .k = 33})),
                      Catch::Contains("k must be <= 32 on the CUDA backend, got 33"));
    CHECK_THROWS_WITH((ProductKeyRouter<float, dev>({.d_model = 7, .n_keys = 4})), Catch::Contains("d_model must be even"));
    CHECK_THROWS_WITH((ProductKeyRouter<float, dev>({.d_model = 8, .n_keys = 40, .heads = 40, .k = 32,
                                                      .activation = PkmActivation::softmax_across_heads})),
                      Catch::Contains("heads·k must be <= 1024"));
    ProductKeyRouter<float, dev> router({.d_model = 8, .n_keys = 4});
    Tensor<float, dev> wrong({3, 6});
    wrong.zero();
    Routing<float, dev> r;
    CHECK_THROWS_WITH(router.forward(std::as_const(wrong).matrix(), r, Mode::train),
                      Catch::Contains("x must be [3, 8], got [3, 6]"));
  }
}

TEST_CASE("cuda PKM layer: MoE<ProductKeyRouter, ValueExperts> and PKM-routed feed-forward experts", "[cuda][moe][pkm]") {
  const index_t d = 16, N = 8, H = 2, K = 4;
  SECTION("value experts, importance loss, each activation") {
    for (const auto act : {PkmActivation::relu, PkmActivation::softmax, PkmActivation::softmax_across_heads}) {
      const ProductKeyRouterConfig rc{.d_model = d, .n_keys = N, .heads = H, .k = K, .activation = act};
      MoE host(ProductKeyRouter<float>(rc), ValueExperts<float>({d, N * N}), WeightedSum<float>{},
               ImportanceLoss<float>(0.1));
      MoE device(ProductKeyRouter<float, dev>(rc), ValueExperts<float, dev>({d, N * N}), WeightedSum<float, dev>{},
                 ImportanceLoss<float, dev>(0.1));
      check_layer(host, device, 70, 1 + std::uint64_t(act));
      CHECK(total_parameters(device) == total_parameters(host));
      CHECK(flops_per_token(device) == Approx(flops_per_token(host)));
    }
  }
  SECTION("one token, and expert capacity") {
    const ProductKeyRouterConfig rc{.d_model = d, .n_keys = N, .heads = H, .k = K};
    MoE host(ProductKeyRouter<float>(rc), ValueExperts<float>({d, N * N}));
    MoE device(ProductKeyRouter<float, dev>(rc), ValueExperts<float, dev>({d, N * N}));
    check_layer(host, device, 1, 2);
    host.capacity = device.capacity = {.capacity_factor = 0.5};
    check_layer(host, device, 64, 3);
  }
  SECTION("feed-forward experts behind product keys (E = N²)") {
    const ProductKeyRouterConfig rc{.d_model = d, .n_keys = 4, .heads = 2, .k = 2};
    MoE host(ProductKeyRouter<float>(rc), SwiGluExperts<float>({d, 16, 6}));
    MoE device(ProductKeyRouter<float, dev>(rc), SwiGluExperts<float, dev>({d, 16, 6}));
    check_layer(host, device, 33, 4);
  }
  SECTION("bf16 activations and values on fp32 keys") {
    const index_t tokens = 30;
    const ProductKeyRouterConfig rc{.d_model = d, .n_keys = N, .heads = H, .k = K};
    MoE host(ProductKeyRouter<float>(rc), ValueExperts<float>({d, N * N}));
    MoE device(ProductKeyRouter<bf16, dev>(rc), ValueExperts<bf16, dev>({d, N * N}));
    for (auto* keys : {&host.router().keys_a().value, &host.router().keys_b().value}) {
      *keys = random_matrix<float>(H * N, d / 2, 5 + std::uint64_t(keys == &host.router().keys_b().value));
      keys->resize({H, N, d / 2});  // same size: the values stay
    }
    host.experts().values().value = rounded<bf16>(random_matrix<float>(N * N, d, 7));
    copy_parameters_to_device(host, device);
    const Tensor<float> x = rounded<bf16>(random_matrix<float>(tokens, d, 8));
    const Tensor<float> dy = rounded<bf16>(random_matrix<float>(tokens, d, 9));
    Tensor<float> y({tokens, d}), dx({tokens, d});
    zero_grad(host);
    zero_grad(device);
    host.forward(x.matrix(), y.matrix(), Mode::train);
    host.backward(dy.matrix(), dx.matrix());
    auto yd = device_nan<bf16>({tokens, d}), dxd = device_nan<bf16>({tokens, d});
    const auto xd = to_device<bf16>(x);  // the layer reads x again in backward
    device.forward(xd.matrix(), yd.matrix(), Mode::train);
    device.backward(to_device<bf16>(dy).matrix(), dxd.matrix());
    CHECK(ids_of(to_host(device.routing().experts)) == ids_of(host.routing().experts));
    require_close_scaled(to_host<float>(yd), y, 2e-2, "y");
    require_close_scaled(to_host<float>(dxd), dx, 2e-2, "dx");
    require_close_scaled(to_host(device.router().keys_a().grad), host.router().keys_a().grad, 2e-2, "keys_a.grad");
    require_close_scaled(to_host<float>(device.experts().values().grad), host.experts().values().grad, 2e-2,
                         "values.grad");
  }
}
