// The expert sets shared across layers on the device against their CPU twins: WideNet's tied
// experts and SaMoE's pooled experts (weight and output space, all or the top r members, with and
// without biases), each inside MoE layers, over two layers that accumulate into one set or pool;
// DeepSeekMoE's shared experts and PR-MoE's residual expert around a routed layer.
#include "device_test_support.hpp"

namespace pools_test {

// A layer's parameters including its layer parameters (SaMoE's "combine"), as one visitable part.
template <class Layer>
struct LayerParameters {
  Layer& layer;
  template <class F>
  void for_each_parameter(F&& f) {
    for_each_layer_parameter(layer, f);
  }
};

// Random values for the shared set/pool and every layer on the host, copied to the device; then
// `steps` training steps through every layer in turn, comparing y and dx per layer and, after each
// step, the gradients of the set/pool and of each layer.
template <class HostShared, class DeviceShared, class HostLayer, class DeviceLayer>
void check_shared(HostShared& host_shared, DeviceShared& device_shared, std::vector<HostLayer*> host_layers,
                  std::vector<DeviceLayer*> device_layers, index_t tokens, std::uint64_t seed, int steps = 2) {
  REQUIRE(host_layers.size() == device_layers.size());
  std::uint64_t s = seed;
  auto randomize = [&](std::string_view name, Parameter<float>& p) {
    smoe::test::randomize(p.value, ++s, name == "combine" ? 1.5 : 0.3);
  };
  host_shared.for_each_parameter(randomize);
  copy_parameters_to_device(host_shared, device_shared);
  for (std::size_t i = 0; i < host_layers.size(); ++i) {
    LayerParameters<HostLayer> hp{*host_layers[i]};
    LayerParameters<DeviceLayer> dp{*device_layers[i]};
    hp.for_each_parameter(randomize);
    copy_parameters_to_device(hp, dp);
  }
  const index_t d = host_layers[0]->d_model();
  for (int step = 0; step < steps; ++step) {
    zero_grad(host_shared);
    zero_grad(device_shared);
    for (std::size_t i = 0; i < host_layers.size(); ++i) {
      LayerParameters<HostLayer> hp{*host_layers[i]};
      LayerParameters<DeviceLayer> dp{*device_layers[i]};
      zero_grad(hp);
      zero_grad(dp);
    }
    for (std::size_t i = 0; i < host_layers.size(); ++i) {
      INFO("step " << step << ", layer " << i);
      const std::uint64_t at = seed + 100 * std::uint64_t(step) + 10 * i;
      const Tensor<float> x = random_matrix<float>(tokens, d, at + 1), dy = random_matrix<float>(tokens, d, at + 2);
      Tensor<float> y({tokens, d}), dx({tokens, d});
      host_layers[i]->forward(x.matrix(), y.matrix(), Mode::train);
      host_layers[i]->backward(dy.matrix(), dx.matrix());
      const auto xd = to_device(x);
      auto yd = device_nan<float>({tokens, d}), dxd = device_nan<float>({tokens, d});
      device_layers[i]->forward(xd.matrix(), yd.matrix(), Mode::train);
      device_layers[i]->backward(to_device(dy).matrix(), dxd.matrix());
      require_close_scaled(to_host(yd), y, 1e-5, "y");
      require_close_scaled(to_host(dxd), dx, 1e-5, "dx");
    }
    for_each_parameter_pair(host_shared, device_shared, [&](std::string_view name, auto& hp, auto& dp) {
      require_close_scaled(to_host(dp.grad), hp.grad, 1e-5, "shared " + std::string(name) + ".grad");
    });
    for (std::size_t i = 0; i < host_layers.size(); ++i) {
      LayerParameters<HostLayer> hp{*host_layers[i]};
      LayerParameters<DeviceLayer> dp{*device_layers[i]};
      for_each_parameter_pair(hp, dp, [&](std::string_view name, auto& h, auto& dv) {
        require_close_scaled(to_host(dv.grad), h.grad, 1e-5, "layer " + std::to_string(i) + " " + std::string(name) + ".grad");
      });
    }
  }
}

template <class Space>
void check_samoe(index_t members, index_t top_members, bool bias, index_t tokens, std::uint64_t seed) {
  const index_t d = 12, E = 4, G = 8;
  INFO(Space::name << ", M " << members << ", r " << top_members << ", bias " << bias << ", tokens " << tokens);
  const ExpertPoolConfig pc{.d_model = d, .experts = E, .hidden = G, .members = members, .bias = bias};
  ExpertPool<float, Relu> host_pool(pc);
  ExpertPool<float, Relu, dev> device_pool(pc);
  using HostLayer = MoE<SigmoidTopK<float>, SaMoEExperts<float, Relu, Space>, WeightedSum<float>, EntropyLoss<float>>;
  using DeviceLayer = MoE<SigmoidTopK<float, dev>, SaMoEExperts<float, Relu, Space, dev>, WeightedSum<float, dev>,
                          EntropyLoss<float, dev>>;
  std::vector<HostLayer> host;
  std::vector<DeviceLayer> device;
  host.reserve(2);
  device.reserve(2);
  for (index_t l = 0; l < 2; ++l) {
    const TopKRouterConfig rc{.d_model = d, .experts = E, .k = 2};
    const SaMoEConfig sc{.layer = l, .temperature = 0.7, .top_members = top_members};
    host.emplace_back(SigmoidTopK<float>(rc), SaMoEExperts<float, Relu, Space>(host_pool, sc), WeightedSum<float>{},
                      EntropyLoss<float>(0.01));
    device.emplace_back(SigmoidTopK<float, dev>(rc), SaMoEExperts<float, Relu, Space, dev>(device_pool, sc),
                        WeightedSum<float, dev>{}, EntropyLoss<float, dev>(0.01));
  }
  check_shared(host_pool, device_pool, std::vector<HostLayer*>{&host[0], &host[1]},
               std::vector<DeviceLayer*>{&device[0], &device[1]}, tokens, seed);
  // α as the CPU computes it (same logits after check_shared's copy).
  const auto expected = host[1].experts().coefficients();
  const auto actual = device[1].experts().coefficients();
  REQUIRE(actual.size() == expected.size());
  for (std::size_t m = 0; m < expected.size(); ++m) CHECK(actual[m] == Approx(expected[m]).epsilon(1e-6).margin(1e-7));
}

}  // namespace pools_test

TEST_CASE("cuda TiedExperts: layers sharing one expert set accumulate its gradients", "[cuda][pools]") {
  const index_t d = 12, E = 6, G = 8;
  for (const bool bias : {false, true}) {
    INFO("bias " << bias);
    SwiGluExperts<float> host_set({d, E, G, bias});
    SwiGluExperts<float, dev> device_set({d, E, G, bias});
    using HostLayer = MoE<SoftmaxTopK<float>, TiedExperts<float, SwiGlu>, WeightedSum<float>, SwitchBalanceLoss<float>>;
    using DeviceLayer = MoE<SoftmaxTopK<float, dev>, TiedExperts<float, SwiGlu, dev>, WeightedSum<float, dev>,
                            SwitchBalanceLoss<float, dev>>;
    const TopKRouterConfig rc{.d_model = d, .experts = E, .k = 2};
    HostLayer h0(SoftmaxTopK<float>(rc), TiedExperts<float, SwiGlu>(host_set), {}, SwitchBalanceLoss<float>(0.01));
    HostLayer h1(SoftmaxTopK<float>(rc), TiedExperts<float, SwiGlu>(host_set), {}, SwitchBalanceLoss<float>(0.01));
    DeviceLayer d0(SoftmaxTopK<float, dev>(rc), TiedExperts<float, SwiGlu, dev>(device_set), {},
                   SwitchBalanceLoss<float, dev>(0.01));
    DeviceLayer d1(SoftmaxTopK<float, dev>(rc), TiedExperts<float, SwiGlu, dev>(device_set), {},
                   SwitchBalanceLoss<float, dev>(0.01));
    pools_test::check_shared(host_set, device_set, std::vector<HostLayer*>{&h0, &h1}, std::vector<DeviceLayer*>{&d0, &d1}, 40,
                             3 + bias);
  }
}

TEST_CASE("cuda SharedExpertsMoE: DeepSeekMoE's shared experts around a routed layer", "[cuda][pools]") {
  const index_t d = 12, E = 6, G = 8;
  for (const index_t Ns : {index_t(1), index_t(3)}) {
    for (const index_t tokens : {index_t(37), index_t(1), index_t(0)}) {
      INFO("N_s " << Ns << ", tokens " << tokens);
      const GroupTopKRouterConfig rc{.d_model = d, .experts = E, .k = 2, .n_groups = 3, .topk_groups = 2};
      const SharedExpertsConfig sc{.experts = Ns, .hidden = 5, .bias = Ns == 3};
      SharedExpertsMoE<MoE<GroupTopKRouter<float>, SwiGluExperts<float>, WeightedSum<float>, SwitchBalanceLoss<float>>, SwiGlu>
          host(MoE(GroupTopKRouter<float>(rc), SwiGluExperts<float>({d, E, G}), WeightedSum<float>{},
                   SwitchBalanceLoss<float>(0.01)),
               sc);
      SharedExpertsMoE<MoE<GroupTopKRouter<float, dev>, SwiGluExperts<float, dev>, WeightedSum<float, dev>,
                           SwitchBalanceLoss<float, dev>>,
                       SwiGlu>
          device(MoE(GroupTopKRouter<float, dev>(rc), SwiGluExperts<float, dev>({d, E, G}), WeightedSum<float, dev>{},
                     SwitchBalanceLoss<float, dev>(0.01)),
                 sc);
      check_layer(host, device, tokens, 7 + std::uint64_t(Ns));
      CHECK(device.total_parameters() == host.total_parameters());
      CHECK(device.flops_per_token() == host.flops_per_token());
    }
  }
}

TEST_CASE("cuda ResidualMoE: PR-MoE's residual MLP mixed by a learned per-token softmax", "[cuda][pools]") {
  const index_t d = 12, E = 4, G = 8;
  for (const bool bias : {false, true}) {
    for (const index_t tokens : {index_t(30), index_t(1), index_t(0)}) {
      INFO("bias " << bias << ", tokens " << tokens);
      const TopKRouterConfig rc{.d_model = d, .experts = E, .k = 1};
      const ResidualConfig c{.hidden = 10, .bias = bias, .mix_bias = bias};
      ResidualMoE<MoE<SoftmaxTopK<float>, GeluExperts<float>, WeightedSum<float>, SwitchBalanceLoss<float>>, Gelu> host(
          MoE(SoftmaxTopK<float>(rc), GeluExperts<float>({d, E, G}), WeightedSum<float>{}, SwitchBalanceLoss<float>(0.01)),
          c);
      ResidualMoE<MoE<SoftmaxTopK<float, dev>, GeluExperts<float, dev>, WeightedSum<float, dev>,
                      SwitchBalanceLoss<float, dev>>,
                  Gelu>
          device(MoE(SoftmaxTopK<float, dev>(rc), GeluExperts<float, dev>({d, E, G}), WeightedSum<float, dev>{},
                     SwitchBalanceLoss<float, dev>(0.01)),
                 c);
      check_layer(host, device, tokens, 11 + std::uint64_t(bias));
      if (tokens > 0) require_close_scaled(to_host(device.coefficients()), host.coefficients(), 1e-5, "coefficients");
      CHECK(device.total_parameters() == host.total_parameters());
    }
  }
}

TEST_CASE("cuda SaMoEExperts: weight and output space over a device pool", "[cuda][pools]") {
  using pools_test::check_samoe;
  check_samoe<WeightSpace>(3, 0, false, 48, 1);
  check_samoe<WeightSpace>(4, 2, true, 33, 2);
  check_samoe<WeightSpace>(1, 0, false, 1, 3);
  check_samoe<OutputSpace>(3, 0, true, 48, 4);
  check_samoe<OutputSpace>(5, 2, false, 40, 5);
  check_samoe<OutputSpace>(2, 1, false, 0, 6);
}

TEST_CASE("cuda SaMoEExperts: frozen weight space equals the per-step one; deterministic", "[cuda][pools]") {
  const index_t d = 8, E = 4, G = 6, tokens = 30;
  const ExpertPoolConfig pc{.d_model = d, .experts = E, .hidden = G, .members = 3, .bias = true};
  ExpertPool<float, Relu> host_pool(pc);
  init_expert_pool(host_pool, {.seed = 4});
  auto run = [&](bool freeze) {
    ExpertPool<float, Relu, dev> pool(pc);
    copy_parameters_to_device(host_pool, pool);
    SaMoEExperts<float, Relu, WeightSpace, dev> experts(pool, {.layer = 1, .init = CombineInit::member});
    MoE layer(SigmoidTopK<float, dev>({.d_model = d, .experts = E, .k = 2}), std::move(experts));
    if (freeze) layer.experts().freeze();
    const auto x = to_device(random_matrix<float>(tokens, d, 1));
    Tensor<float, dev> y({tokens, d}), dx({tokens, d});
    layer.forward(x.matrix(), y.matrix(), Mode::train);
    layer.backward(to_device(random_matrix<float>(tokens, d, 2)).matrix(), dx.matrix());
    std::vector<float> all;
    for (const auto& t : {to_host(y), to_host(dx), to_host(pool.w1().grad), to_host(layer.experts().combine().grad)})
      all.insert(all.end(), t.data(), t.data() + t.size());
    return all;
  };
  const auto a = run(false), b = run(false), c = run(true);
  REQUIRE(a.size() == b.size());
  CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
  CHECK(std::memcmp(a.data(), c.data(), a.size() * sizeof(float)) == 0);
}

TEST_CASE("cuda SaMoEExperts: bad configuration and misuse are refused", "[cuda][pools]") {
  const ExpertPoolConfig pc{.d_model = 8, .experts = 4, .hidden = 6, .members = 40};
  ExpertPool<float, Relu, dev> pool(pc);
  CHECK_THROWS_WITH((SaMoEExperts<float, Relu, OutputSpace, dev>(pool, {.top_members = 33})),
                    Catch::Contains("top_members below the pool size must be <= 32"));
  CHECK_THROWS_WITH((SaMoEExperts<float, Relu, OutputSpace, dev>(pool, {.top_members = 41})),
                    Catch::Contains("top_members must be in [0, members = 40]"));
  SaMoEExperts<float, Relu, WeightSpace, dev> experts(pool);
  ExpertPool<float, Relu, dev> other({.d_model = 8, .experts = 4, .hidden = 7, .members = 40});
  CHECK_THROWS_WITH(experts.bind(other), Catch::Contains("bind needs a pool of the same shape"));
  Dispatch<float, dev> dispatch;
  Tensor<float, dev> x({3, 8}), ys({6, 8}), dx({3, 8});
  const auto ids = to_device(random_routing(3, 2, 4, 1, 0.0).ids);
  const auto gates = to_device(random_routing(3, 2, 4, 1, 0.0).gates);
  build_dispatch(ids.matrix(), gates.matrix(), 4, dispatch, pool.stream());
  CHECK_THROWS_WITH(experts.backward(std::as_const(x).matrix(), dispatch, std::as_const(ys).matrix(), dx.matrix()),
                    Catch::Contains("backward needs the forward of the same dispatch first"));
}
