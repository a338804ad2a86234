// The CUDA backend against its CPU twin: every device component on the same random inputs as the
// CPU component, forward and backward. One source, two builds: the host-emulated device build
// (CI, Thrust's OpenMP system) and nvcc (tests/cuda/CMakeLists.txt), which skips at run time
// without a GPU. Device outputs are poisoned with NaN before each call, so an element a kernel
// leaves unwritten fails the comparison.
#include "device_test_support.hpp"

TEST_CASE("cuda dispatch: the CPU's stable CSR layout, edge cases included", "[cuda][dispatch]") {
  struct Case {
    index_t tokens, K, E;
    double holes;
  };
  for (const Case c : {Case{37, 2, 5, 0.1}, Case{0, 2, 4, 0.0}, Case{1, 1, 1, 0.0}, Case{64, 3, 1, 0.2},
                       Case{50, 4, 4, 0.0}, Case{300, 2, 16, 0.05}, Case{20, 2, 64, 0.0}}) {
    INFO("tokens " << c.tokens << ", K " << c.K << ", E " << c.E);
    const RandomRouting r = random_routing(c.tokens, c.K, c.E, 11 + std::uint64_t(c.tokens), c.holes);
    Dispatch<float> host;
    build_dispatch(r.ids.matrix(), r.gates.matrix(), c.E, host);
    const auto ids = to_device(r.ids);
    const auto gates = to_device(r.gates);
    Dispatch<float, dev> device;
    build_dispatch(ids.matrix(), gates.matrix(), c.E, device, cuda_stream{});
    CHECK(device.slots() == c.tokens * c.K);
    require_same_dispatch(to_host(device), host);
    CHECK(to_host(device.invalid_ids)[0] == 0);
  }
  SECTION("all assignments to one expert") {
    Tensor<std::int32_t> ids({10, 2});
    Tensor<float> gates({10, 2});
    for (index_t i = 0; i < 20; ++i) {
      ids[i] = 3;
      gates[i] = float(i);
    }
    Dispatch<float> host;
    build_dispatch(std::as_const(ids).matrix(), std::as_const(gates).matrix(), 8, host);
    Dispatch<float, dev> device;
    build_dispatch(to_device(ids).matrix(), to_device(gates).matrix(), 8, device, cuda_stream{});
    require_same_dispatch(to_host(device), host);
  }
  SECTION("ids outside [-1, E) become empty assignments and are flagged") {
    Tensor<std::int32_t> ids({2, 2});
    ids[0] = 0, ids[1] = 7, ids[2] = -5, ids[3] = 1;
    Tensor<float> gates({2, 2});
    gates.fill(0.5f);
    Dispatch<float, dev> device;
    build_dispatch(to_device(ids).matrix(), to_device(gates).matrix(), 2, device, cuda_stream{});
    const Dispatch<float> h = to_host(device);
    CHECK(h.offsets == std::vector<std::int32_t>{0, 1, 2});
    CHECK(h.token_slot == std::vector<std::int32_t>{0, -1, -1, 1});
    CHECK(to_host(device.invalid_ids)[0] == 1);
  }
  SECTION("bad shapes are refused on the host") {
    Tensor<std::int32_t, dev> ids({3, 2});
    Tensor<float, dev> gates({3, 1});
    Dispatch<float, dev> device;
    CHECK_THROWS_WITH(build_dispatch(std::as_const(ids).matrix(), std::as_const(gates).matrix(), 4, device, cuda_stream{}),
                      Catch::Contains("gates must be [3, 2], got [3, 1]"));
    CHECK_THROWS_WITH(build_dispatch(std::as_const(ids).matrix(), std::as_const(gates).matrix(), 0, device, cuda_stream{}),
                      Catch::Contains("experts must be >= 1, got 0"));
  }
}

namespace {

// Router forward and backward on both sides; d_logits starts from a random "loss gradient".
template <class Gate>
void check_router(Gate gate, TopKRouterConfig config, Mode mode, index_t tokens, std::uint64_t seed) {
  const index_t d = config.d_model, E = config.experts, K = config.k;
  TopKRouter<float, Gate> host(config, gate);
  TopKRouter<float, Gate, dev> device(config, gate);
  host.weight().value = random_matrix<float>(E, d, seed, 0.5);
  copy_parameters_to_device(host, device);
  const Tensor<float> x = random_matrix<float>(tokens, d, seed + 1);
  const auto xd = to_device(x);
  for (int step = 0; step < 2; ++step) {  // two steps: the dropout masks follow the step counter
    Routing<float> hr;
    host.forward(x.matrix(), hr, mode);
    Routing<float, dev> dr;
    device.forward(xd.matrix(), dr, mode);
    require_close_scaled(to_host(dr.logits), hr.logits, 1e-5, "logits");
    const auto ids = to_host(dr.experts);
    CHECK(std::vector<std::int32_t>(ids.data(), ids.data() + ids.size()) ==
          std::vector<std::int32_t>(hr.experts.data(), hr.experts.data() + hr.experts.size()));
    require_close_scaled(to_host(dr.gates), hr.gates, 1e-5, "gates");

    const Tensor<float> d_gates = random_matrix<float>(tokens, K, seed + 2);
    Tensor<float> d_logits = random_matrix<float>(tokens, E, seed + 3, 0.1);
    Tensor<float> dx = random_matrix<float>(tokens, d, seed + 4);
    auto d_logits_d = to_device(d_logits);
    auto dx_d = to_device(dx);
    zero_grad(host);
    zero_grad(device);
    host.backward(x.matrix(), hr, d_gates.matrix(), d_logits.matrix(), dx.matrix());
    device.backward(xd.matrix(), dr, to_device(d_gates).matrix(), d_logits_d.matrix(), dx_d.matrix());
    require_close_scaled(to_host(d_logits_d), d_logits, 1e-5, "d_logits");
    require_close_scaled(to_host(dx_d), dx, 1e-5, "dx");
    require_close_scaled(to_host(device.weight().grad), host.weight().grad, 1e-5, "weight.grad");
  }
  CHECK(device.step() == host.step());
}

}  // namespace

TEST_CASE("cuda TopKRouter: softmax and sigmoid gates, expert dropout, same selection as the CPU", "[cuda][router]") {
  check_router(SoftmaxGate{false}, {.d_model = 12, .experts = 8, .k = 2}, Mode::train, 45, 1);
  check_router(SoftmaxGate{true}, {.d_model = 12, .experts = 8, .k = 2}, Mode::train, 45, 2);
  check_router(SoftmaxGate{true}, {.d_model = 7, .experts = 5, .k = 1}, Mode::eval, 30, 3);
  check_router(SigmoidGate{}, {.d_model = 16, .experts = 16, .k = 4}, Mode::eval, 70, 4);
  check_router(SigmoidGate{}, {.d_model = 16, .experts = 16, .k = 4, .expert_dropout = {.rate = 0.3, .seed = 9}},
               Mode::train, 70, 5);
  check_router(SoftmaxGate{false}, {.d_model = 9, .experts = 6, .k = 6}, Mode::train, 20, 6);  // k = E
  check_router(SigmoidGate{}, {.d_model = 4, .experts = 4, .k = 2}, Mode::train, 0, 7);        // no tokens
  CHECK_THROWS_WITH((SigmoidTopK<float, dev>({.d_model = 4, .experts = 64, .k = 33})),
                    Catch::Contains("k must be <= 32 on the CUDA backend, got 33"));
}

TEST_CASE("cuda GroupTopKRouter: DeepSeek-V3 group-limited routing with a selection bias", "[cuda][router]") {
  struct Case {
    GroupTopKRouterConfig config;
    index_t tokens;
  };
  for (const Case& c : {Case{{.d_model = 12, .experts = 16, .k = 4, .n_groups = 4, .topk_groups = 2, .route_scale = 2.5}, 50},
                        Case{{.d_model = 8, .experts = 8, .k = 2, .n_groups = 8, .topk_groups = 3}, 33},  // one-expert groups
                        Case{{.d_model = 8, .experts = 12, .k = 3, .n_groups = 1, .topk_groups = 1}, 20},
                        Case{{.d_model = 8, .experts = 6, .k = 2, .n_groups = 3, .topk_groups = 1}, 0}}) {
    const index_t d = c.config.d_model, E = c.config.experts, K = c.config.k, tokens = c.tokens;
    INFO("E " << E << ", groups " << c.config.n_groups << ", keep " << c.config.topk_groups << ", tokens " << tokens);
    GroupTopKRouter<float> host(c.config);
    GroupTopKRouter<float, dev> device(c.config);
    host.weight().value = random_matrix<float>(E, d, 3, 0.5);
    for (index_t e = 0; e < E; ++e) host.bias().values[e] = 0.05f * float(e % 3);  // a bias that changes selections
    copy_parameters_to_device(host, device);
    copy(host.bias().values, device.bias());
    const Tensor<float> x = random_matrix<float>(tokens, d, 4);
    const auto xd = to_device(x);
    Routing<float> hr;
    Routing<float, dev> dr;
    host.forward(x.matrix(), hr, Mode::train);
    device.forward(xd.matrix(), dr, Mode::train);
    require_close_scaled(to_host(dr.logits), hr.logits, 1e-5, "logits");
    const auto ids = to_host(dr.experts);
    CHECK(std::vector<std::int32_t>(ids.data(), ids.data() + ids.size()) ==
          std::vector<std::int32_t>(hr.experts.data(), hr.experts.data() + hr.experts.size()));
    require_close_scaled(to_host(dr.gates), hr.gates, 1e-5, "gates");
    const auto load = to_host(device.load());
    for (index_t e = 0; e < E; ++e) CHECK(load[e] == host.load()[e]);

    const Tensor<float> d_gates = random_matrix<float>(tokens, K, 5);
    Tensor<float> d_logits = random_matrix<float>(tokens, E, 6, 0.1), dx = random_matrix<float>(tokens, d, 7);
    auto d_logits_d = to_device(d_logits), dx_d = to_device(dx);
    zero_grad(host);
    zero_grad(device);
    host.backward(x.matrix(), hr, d_gates.matrix(), d_logits.matrix(), dx.matrix());
    device.backward(xd.matrix(), dr, to_device(d_gates).matrix(), d_logits_d.matrix(), dx_d.matrix());
    require_close_scaled(to_host(d_logits_d), d_logits, 1e-5, "d_logits");
    require_close_scaled(to_host(dx_d), dx, 1e-5, "dx");
    require_close_scaled(to_host(device.weight().grad), host.weight().grad, 1e-5, "weight.grad");

    host.bias().update(host.load(), 0.01);
    device.update_bias(0.01);
    require_close_scaled(to_host(device.bias()), host.bias().values, 1e-6, "bias after update");
  }
  CHECK_THROWS_WITH((GroupTopKRouter<float, dev>({.d_model = 4, .experts = 128, .k = 2, .n_groups = 128, .topk_groups = 2})),
                    Catch::Contains("n_groups <= 64"));
}

namespace {

// Experts of dtype T on the device against float experts on the CPU whose weights and inputs are
// the T-rounded values, over the same dispatch.
template <class T, class Act>
void check_experts(index_t tokens, index_t d, index_t E, index_t G, index_t K, bool bias, std::uint64_t seed) {
  INFO(dtype_name<T>() << " " << Act::name << (bias ? " with bias" : "") << ", tokens " << tokens << ", E " << E);
  const double tol = device_tolerance<T>();
  FeedForwardExperts<float, Act> host({d, E, G, bias});
  FeedForwardExperts<T, Act, dev> device({d, E, G, bias});
  std::uint64_t s = seed;
  host.for_each_parameter([&](std::string_view, Parameter<float>& p) {
    smoe::test::randomize(p.value, ++s, 0.3);
    p.value = rounded<T>(p.value);
  });
  copy_parameters_to_device(host, device);
  const Tensor<float> x = rounded<T>(random_matrix<float>(tokens, d, seed + 100));
  const RandomRouting r = random_routing(tokens, K, E, seed + 200, 0.1);
  Dispatch<float> hd;
  build_dispatch(r.ids.matrix(), r.gates.matrix(), E, hd);
  Dispatch<acc_t<T>, dev> dd;
  build_dispatch(to_device(r.ids).matrix(), to_device<acc_t<T>>(r.gates).matrix(), E, dd, cuda_stream{});
  const index_t A = hd.assignments();

  Tensor<float> ys({A, d});
  host.forward(x.matrix(), hd, ys.matrix());
  const auto xd = to_device<T>(x);
  auto ysd = device_nan<T>({dd.slots(), d});
  device.forward(xd.matrix(), dd, ysd.matrix());
  require_close_scaled(to_host<float>(ysd), ys, tol, "ys", A * d);

  const Tensor<float> dys_full = rounded<T>(random_matrix<float>(dd.slots(), d, seed + 300));
  Tensor<float> dys({A, d});
  for (index_t i = 0; i < A * d; ++i) dys[i] = dys_full[i];
  Tensor<float> dx({tokens, d});
  host.backward(x.matrix(), hd, dys.matrix(), dx.matrix());
  auto dxd = device_nan<T>({tokens, d});
  device.backward(xd.matrix(), dd, to_device<T>(dys_full).matrix(), dxd.matrix());
  require_close_scaled(to_host<float>(dxd), dx, tol, "dx");
  for_each_parameter_pair(host, device, [&](std::string_view name, auto& hp, auto& dp) {
    require_close_scaled(to_host<float>(dp.grad), hp.grad, tol, std::string(name) + ".grad");
  });
}

}  // namespace

TEST_CASE("cuda FeedForwardExperts: ReLU, GELU, SwiGLU, biases, fp32 / bf16 / fp16 / fp64", "[cuda][experts]") {
  check_experts<float, Relu>(40, 12, 5, 7, 2, false, 1);
  check_experts<float, Gelu>(40, 12, 5, 7, 2, true, 2);
  check_experts<float, SwiGlu>(40, 12, 5, 7, 2, true, 3);
  check_experts<double, SwiGlu>(25, 8, 3, 5, 2, true, 4);
  check_experts<bf16, Relu>(40, 16, 4, 8, 2, true, 5);
  check_experts<bf16, SwiGlu>(40, 16, 4, 8, 2, false, 6);
  check_experts<fp16, Gelu>(40, 16, 4, 8, 2, true, 7);
  check_experts<float, Relu>(30, 8, 16, 4, 1, true, 8);  // most experts get no tokens
  check_experts<float, Relu>(0, 8, 4, 4, 2, true, 9);    // no tokens
  check_experts<float, Gelu>(20, 8, 1, 4, 1, true, 10);  // one expert takes all
}

#if !defined(SMOE_CUDA_EMULATION)
namespace {

// The tensor-core GEMMs (GPU only) against their portable twins, on the same device inputs.
template <class T, class Act>
void check_tensor_core_experts(index_t tokens, index_t d, index_t E, index_t G, index_t K, std::uint64_t seed) {
  INFO(dtype_name<T>() << " " << Act::name << ", tokens " << tokens << ", d " << d << ", E " << E << ", G " << G);
  FeedForwardExperts<float, Act> host({d, E, G, true});
  std::uint64_t s = seed;
  host.for_each_parameter([&](std::string_view, Parameter<float>& p) { smoe::test::randomize(p.value, ++s, 0.1); });
  FeedForwardExperts<T, Act, dev> fast({d, E, G, true}), twin({d, E, G, true});
  copy_parameters_to_device(host, fast);
  copy_parameters_to_device(host, twin);
  twin.set_gemm_path(cuda_kernels::GemmPath::portable);
  const RandomRouting r = random_routing(tokens, K, E, seed + 1, 0.05);
  Dispatch<float, dev> dd;
  build_dispatch(to_device(r.ids).matrix(), to_device(r.gates).matrix(), E, dd, cuda_stream{});
  const index_t A = to_host(dd).assignments();
  const auto x = to_device<T>(random_matrix<float>(tokens, d, seed + 2));
  const auto dys = to_device<T>(random_matrix<float>(dd.slots(), d, seed + 3));
  std::vector<Tensor<float>> outputs[2];
  int side = 0;
  for (auto* experts : {&fast, &twin}) {
    auto ys = device_nan<T>({dd.slots(), d}), dx = device_nan<T>({tokens, d});
    experts->forward(x.matrix(), dd, ys.matrix());
    experts->backward(x.matrix(), dd, dys.matrix(), dx.matrix());
    outputs[side].push_back(to_host<float>(ys));
    outputs[side].push_back(to_host<float>(dx));
    experts->for_each_parameter([&](std::string_view, auto& p) { outputs[side].push_back(to_host<float>(p.grad)); });
    ++side;
  }
  const char* names[] = {"ys", "dx", "w1.grad", "w2.grad", "b1.grad", "b2.grad"};
  for (std::size_t i = 0; i < outputs[0].size(); ++i)
    require_close_scaled(outputs[0][i], outputs[1][i], 2e-2, names[i], i == 0 ? A * d : -1);
}

}  // namespace

TEST_CASE("cuda tensor-core grouped GEMMs equal their portable twins (GPU only)", "[cuda][gpu]") {
  check_tensor_core_experts<bf16, Relu>(300, 256, 8, 192, 2, 1);    // several row and column tiles
  check_tensor_core_experts<bf16, SwiGlu>(257, 100, 5, 70, 3, 2);   // unaligned sizes: the scalar paths
  check_tensor_core_experts<fp16, Gelu>(64, 128, 64, 64, 2, 3);     // many experts without tokens
  check_tensor_core_experts<bf16, Relu>(1, 64, 4, 64, 1, 4);        // one token
}
#endif

TEST_CASE("cuda WeightedSum: gather per token, gate gradients", "[cuda][combine]") {
  const index_t tokens = 33, K = 3, E = 6, d = 10;
  const RandomRouting r = random_routing(tokens, K, E, 5, 0.15);
  Dispatch<float> hd;
  build_dispatch(r.ids.matrix(), r.gates.matrix(), E, hd);
  Dispatch<float, dev> dd;
  build_dispatch(to_device(r.ids).matrix(), to_device(r.gates).matrix(), E, dd, cuda_stream{});
  const index_t A = hd.assignments();
  const Tensor<float> ys_full = random_matrix<float>(dd.slots(), d, 6);
  Tensor<float> ys({A, d});
  for (index_t i = 0; i < A * d; ++i) ys[i] = ys_full[i];
  const auto ysd = to_device(ys_full);
  Tensor<float> y({tokens, d});
  WeightedSum<float>{}.forward(hd, ys.matrix(), y.matrix());
  auto yd = device_nan<float>({tokens, d});
  WeightedSum<float, dev>{}.forward(dd, ysd.matrix(), yd.matrix());
  require_close_scaled(to_host(yd), y, 1e-6, "y");

  const Tensor<float> dy = random_matrix<float>(tokens, d, 7);
  Tensor<float> dys({A, d}), d_gates({tokens, K});
  WeightedSum<float>{}.backward(hd, ys.matrix(), dy.matrix(), dys.matrix(), d_gates.matrix());
  auto dysd = device_nan<float>({dd.slots(), d});
  auto d_gates_d = device_nan<float>({tokens, K});
  WeightedSum<float, dev>{}.backward(dd, ysd.matrix(), to_device(dy).matrix(), dysd.matrix(), d_gates_d.matrix());
  require_close_scaled(to_host(dysd), dys, 1e-6, "dys", A * d);
  require_close_scaled(to_host(d_gates_d), d_gates, 1e-5, "d_gates");
}

namespace {

template <template <class, class> class Loss>
void check_loss(double coef, index_t tokens, index_t E, index_t K, std::uint64_t seed, double logit_scale = 1.0) {
  Routing<float> hr;
  hr.logits = random_matrix<float>(tokens, E, seed, logit_scale);
  hr.experts.resize({tokens, K});
  hr.gates.resize({tokens, K});
  for (index_t t = 0; t < tokens; ++t) {
    select_topk(hr.logits.data() + t * E, E, K, hr.experts.data() + t * K);
    for (index_t j = 0; j < K; ++j) hr.gates[t * K + j] = 1 / (1 + std::exp(-hr.logits[t * E + hr.experts[t * K + j]]));
  }
  Routing<float, dev> dr;
  dr.logits = to_device(hr.logits);
  dr.experts = to_device(hr.experts);
  dr.gates = to_device(hr.gates);
  Loss<float, cpu> host(coef);
  Loss<float, dev> device(coef);
  const float value = host.forward(hr, E);
  auto value_d = device_nan<float>({1});
  device.forward(dr, E, value_d.data());
  INFO((Loss<float, cpu>::name) << ", tokens " << tokens << ", E " << E);
  CHECK(to_host(value_d)[0] == Approx(value).epsilon(1e-5).margin(1e-6));
  Tensor<float> d_logits = random_matrix<float>(tokens, E, seed + 1, 0.01), d_gates = random_matrix<float>(tokens, K, seed + 2, 0.01);
  auto d_logits_d = to_device(d_logits), d_gates_d = to_device(d_gates);
  host.backward(hr, E, d_logits.matrix(), d_gates.matrix());
  device.backward(dr, E, d_logits_d.matrix(), d_gates_d.matrix());
  require_close_scaled(to_host(d_logits_d), d_logits, 1e-5, "d_logits");
  require_close_scaled(to_host(d_gates_d), d_gates, 1e-5, "d_gates");
}

}  // namespace

TEST_CASE("cuda balance losses: entropy, Switch, z-loss, importance", "[cuda][losses]") {
  for (const index_t tokens : {index_t(1), index_t(77), index_t(600)}) {
    check_loss<EntropyLoss>(0.01, tokens, 8, 2, 1);
    check_loss<SwitchBalanceLoss>(0.01, tokens, 8, 1, 2);
    check_loss<RouterZLoss>(0.001, tokens, 8, 2, 3);
    check_loss<ImportanceLoss>(0.1, tokens, 8, 2, 4);
  }
  check_loss<EntropyLoss>(0.01, 50, 6, 2, 5, 60.0);  // columns whose softmax mass underflows: log space
  check_loss<EntropyLoss>(0.01, 0, 6, 2, 6);
}


TEST_CASE("cuda MoE layer equals the CPU layer, forward and backward", "[cuda][moe]") {
  const index_t d = 16, E = 8, G = 12;
  SECTION("sigma-MoE: sigmoid top-4, expert dropout, entropy regularization") {
    TopKRouterConfig rc{.d_model = d, .experts = E, .k = 4, .expert_dropout = {.rate = 0.2, .seed = 3}};
    MoE host(SigmoidTopK<float>(rc), ReluExperts<float>({d, E, G}), WeightedSum<float>{}, EntropyLoss<float>(0.01));
    MoE device(SigmoidTopK<float, dev>(rc), ReluExperts<float, dev>({d, E, G}), WeightedSum<float, dev>{},
               EntropyLoss<float, dev>(0.01));
    check_layer(host, device, 96, 1);
  }
  SECTION("Mixtral-style: softmax top-2 renormalized, SwiGLU, Switch + z-loss") {
    TopKRouterConfig rc{.d_model = d, .experts = E, .k = 2};
    MoE host(TopKRouter<float, SoftmaxGate>(rc, {true}), SwiGluExperts<float>({d, E, G}), WeightedSum<float>{},
             SwitchBalanceLoss<float>(0.01), RouterZLoss<float>(0.001));
    MoE device(TopKRouter<float, SoftmaxGate, dev>(rc, {true}), SwiGluExperts<float, dev>({d, E, G}),
               WeightedSum<float, dev>{}, SwitchBalanceLoss<float, dev>(0.01), RouterZLoss<float, dev>(0.001));
    check_layer(host, device, 64, 2);
  }
  SECTION("Switch: softmax top-1, GELU with biases, importance loss; one token") {
    TopKRouterConfig rc{.d_model = d, .experts = E, .k = 1};
    MoE host(SoftmaxTopK<float>(rc), GeluExperts<float>({d, E, G, true}), WeightedSum<float>{}, ImportanceLoss<float>(0.1));
    MoE device(SoftmaxTopK<float, dev>(rc), GeluExperts<float, dev>({d, E, G, true}), WeightedSum<float, dev>{},
               ImportanceLoss<float, dev>(0.1));
    check_layer(host, device, 1, 3);
  }
  SECTION("DeepSeek-V3-style: group-limited top-k with a selection bias, SwiGLU, Switch loss") {
    GroupTopKRouterConfig rc{.d_model = d, .experts = E, .k = 2, .n_groups = 4, .topk_groups = 2, .route_scale = 2.5};
    MoE host(GroupTopKRouter<float>(rc), SwiGluExperts<float>({d, E, G}), WeightedSum<float>{}, SwitchBalanceLoss<float>(0.01));
    MoE device(GroupTopKRouter<float, dev>(rc), SwiGluExperts<float, dev>({d, E, G}), WeightedSum<float, dev>{},
               SwitchBalanceLoss<float, dev>(0.01));
    check_layer(host, device, 80, 5);
  }
  SECTION("hash layer: token ids, importance loss") {
    const index_t tokens = 40;
    Tensor<std::int64_t> ids({tokens});
    for (index_t t = 0; t < tokens; ++t) ids[t] = (t * 7919) % 23 - 5;  // repeats and negative ids
    HashRouter<float> hr({.d_model = d, .experts = E, .seed = 3});
    hr.set_token_ids(ids.span());
    HashRouter<float, dev> dr({.d_model = d, .experts = E, .seed = 3});
    dr.set_token_ids(to_device(ids));
    MoE host(std::move(hr), ReluExperts<float>({d, E, G, true}), WeightedSum<float>{}, ImportanceLoss<float>(0.1));
    MoE device(std::move(dr), ReluExperts<float, dev>({d, E, G, true}), WeightedSum<float, dev>{},
               ImportanceLoss<float, dev>(0.1));
    check_layer(host, device, tokens, 6);
  }
  SECTION("no losses, k = E") {
    TopKRouterConfig rc{.d_model = d, .experts = 4, .k = 4};
    MoE host(SigmoidTopK<float>(rc), ReluExperts<float>({d, 4, G}));
    MoE device(SigmoidTopK<float, dev>(rc), ReluExperts<float, dev>({d, 4, G}));
    check_layer(host, device, 20, 4);
  }
}

TEST_CASE("cuda AdamW: the CPU's updates; fp32 master weights for bf16 parameters", "[cuda][train]") {
  const index_t d = 12, E = 6, G = 8, tokens = 50;
  TopKRouterConfig rc{.d_model = d, .experts = E, .k = 2};
  MoE host(SigmoidTopK<float>(rc), ReluExperts<float>({d, E, G, true}), WeightedSum<float>{}, EntropyLoss<float>(0.01));
  sigma_moe_init(host, {.seed = 8});
  const AdamWConfig config{.lr = 0.01, .weight_decay = 0.1};
  const NoDecayRule rule = no_decay_if_name_ends_with({"b1", "b2"});
  SECTION("fp32 parameters: the CPU's values") {
    MoE device(SigmoidTopK<float, dev>(rc), ReluExperts<float, dev>({d, E, G, true}), WeightedSum<float, dev>{},
               EntropyLoss<float, dev>(0.01));
    copy_parameters_to_device(host, device);
    AdamW<float> cpu_opt(config, rule);
    AdamW<float, dev> dev_opt(config, rule);
    for (int step = 0; step < 3; ++step) {
      const Tensor<float> x = random_matrix<float>(tokens, d, 10 + step), dy = random_matrix<float>(tokens, d, 20 + step);
      Tensor<float> y({tokens, d}), dx({tokens, d});
      zero_grad(host);
      zero_grad(device);
      host.forward(x.matrix(), y.matrix(), Mode::train);
      host.backward(dy.matrix(), dx.matrix());
      const auto xd = to_device(x);
      Tensor<float, dev> yd({tokens, d}), dxd({tokens, d});
      device.forward(xd.matrix(), yd.matrix(), Mode::train);
      device.backward(to_device(dy).matrix(), dxd.matrix());
      cpu_opt.step(host);
      dev_opt.step(device);
    }
    for_each_parameter_pair(host, device, [&](std::string_view name, auto& hp, auto& dp) {
      require_close_scaled(to_host(dp.value), hp.value, 1e-5, std::string(name));
    });
  }
  SECTION("bf16 experts: updates below bf16's resolution accumulate in the master weights") {
    MoE device(SigmoidTopK<bf16, dev>(rc), ReluExperts<bf16, dev>({d, E, G, true}), WeightedSum<bf16, dev>{});
    copy_parameters_to_device(host, device);
    AdamW<float, dev> opt({.lr = 1e-5, .weight_decay = 0.0});
    const auto before = to_host<float>(device.experts().w1().value);
    device.experts().w1().grad.fill(from_acc<bf16>(1.0f));  // a constant gradient: each step moves w1 by lr
    for (int step = 0; step < 50; ++step) opt.step(device);
    const auto after = to_host<float>(device.experts().w1().value);
    const auto& master = opt.state().at("experts.w1").master;
    REQUIRE(master.size() == after.size());
    const auto m = to_host(master);
    index_t moved = 0;
    for (index_t i = 0; i < m.size(); ++i) {
      CHECK(m[i] == Approx(double(to_acc(from_acc<bf16>(before[i]))) - 50 * 1e-5).margin(1e-5));
      moved += after[i] != before[i] ? 1 : 0;
    }
    CHECK(moved > 0);  // 5e-4 in total crosses bf16's spacing for the small weights
  }
}

TEST_CASE("cuda MoE layer: deterministic, bitwise equal across runs", "[cuda][moe]") {
  const index_t d = 16, E = 8, G = 8, tokens = 128;
  auto run = [&] {
    TopKRouterConfig rc{.d_model = d, .experts = E, .k = 2, .expert_dropout = {.rate = 0.1, .seed = 1}};
    MoE host(SigmoidTopK<float>(rc), ReluExperts<float>({d, E, G}));
    sigma_moe_init(host, {.seed = 5});
    MoE device(SigmoidTopK<float, dev>(rc), ReluExperts<float, dev>({d, E, G}), WeightedSum<float, dev>{},
               EntropyLoss<float, dev>(0.01));
    copy_parameters_to_device(host, device);
    const auto x = to_device(random_matrix<float>(tokens, d, 1));
    Tensor<float, dev> y({tokens, d}), dx({tokens, d});
    device.forward(x.matrix(), y.matrix(), Mode::train);
    device.backward(to_device(random_matrix<float>(tokens, d, 2)).matrix(), dx.matrix());
    std::vector<float> all;
    for (const auto& t : {to_host(y), to_host(dx), to_host(device.experts().w1().grad), to_host(device.router().weight().grad)})
      all.insert(all.end(), t.data(), t.data() + t.size());
    return all;
  };
  const auto a = run(), b = run();
  REQUIRE(a.size() == b.size());
  CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

TEST_CASE("cuda MoE layer: bad input is refused with the argument named", "[cuda][moe]") {
  const index_t d = 8, E = 4;
  MoE device(SigmoidTopK<float, dev>({.d_model = d, .experts = E, .k = 2}), ReluExperts<float, dev>({d, E, 4}));
  Tensor<float, dev> x({5, d}), y({5, d}), wrong({5, d + 1});
  CHECK_THROWS_WITH(device.forward(std::as_const(x).matrix(), wrong.matrix()), Catch::Contains("y must be [5, 8], got [5, 9]"));
  CHECK_THROWS_WITH(device.backward(std::as_const(x).matrix(), y.matrix()), Catch::Contains("backward called before forward"));
  Tensor<float> host_x = random_matrix<float>(5, d, 1);
  host_x[7] = std::numeric_limits<float>::quiet_NaN();
  copy(host_x, x);
  device.validate_inputs = true;
  CHECK_THROWS_WITH(device.forward(std::as_const(x).matrix(), y.matrix()), Catch::Contains("x row 0 is not finite (column 7"));
  CHECK_THROWS_WITH((MoE(SigmoidTopK<float, dev>({.d_model = d, .experts = E + 1, .k = 2}), ReluExperts<float, dev>({d, E, 4}))),
                    Catch::Contains("router.experts()"));
}
