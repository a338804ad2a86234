#include "device_test_support.hpp"

// CausalSelfAttention<T, cuda> against the CPU layer on the same weights and inputs.
namespace cuda_attention_test {

using namespace smoe;
using namespace smoe_cuda_test;

static_assert(std::is_same_v<CausalSelfAttention<float>::backend, cpu>, "the CPU spelling stays the CPU layer");
static_assert(std::is_same_v<CausalSelfAttention<float, dev>::backend, dev>);

struct Case {
  AttentionConfig config;
  index_t sequences, length, position_offset;
};

// fp32: 1e-5 of each tensor's scale (the CPU sums in Eigen blocks, the device per row; both
// accumulate in fp32, so they differ by rounding only). fp64: the same sums to ~1e-16, so a much
// tighter bound catches what fp32's would hide.
template <class T>
constexpr double tolerance() {
  return std::is_same_v<T, double> ? 1e-10 : 1e-5;
}

template <class T>
struct Results {
  Tensor<T> y, lse, dx, qkv_grad, out_grad;
};

template <class T>
Results<T> run_device(CausalSelfAttention<T, dev>& layer, const Tensor<T>& x, const Tensor<T>& dy, const Case& c,
                      int backwards = 1) {
  const index_t N = x.dim(0), d = x.dim(1);
  auto y = device_nan<T>({N, d}), dx = device_nan<T>({N, d});
  layer.forward(to_device(x).matrix(), y.matrix(), c.sequences, c.position_offset);
  const auto dy_device = to_device(dy);
  for (int i = 0; i < backwards; ++i) {
    poison(dx);
    layer.backward(dy_device.matrix(), dx.matrix());
  }
  return {to_host(y), to_host(layer.log_sum_exp()), to_host(dx), to_host(layer.qkv_weight().grad),
          to_host(layer.out_weight().grad)};
}

// Forward (y and the saved lse) and backward (dx and both weight gradients) on both sides;
// `backwards` > 1 also checks that the gradients accumulate.
template <class T>
void check_attention(const Case& c, std::uint64_t seed, int backwards = 1) {
  CausalSelfAttention<T> host(c.config);
  CausalSelfAttention<T, dev> device(c.config);
  std::uint64_t s = seed;
  host.for_each_parameter([&](std::string_view, Parameter<T>& p) { smoe::test::randomize(p.value, ++s, 0.3); });
  copy_parameters_to_device(host, device);
  const index_t N = c.sequences * c.length, d = c.config.d_model;
  const Tensor<T> x = random_matrix<T>(N, d, seed + 1), dy = random_matrix<T>(N, d, seed + 2);
  Tensor<T> y({N, d}), dx({N, d});
  zero_grad(host);
  zero_grad(device);
  host.forward(x.matrix(), y.matrix(), c.sequences, c.position_offset);
  for (int i = 0; i < backwards; ++i) host.backward(dy.matrix(), dx.matrix());
  const Results<T> r = run_device(device, x, dy, c, backwards);
  const double tol = tolerance<T>();
  require_close_scaled(r.y, y, tol, "y");
  require_close_scaled(r.lse, host.log_sum_exp(), tol, "lse");
  require_close_scaled(r.dx, dx, tol, "dx");
  require_close_scaled(r.qkv_grad, host.qkv_weight().grad, tol, "qkv.weight.grad");
  require_close_scaled(r.out_grad, host.out_weight().grad, tol, "out.weight.grad");
}

template <class T>
bool bitwise_equal(const Tensor<T>& a, const Tensor<T>& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), sizeof(T) * std::size_t(a.size())) == 0;
}

}  // namespace cuda_attention_test

using namespace cuda_attention_test;

TEST_CASE("cuda attention: forward and backward equal the CPU layer", "[cuda][attention]") {
  SECTION("multi-head, RoPE, several sequences, blocks smaller than L") {
    check_attention<float>({{.d_model = 12, .heads = 3, .block = 2}, 2, 5, 0}, 11);
  }
  SECTION("grouped-query (H_kv < H), explicit head_dim, position_offset") {
    check_attention<float>({{.d_model = 10, .heads = 4, .kv_heads = 2, .head_dim = 6, .block = 3}, 3, 7, 5}, 12);
  }
  SECTION("multi-query (H_kv = 1), L = 1") {
    check_attention<float>({{.d_model = 8, .heads = 4, .kv_heads = 1, .block = 4}, 4, 1, 3}, 13);
  }
  SECTION("one sequence of one token") { check_attention<float>({{.d_model = 4, .heads = 1}, 1, 1, 0}, 14); }
  SECTION("without RoPE, odd head_dim") {
    check_attention<float>({{.d_model = 9, .heads = 3, .rope = false, .block = 2}, 2, 6, 0}, 15);
  }
  SECTION("smallest RoPE head (d_head = 2), block = 1, a large position_offset") {
    check_attention<float>({{.d_model = 4, .heads = 2, .block = 1}, 2, 4, 100000}, 16);
  }
  SECTION("long sequence (L = 300): the CPU's 64-row blocks against the device's per-row order") {
    check_attention<float>({{.d_model = 16, .heads = 4, .kv_heads = 2}, 2, 300, 7}, 17);
  }
  SECTION("fp64, grouped-query, long sequence") {
    check_attention<double>({{.d_model = 12, .heads = 6, .kv_heads = 3, .block = 16}, 2, 70, 2}, 18);
  }
  SECTION("fp64, rope_base") {
    check_attention<double>({{.d_model = 8, .heads = 2, .rope_base = 500, .block = 3}, 3, 5, 1}, 19);
  }
  SECTION("weight gradients accumulate over backward calls") {
    check_attention<float>({{.d_model = 8, .heads = 2, .kv_heads = 1, .block = 2}, 2, 5, 0}, 20, 3);
  }
}

TEST_CASE("cuda attention: no tokens", "[cuda][attention]") {
  const AttentionConfig config{.d_model = 8, .heads = 2};
  CausalSelfAttention<float, dev> layer(config);
  Tensor<float, dev> x({0, 8}), y({0, 8}), dy({0, 8}), dx({0, 8});
  layer.forward(std::as_const(x).matrix(), y.matrix(), 1);
  layer.backward(std::as_const(dy).matrix(), dx.matrix());
  CHECK(layer.log_sum_exp().dim(0) == 0);
  const Tensor<float> grad = to_host(layer.qkv_weight().grad);
  for (index_t i = 0; i < grad.size(); ++i) REQUIRE(grad[i] == 0.0f);
}

TEST_CASE("cuda attention: two runs are bitwise equal", "[cuda][attention]") {
  const Case c{{.d_model = 16, .heads = 4, .kv_heads = 2, .block = 8}, 3, 40, 2};
  CausalSelfAttention<float> host(c.config);
  std::uint64_t s = 30;
  host.for_each_parameter([&](std::string_view, Parameter<float>& p) { smoe::test::randomize(p.value, ++s, 0.3); });
  const Tensor<float> x = random_matrix<float>(120, 16, 31), dy = random_matrix<float>(120, 16, 32);
  Results<float> runs[2];
  for (auto& r : runs) {
    CausalSelfAttention<float, dev> device(c.config);
    copy_parameters_to_device(host, device);
    zero_grad(device);
    r = run_device(device, x, dy, c);
  }
  CHECK(bitwise_equal(runs[0].y, runs[1].y));
  CHECK(bitwise_equal(runs[0].lse, runs[1].lse));
  CHECK(bitwise_equal(runs[0].dx, runs[1].dx));
  CHECK(bitwise_equal(runs[0].qkv_grad, runs[1].qkv_grad));
  CHECK(bitwise_equal(runs[0].out_grad, runs[1].out_grad));
}

TEST_CASE("cuda attention: parameters and accounting as the CPU layer", "[cuda][attention]") {
  const AttentionConfig config{.d_model = 12, .heads = 4, .kv_heads = 2, .head_dim = 5, .rope = false};
  CausalSelfAttention<float> host(config);
  CausalSelfAttention<float, dev> device(config);
  CHECK(device.qkv_width() == host.qkv_width());
  CHECK(device.total_parameters() == host.total_parameters());
  CHECK(device.flops_per_token(9) == host.flops_per_token(9));
  CHECK(device.qkv_weight().value.shape() == host.qkv_weight().value.shape());
  CHECK(device.out_weight().value.shape() == host.out_weight().value.shape());
  copy_parameters_to_device(host, device);  // names and shapes match one to one
}

TEST_CASE("cuda attention: bad input is refused before any state changes", "[cuda][attention]") {
  const AttentionConfig config{.d_model = 4, .heads = 2, .block = 2};
  CHECK_THROWS_WITH((CausalSelfAttention<float, dev>({.d_model = 4, .heads = 3})),
                    Catch::Contains("head_dim = 0 needs heads to divide d_model = 4, got heads = 3"));
  CHECK_THROWS_WITH((CausalSelfAttention<float, dev>({.d_model = 4, .heads = 4, .kv_heads = 3})),
                    Catch::Contains("kv_heads must divide heads = 4, got 3"));
  CausalSelfAttention<float, dev> layer(config);
  auto x = to_device(random_matrix<float>(6, 4, 40)), y = device_nan<float>({6, 4});
  auto dy = to_device(random_matrix<float>(6, 4, 41)), dx = device_nan<float>({6, 4});
  CHECK_THROWS_WITH(layer.backward(std::as_const(dy).matrix(), dx.matrix()), Catch::Contains("backward called before forward"));
  CHECK_THROWS_WITH(layer.forward(std::as_const(x).matrix(), y.matrix(), 0),
                    Catch::Contains("sequences must be >= 1, got 0"));
  CHECK_THROWS_WITH(layer.forward(std::as_const(x).matrix(), y.matrix(), 4),
                    Catch::Contains("x rows (B·L) must be a multiple of sequences = 4, got 6"));
  CHECK_THROWS_WITH(layer.forward(std::as_const(x).matrix(), y.matrix(), 2, -1),
                    Catch::Contains("position_offset must be >= 0, got -1"));
  auto x5 = device_nan<float>({6, 5});
  CHECK_THROWS_WITH(layer.forward(std::as_const(x5).matrix(), y.matrix(), 2),
                    Catch::Contains("CausalSelfAttention<cuda>: x must be [6, 4], got [6, 5]"));
  auto y_short = device_nan<float>({5, 4});
  CHECK_THROWS_WITH(layer.forward(std::as_const(x).matrix(), y_short.matrix(), 2),
                    Catch::Contains("y must be [6, 4], got [5, 4]"));
  // None of the refused calls reached the layer's state: backward still refuses.
  CHECK_THROWS_WITH(layer.backward(std::as_const(dy).matrix(), dx.matrix()), Catch::Contains("backward called before forward"));
  layer.forward(std::as_const(x).matrix(), y.matrix(), 2);
  auto dy_short = device_nan<float>({5, 4});
  CHECK_THROWS_WITH(layer.backward(std::as_const(dy_short).matrix(), dx.matrix()),
                    Catch::Contains("dy must be [6, 4], got [5, 4]"));
  auto dx_wide = device_nan<float>({6, 5});
  CHECK_THROWS_WITH(layer.backward(std::as_const(dy).matrix(), dx_wide.matrix()),
                    Catch::Contains("dx must be [6, 4], got [6, 5]"));
  layer.validate_inputs = true;
  auto x_nan = device_nan<float>({6, 4});
  CHECK_THROWS_WITH(layer.forward(std::as_const(x_nan).matrix(), y.matrix(), 2), Catch::Contains(": x"));
  CHECK_THROWS_WITH(layer.backward(std::as_const(x_nan).matrix(), dx.matrix()), Catch::Contains(": dy"));
}

// RoPE is relative (q_i·k_j depends on i − j only), so position_offset changes the layer's outputs
// by rounding alone: the device table and rotation are checked here directly against RotaryTable.
TEST_CASE("cuda attention: RoPE table and rotation equal RotaryTable's", "[cuda][attention]") {
  const index_t L = 5, heads = 3, dh = 8, W = heads * dh, half = dh / 2, sequences = 2;
  for (const index_t offset : {index_t(0), index_t(7), index_t(100000)}) {
    const Tensor<float> rows = random_matrix<float>(sequences * L, W, 50 + std::uint64_t(offset));
    RotaryTable<float> table;
    table.build(dh, 10000, offset, L);
    for (const bool back : {false, true}) {
      Tensor<float> expected = rows;
      for (index_t t = 0; t < sequences * L; ++t)
        for (index_t h = 0; h < heads; ++h) {
          float* v = expected.data() + t * W + h * dh;
          back ? table.rotate_back(v, t % L) : table.rotate(v, t % L);
        }
      auto device = to_device(rows);
      auto cos_table = device_nan<float>({L, half}), sin_table = device_nan<float>({L, half});
      cuda_kernels::for_each_index(cuda_stream{}, L * half,
                                   cuda_kernels::RopeTable<float>{10000, offset, dh, cos_table.data(), sin_table.data()});
      cuda_kernels::for_each_index(cuda_stream{}, sequences * L * heads * half,
                                   cuda_kernels::RopeRotate<float>{device.data(), cos_table.data(), sin_table.data(), L, W,
                                                                   heads, dh, back});
      require_close_scaled(to_host(device), expected, 1e-6, "rotated rows, offset " + std::to_string(offset));
    }
  }
}

namespace cuda_attention_test {

// 16-bit layers against the fp32 CPU layer on the same 16-bit-exact weights and inputs: the device
// rounds only x, y, dx and the weights' gradients (its working buffers are fp32), so within 2e-2.
template <class T>
void check_attention_16bit(const Case& c, std::uint64_t seed) {
  INFO(dtype_name<T>());
  CausalSelfAttention<float> host(c.config);
  CausalSelfAttention<T, dev> device(c.config);
  std::uint64_t s = seed;
  host.for_each_parameter([&](std::string_view, Parameter<float>& p) {
    smoe::test::randomize(p.value, ++s, 0.3);
    p.value = rounded<T>(p.value);
  });
  copy_parameters_to_device(host, device);
  const index_t N = c.sequences * c.length, d = c.config.d_model;
  const Tensor<float> x = rounded<T>(random_matrix<float>(N, d, seed + 1));
  const Tensor<float> dy = rounded<T>(random_matrix<float>(N, d, seed + 2));
  Tensor<float> y({N, d}), dx({N, d});
  zero_grad(host);
  zero_grad(device);
  host.forward(x.matrix(), y.matrix(), c.sequences, c.position_offset);
  host.backward(dy.matrix(), dx.matrix());
  const auto xd = to_device<T>(x), dyd = to_device<T>(dy);
  auto yd = device_nan<T>({N, d}), dxd = device_nan<T>({N, d});
  device.forward(xd.matrix(), yd.matrix(), c.sequences, c.position_offset);
  device.backward(dyd.matrix(), dxd.matrix());
  require_close_scaled(to_host<float>(yd), y, 2e-2, "y");
  require_close_scaled(to_host(device.log_sum_exp()), host.log_sum_exp(), 2e-2, "lse");
  require_close_scaled(to_host<float>(dxd), dx, 2e-2, "dx");
  require_close_scaled(to_host<float>(device.qkv_weight().grad), host.qkv_weight().grad, 2e-2, "qkv.weight.grad");
  require_close_scaled(to_host<float>(device.out_weight().grad), host.out_weight().grad, 2e-2, "out.weight.grad");
}

}  // namespace cuda_attention_test

TEST_CASE("cuda attention: bf16 and fp16 layers with fp32 working buffers", "[cuda][attention]") {
  check_attention_16bit<bf16>({{.d_model = 12, .heads = 3, .kv_heads = 1, .block = 2}, 2, 9, 3}, 31);
  check_attention_16bit<fp16>({{.d_model = 12, .heads = 3, .kv_heads = 1, .block = 2}, 2, 9, 3}, 32);
  check_attention_16bit<bf16>({{.d_model = 16, .heads = 4, .rope = false}, 1, 40, 0}, 33);
}
