#include "device_test_support.hpp"

// The transformer's non-attention layers on the device (RMSNorm, LayerNorm, Embedding,
// OutputProjection, SoftmaxCrossEntropy), each against its CPU twin on the same random inputs.
namespace smoe_cuda_transformer_layers_test {

// Host copies of a device run's outputs, in a fixed order: what two runs must agree on bitwise.
using Outputs = std::vector<Tensor<float>>;

template <class T>
Tensor<float> random_rounded(index_t rows, index_t cols, std::uint64_t seed, double std = 1.0) {
  return rounded<T>(smoe::test::random_matrix<float>(rows, cols, seed, std));
}

// Random host parameters, rounded through T so that both sides start from the same values.
template <class T, class Host>
void randomize_parameters(Host& host, std::uint64_t seed, double std) {
  host.for_each_parameter([&](std::string_view, Parameter<float>& p) {
    smoe::test::randomize(p.value, ++seed, std);
    p.value = rounded<T>(p.value);
  });
}

template <class Device>
void append_grads(Device& device, Outputs& out) {
  device.for_each_parameter([&](std::string_view, auto& p) { out.push_back(to_host<float>(p.grad)); });
}

inline void require_bitwise_equal(const Outputs& a, const Outputs& b) {
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    INFO("output " << i);
    REQUIRE(a[i].size() == b[i].size());
    CHECK(std::memcmp(a[i].data(), b[i].data(), sizeof(float) * std::size_t(a[i].size())) == 0);
  }
}

// A normalization layer (RMSNorm or LayerNorm): y, dx and every parameter gradient against the CPU
// (gradients accumulated over two backward calls' worth: the device grads start non-zero), and
// two device runs bitwise equal.
template <class T, template <class, class> class Norm, class Config>
void check_norm(Config config, index_t tokens, std::uint64_t seed) {
  const index_t d = config.d_model;
  using Host = Norm<float, cpu>;
  INFO(Host::name << " " << dtype_name<T>() << ", tokens " << tokens << ", d " << d << ", eps "
                              << config.eps);
  Host host(config);
  Norm<T, dev> device(config);
  randomize_parameters<T>(host, seed, 0.7);
  copy_parameters_to_device(host, device);
  const Tensor<float> x = random_rounded<T>(tokens, d, seed + 1, 2.0), dy = random_rounded<T>(tokens, d, seed + 2);
  Tensor<float> y({tokens, d}), dx({tokens, d});
  zero_grad(host);
  host.forward(x.matrix(), y.matrix());
  host.backward(dy.matrix(), dx.matrix());
  const auto xd = to_device<T>(x), dyd = to_device<T>(dy);
  Outputs runs[2];
  for (Outputs& run : runs) {
    zero_grad(device);
    auto yd = device_nan<T>({tokens, d}), dxd = device_nan<T>({tokens, d});
    device.forward(xd.matrix(), yd.matrix());
    device.backward(dyd.matrix(), dxd.matrix());
    run = {to_host<float>(yd), to_host<float>(dxd)};
    append_grads(device, run);
  }
  const double tol = device_tolerance<T>();
  require_close_scaled(runs[0][0], y, tol, "y");
  require_close_scaled(runs[0][1], dx, tol, "dx");
  std::size_t i = 2;
  host.for_each_parameter([&](std::string_view name, Parameter<float>& p) {
    require_close_scaled(runs[0][i++], p.grad, tol, std::string(name) + ".grad");
  });
  require_bitwise_equal(runs[0], runs[1]);
}

template <template <class, class> class Norm, class Config>
void check_norm_errors(Config config) {
  using Device = Norm<float, dev>;
  Device device(config);
  const index_t d = config.d_model;
  auto x = device_nan<float>({3, d}), y = device_nan<float>({3, d}), small = device_nan<float>({3, d + 1});
  REQUIRE_THROWS_WITH(device.backward(x.matrix(), y.matrix()), Catch::Contains("backward called before forward"));
  REQUIRE_THROWS_WITH(device.forward(small.matrix(), y.matrix()), Catch::Contains("x"));
  REQUIRE_THROWS_WITH(device.forward(x.matrix(), small.matrix()), Catch::Contains("y"));
  x.zero();
  device.forward(x.matrix(), y.matrix());
  REQUIRE_THROWS_WITH(device.backward(small.matrix(), y.matrix()), Catch::Contains("dy"));
  REQUIRE_THROWS_WITH(device.backward(x.matrix(), small.matrix()), Catch::Contains("dx"));
  device.validate_inputs = true;
  auto nan_x = device_nan<float>({3, d});
  REQUIRE_THROWS_WITH(device.forward(nan_x.matrix(), y.matrix()), Catch::Contains("x") && Catch::Contains("finite"));
  Config bad = config;
  bad.d_model = 0;
  REQUIRE_THROWS_WITH(Device(bad), Catch::Contains("d_model"));
  bad = config;
  bad.eps = 0;
  REQUIRE_THROWS_WITH(Device(bad), Catch::Contains("eps"));
}

}  // namespace smoe_cuda_transformer_layers_test

using namespace smoe_cuda_transformer_layers_test;

TEST_CASE("cuda RMSNorm equals the CPU layer, forward and backward", "[cuda][transformer][norm]") {
  check_norm<float, RMSNorm>(RMSNormConfig{.d_model = 24}, 70, 1);
  check_norm<double, RMSNorm>(RMSNormConfig{.d_model = 16}, 33, 2);
  check_norm<bf16, RMSNorm>(RMSNormConfig{.d_model = 32}, 40, 3);
  check_norm<fp16, RMSNorm>(RMSNormConfig{.d_model = 32}, 40, 4);
  check_norm<float, RMSNorm>(RMSNormConfig{.d_model = 8}, 0, 5);                  // no tokens
  check_norm<float, RMSNorm>(RMSNormConfig{.d_model = 8}, 1, 6);                  // one token
  check_norm<float, RMSNorm>(RMSNormConfig{.d_model = 1}, 9, 7);                  // d = 1
  check_norm<float, RMSNorm>(RMSNormConfig{.d_model = 12, .eps = 10.0}, 20, 8);  // eps dominates
  check_norm_errors<RMSNorm>(RMSNormConfig{.d_model = 4});
}

TEST_CASE("cuda LayerNorm equals the CPU layer, forward and backward", "[cuda][transformer][norm]") {
  check_norm<float, LayerNorm>(LayerNormConfig{.d_model = 24}, 70, 11);
  check_norm<double, LayerNorm>(LayerNormConfig{.d_model = 16}, 33, 12);
  check_norm<bf16, LayerNorm>(LayerNormConfig{.d_model = 32}, 40, 13);
  check_norm<fp16, LayerNorm>(LayerNormConfig{.d_model = 32}, 40, 14);
  check_norm<float, LayerNorm>(LayerNormConfig{.d_model = 8}, 0, 15);
  check_norm<float, LayerNorm>(LayerNormConfig{.d_model = 8}, 1, 16);
  check_norm<float, LayerNorm>(LayerNormConfig{.d_model = 1}, 9, 17);
  check_norm<float, LayerNorm>(LayerNormConfig{.d_model = 12, .eps = 10.0}, 20, 18);
  check_norm_errors<LayerNorm>(LayerNormConfig{.d_model = 4});
}
