#pragma once
// What every CUDA backend test shares (tests/cuda/test_cuda_*.cpp): the GPU presence check of the
// nvcc build, NaN-poisoned device buffers, scaled comparisons, random routings, and check_layer (a
// whole layer on both sides, forward and backward). The emulated build compiles each test source on
// its own; the nvcc build compiles them as one translation unit (nvcc/test_cuda_all.cu), so names
// local to a test source live in a namespace named after it.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include <smoe/cuda.cuh>
#include <smoe/smoe.hpp>

#include "catch.hpp"
#include "helpers.hpp"

#if !defined(SMOE_CUDA_EMULATION)
// The nvcc build on a machine without a usable GPU: say why and report "skipped" to ctest (77).
inline const bool gpu_present = [] {
  std::string why;
  if (smoe::cuda_device_available(&why)) return true;
  std::printf("test_cuda_backend: skipped, no usable CUDA device (%s)\n", why.c_str());
  std::exit(77);
}();
#endif

namespace smoe_cuda_test {

using namespace smoe;
using smoe::test::random_matrix;
using dev = smoe::cuda;  // `cuda` alone would be ambiguous with libcu++'s ::cuda namespace

template <class T>
void poison(Tensor<T, dev>& t) {
  t.fill(from_acc<T>(std::numeric_limits<acc_t<T>>::quiet_NaN()));
}

template <class T>
Tensor<T, dev> device_nan(std::vector<index_t> shape) {
  Tensor<T, dev> t(std::move(shape));
  poison(t);
  return t;
}

// max |actual − expected| <= tol · max(1, max |expected|) over the first `n` elements (all when
// n < 0): a relative error on the tensor's scale, so near-zero elements are judged fairly; NaN fails.
template <class A, class B>
void require_close_scaled(const A& actual, const B& expected, double tol, const std::string& what, index_t n = -1) {
  const index_t count = n < 0 ? index_t(expected.size()) : n;
  REQUIRE(index_t(actual.size()) >= count);
  double scale = 1, worst = 0;
  index_t worst_i = -1;
  for (index_t i = 0; i < count; ++i) scale = std::max(scale, std::abs(double(expected[i])));
  for (index_t i = 0; i < count; ++i) {
    const double err = std::abs(double(actual[i]) - double(expected[i]));
    if (!(err <= worst) || std::isnan(err)) {
      worst = std::isnan(err) ? std::numeric_limits<double>::infinity() : err;
      worst_i = i;
    }
  }
  INFO(what << ": worst element " << worst_i << " (" << (worst_i >= 0 ? double(actual[worst_i]) : 0.0) << " vs "
            << (worst_i >= 0 ? double(expected[worst_i]) : 0.0) << "), error " << worst << ", scale " << scale);
  CHECK(worst <= tol * scale);
}

template <class T>
constexpr double device_tolerance() {
  return sizeof(T) == 2 ? 2e-2 : 1e-5;
}

// The CPU tensor rounded through T and back to float: the inputs both sides see.
template <class T>
Tensor<float> rounded(const Tensor<float>& t) {
  Tensor<float> out(t.shape());
  for (index_t i = 0; i < t.size(); ++i) out[i] = to_acc(from_acc<T>(t[i]));
  return out;
}

// ids [T, K] with -1 holes and gates, for dispatch tests.
struct RandomRouting {
  Tensor<std::int32_t> ids;
  Tensor<float> gates;
};
inline RandomRouting random_routing(index_t tokens, index_t K, index_t E, std::uint64_t seed, double hole_rate) {
  RandomRouting r{Tensor<std::int32_t>({tokens, K}), Tensor<float>({tokens, K})};
  for (index_t i = 0; i < tokens * K; ++i) {
    const double u = uniform01(seed, std::uint64_t(i), 1);
    r.ids[i] = u < hole_rate ? -1 : std::int32_t(uniform01(seed, std::uint64_t(i), 2) * double(E));
    r.gates[i] = float(uniform01(seed, std::uint64_t(i), 3));
  }
  return r;
}

inline void require_same_dispatch(const Dispatch<float>& device, const Dispatch<float>& host) {
  CHECK(device.offsets == host.offsets);
  CHECK(device.slot_token == host.slot_token);
  CHECK(device.slot_gate == host.slot_gate);
  CHECK(device.token_slot == host.token_slot);
}

// A whole layer on both sides: y, the aux loss, dx, every parameter gradient and the routing
// statistics, over several training steps (dropout masks follow the step).
template <class HostLayer, class DeviceLayer>
void check_layer(HostLayer& host, DeviceLayer& device, index_t tokens, std::uint64_t seed, int steps = 2) {
  const index_t d = host.d_model();
  std::uint64_t s = seed;
  host.for_each_parameter([&](std::string_view, Parameter<float>& p) { smoe::test::randomize(p.value, ++s, 0.3); });
  copy_parameters_to_device(host, device);
  for (int step = 0; step < steps; ++step) {
    const Tensor<float> x = random_matrix<float>(tokens, d, seed + 10 * step + 1);
    const Tensor<float> dy = random_matrix<float>(tokens, d, seed + 10 * step + 2);
    Tensor<float> y({tokens, d}), dx({tokens, d});
    zero_grad(host);
    zero_grad(device);
    const auto out = host.forward(x.matrix(), y.matrix(), Mode::train);
    host.backward(dy.matrix(), dx.matrix());
    const auto xd = to_device(x);
    auto yd = device_nan<float>({tokens, d}), dxd = device_nan<float>({tokens, d});
    device.forward(xd.matrix(), yd.matrix(), Mode::train);
    device.backward(to_device(dy).matrix(), dxd.matrix());
    require_close_scaled(to_host(yd), y, 1e-5, "y");
    require_close_scaled(to_host(dxd), dx, 1e-5, "dx");
    const auto losses = device.read_losses();
    CHECK(losses.aux_loss == Approx(out.aux_loss).epsilon(1e-5).margin(1e-7));
    for_each_parameter_pair(host, device, [&](std::string_view name, auto& hp, auto& dp) {
      require_close_scaled(to_host(dp.grad), hp.grad, 1e-5, std::string(name) + ".grad");
    });
    const RoutingStats stats = device.routing_stats();
    CHECK(stats.tokens_per_expert == out.stats.tokens_per_expert);
    CHECK(stats.tokens_without_expert == out.stats.tokens_without_expert);
    CHECK(stats.dropped == out.stats.dropped);
    CHECK(stats.routing_entropy == Approx(out.stats.routing_entropy).epsilon(1e-5));
  }
}

}  // namespace smoe_cuda_test

using namespace smoe;
using namespace smoe_cuda_test;
