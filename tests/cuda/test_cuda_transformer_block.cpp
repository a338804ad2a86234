// TransformerBlock written once for both backends: a block of device parts against the same block
// of CPU parts, forward and backward over several steps: causal self-attention (grouped-query,
// RoPE), a sigma-MoE FFN, and in the norms' places a small MLP (any part with the norm's
// interface), so the test checks the block's own work: the residual additions, the order of the
// parts, the gradient flow.
#include "device_test_support.hpp"

namespace block_test {

template <class Backend>
auto make_block(index_t d) {
  using Norm = DenseMLP<float, Relu, Backend>;
  const TopKRouterConfig rc{.d_model = d, .experts = 6, .k = 2};
  return TransformerBlock(Norm({.d_model = d, .hidden = 8}),
                          CausalSelfAttention<float, Backend>({.d_model = d, .heads = 4, .kv_heads = 2, .block = 4}),
                          Norm({.d_model = d, .hidden = 8, .bias = true}),
                          MoE(SigmoidTopK<float, Backend>(rc), ReluExperts<float, Backend>({d, 6, 10}),
                              WeightedSum<float, Backend>{}, EntropyLoss<float, Backend>(0.01)));
}

}  // namespace block_test

TEST_CASE("cuda TransformerBlock: the block of device parts equals the CPU block", "[cuda][transformer]") {
  const index_t d = 16;
  auto host = block_test::make_block<cpu>(d);
  auto device = block_test::make_block<dev>(d);
  static_assert(std::is_same_v<decltype(device)::backend, smoe::cuda>);
  std::uint64_t s = 40;
  host.for_each_parameter([&](std::string_view, Parameter<float>& p) { smoe::test::randomize(p.value, ++s, 0.3); });
  copy_parameters_to_device(host, device);
  for (const index_t sequences : {index_t(3), index_t(1)}) {
    const index_t N = 3 * 7;
    INFO("sequences " << sequences);
    const Tensor<float> x = random_matrix<float>(N, d, 1 + std::uint64_t(sequences));
    const Tensor<float> dy = random_matrix<float>(N, d, 2 + std::uint64_t(sequences));
    Tensor<float> y({N, d}), dx({N, d});
    zero_grad(host);
    zero_grad(device);
    const auto out = host.forward(x.matrix(), y.matrix(), sequences, Mode::train);
    host.backward(dy.matrix(), dx.matrix());
    const auto xd = to_device(x);
    auto yd = device_nan<float>({N, d}), dxd = device_nan<float>({N, d});
    device.forward(xd.matrix(), yd.matrix(), sequences, Mode::train);
    device.backward(to_device(dy).matrix(), dxd.matrix());
    require_close_scaled(to_host(yd), y, 1e-5, "y");
    require_close_scaled(to_host(dxd), dx, 1e-5, "dx");
    CHECK(device.ffn().read_losses().aux_loss == Approx(out.aux_loss).epsilon(1e-5));
    for_each_parameter_pair(host, device, [&](std::string_view name, auto& hp, auto& dp) {
      require_close_scaled(to_host(dp.grad), hp.grad, 1e-5, std::string(name) + ".grad");
    });
  }
  Tensor<float, dev> x({6, d}), wrong({6, d + 1});
  CHECK_THROWS_WITH(device.forward(std::as_const(x).matrix(), wrong.matrix(), 2), Catch::Contains("y must be [6, 16]"));
  CHECK_THROWS_WITH(device.forward(std::as_const(x).matrix(), x.matrix(), 2), Catch::Contains("y must not be the memory of x"));
}
