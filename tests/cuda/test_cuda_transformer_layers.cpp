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
    if (a[i].size() > 0)  // memcmp of an empty tensor's null data is undefined
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


template <class Id>
Tensor<Id> random_ids(index_t tokens, index_t vocab, std::uint64_t seed) {
  Tensor<Id> ids({tokens});
  for (index_t t = 0; t < tokens; ++t) ids[t] = Id(uniform01(seed, std::uint64_t(t), 5) * double(vocab));
  return ids;
}

template <class Id>
std::span<const Id> span_of(const Tensor<Id>& t) {
  return {t.data(), std::size_t(t.size())};
}

// Embedding: y and weight.grad against the CPU on random ids (repeated ids, unused rows), two
// device runs bitwise equal, no invalid-id flag.
template <class T, class Id>
void check_embedding(index_t vocab, index_t d, index_t tokens, std::uint64_t seed) {
  INFO("Embedding " << dtype_name<T>() << ", ids of " << sizeof(Id) * 8 << " bits, V " << vocab << ", d " << d
                    << ", tokens " << tokens);
  Embedding<float> host({.vocab = vocab, .d_model = d});
  Embedding<T, dev> device({.vocab = vocab, .d_model = d});
  randomize_parameters<T>(host, seed, 1.0);
  copy_parameters_to_device(host, device);
  const Tensor<Id> ids = random_ids<Id>(tokens, vocab, seed + 1);
  const Tensor<float> dy = random_rounded<T>(tokens, d, seed + 2);
  Tensor<float> y({tokens, d});
  zero_grad(host);
  host.forward(span_of(ids), y.matrix());
  host.backward(dy.matrix());
  const auto idsd = to_device(ids);
  const auto dyd = to_device<T>(dy);
  Outputs runs[2];
  for (Outputs& run : runs) {
    zero_grad(device);
    auto yd = device_nan<T>({tokens, d});
    device.forward(idsd, yd.matrix());
    device.backward(dyd.matrix());
    run = {to_host<float>(yd)};
    append_grads(device, run);
    CHECK_FALSE(device.had_invalid_ids());
  }
  require_close_scaled(runs[0][0], y, 0, "y");  // a gather: exact
  require_close_scaled(runs[0][1], host.weight().grad, device_tolerance<T>(), "weight.grad");
  require_bitwise_equal(runs[0], runs[1]);
}

// Out-of-range ids: with check_ids, the CPU's error before anything is written; without it, zero
// rows, no gradient from those tokens, and the device flag.
template <class Id>
void check_embedding_invalid_ids() {
  const index_t V = 5, d = 3;
  Embedding<float> host({.vocab = V, .d_model = d});
  Embedding<float, dev> device({.vocab = V, .d_model = d});
  randomize_parameters<float>(host, 41, 1.0);
  copy_parameters_to_device(host, device);
  Tensor<Id> ids({4});
  ids[0] = 1, ids[1] = 4, ids[2] = Id(V), ids[3] = -1;
  const auto idsd = to_device(ids);
  auto yd = device_nan<float>({4, d});
  device.check_ids = true;
  REQUIRE_THROWS_WITH(host.forward(span_of(ids), Tensor<float>({4, d}).matrix()),
                      Catch::Contains("ids[2] must be in [0, 5), got 5"));
  REQUIRE_THROWS_WITH(device.forward(idsd, yd.matrix()), Catch::Contains("ids[2] must be in [0, 5), got 5"));
  const Tensor<float> untouched = to_host(yd);
  for (index_t i = 0; i < untouched.size(); ++i) CHECK(std::isnan(untouched[i]));
  device.check_ids = false;
  device.forward(idsd, yd.matrix());
  CHECK(device.had_invalid_ids());
  // What the CPU gives on the valid tokens alone (0 and 1), and zero rows for the others.
  Tensor<Id> valid_ids({2});
  valid_ids[0] = 1, valid_ids[1] = 4;
  const Tensor<float> dy = smoe::test::random_matrix<float>(4, d, 43);
  Tensor<float> valid_dy({2, d}), valid_y({2, d});
  std::copy_n(dy.data(), 2 * d, valid_dy.data());
  zero_grad(host);
  zero_grad(device);
  host.forward(span_of(valid_ids), valid_y.matrix());
  host.backward(valid_dy.matrix());
  device.backward(to_device(dy).matrix());
  const Tensor<float> y = to_host(yd);
  for (index_t i = 0; i < 2 * d; ++i) CHECK(y[i] == valid_y[i]);
  for (index_t i = 2 * d; i < 4 * d; ++i) CHECK(y[i] == 0.0f);
  require_close_scaled(to_host(device.weight().grad), host.weight().grad, 1e-6, "weight.grad");
  ids[2] = 0, ids[3] = 2;  // a valid batch clears the flag
  device.forward(to_device(ids), yd.matrix());
  CHECK_FALSE(device.had_invalid_ids());
}

inline void check_embedding_errors() {
  Embedding<float, dev> device({.vocab = 4, .d_model = 3});
  Tensor<std::int32_t> ids({2});
  ids[0] = 0, ids[1] = 3;
  const auto idsd = to_device(ids);
  auto y = device_nan<float>({2, 3}), wrong = device_nan<float>({3, 3});
  REQUIRE_THROWS_WITH(device.backward(y.matrix()), Catch::Contains("backward called before forward"));
  REQUIRE_THROWS_WITH(device.forward(idsd, wrong.matrix()), Catch::Contains("y"));
  device.forward(idsd, y.matrix());
  REQUIRE_THROWS_WITH(device.backward(wrong.matrix()), Catch::Contains("dy"));
  device.validate_inputs = true;
  REQUIRE_THROWS_WITH(device.backward(device_nan<float>({2, 3}).matrix()), Catch::Contains("finite"));
  using Device = Embedding<float, dev>;
  REQUIRE_THROWS_WITH(Device({.vocab = 0, .d_model = 3}), Catch::Contains("vocab"));
  REQUIRE_THROWS_WITH(Device({.vocab = 3, .d_model = 0}), Catch::Contains("d_model"));
}


// OutputProjection, untied or tied to an Embedding: logits, dx and the weight's gradient (the
// embedding's when tied) against the CPU, two device runs bitwise equal.
template <class T>
void check_head(index_t vocab, index_t d, index_t tokens, bool tied, std::uint64_t seed) {
  INFO("OutputProjection " << dtype_name<T>() << (tied ? " tied" : " untied") << ", V " << vocab << ", d " << d
                           << ", tokens " << tokens);
  Embedding<float> host_embed({.vocab = vocab, .d_model = d});
  Embedding<T, dev> device_embed({.vocab = vocab, .d_model = d});
  OutputProjection<float> host_own({.vocab = vocab, .d_model = d});
  OutputProjection<T, dev> device_own({.vocab = vocab, .d_model = d});
  randomize_parameters<T>(host_embed, seed, 0.5);
  randomize_parameters<T>(host_own, seed + 7, 0.5);
  copy_parameters_to_device(host_embed, device_embed);
  copy_parameters_to_device(host_own, device_own);
  auto host_tied = OutputProjection<float>::tied_to(host_embed);
  auto device_tied = OutputProjection<T, dev>::tied_to(device_embed);
  auto& host = tied ? host_tied : host_own;
  auto& device = tied ? device_tied : device_own;
  CHECK(device.tied() == tied);
  CHECK(parameter_count(device) == (tied ? 0 : vocab * d));
  CHECK(device.total_parameters() == host.total_parameters());
  const Tensor<float> x = random_rounded<T>(tokens, d, seed + 1), dlogits = random_rounded<T>(tokens, vocab, seed + 2);
  Tensor<float> logits({tokens, vocab}), dx({tokens, d});
  zero_grad(host_embed);
  zero_grad(host_own);
  host.forward(x.matrix(), logits.matrix());
  host.backward(dlogits.matrix(), dx.matrix());
  const auto xd = to_device<T>(x), dld = to_device<T>(dlogits);
  Outputs runs[2];
  for (Outputs& run : runs) {
    zero_grad(device_embed);
    zero_grad(device_own);
    auto ld = device_nan<T>({tokens, vocab}), dxd = device_nan<T>({tokens, d});
    device.forward(xd.matrix(), ld.matrix());
    device.backward(dld.matrix(), dxd.matrix());
    run = {to_host<float>(ld), to_host<float>(dxd), to_host<float>(device.weight().grad)};
  }
  const double tol = device_tolerance<T>();
  require_close_scaled(runs[0][0], logits, tol, "logits");
  require_close_scaled(runs[0][1], dx, tol, "dx");
  require_close_scaled(runs[0][2], host.weight().grad, tol, "weight.grad");
  if (tied) {  // the gradient landed in the embedding's parameter
    require_close_scaled(to_host<float>(device_embed.weight().grad), host_embed.weight().grad, tol, "embed weight.grad");
  }
  require_bitwise_equal(runs[0], runs[1]);
}

inline void check_head_errors() {
  using Device = OutputProjection<float, dev>;
  Device head({.vocab = 5, .d_model = 3});
  auto x = device_nan<float>({2, 3}), logits = device_nan<float>({2, 5}), wrong = device_nan<float>({2, 4});
  REQUIRE_THROWS_WITH(head.backward(logits.matrix(), x.matrix()), Catch::Contains("backward called before forward"));
  REQUIRE_THROWS_WITH(head.forward(wrong.matrix(), logits.matrix()), Catch::Contains("x"));
  REQUIRE_THROWS_WITH(head.forward(x.matrix(), wrong.matrix()), Catch::Contains("logits"));
  head.validate_inputs = true;
  REQUIRE_THROWS_WITH(head.forward(x.matrix(), logits.matrix()), Catch::Contains("finite"));
  head.validate_inputs = false;
  x.zero();
  head.forward(x.matrix(), logits.matrix());
  REQUIRE_THROWS_WITH(head.backward(wrong.matrix(), x.matrix()), Catch::Contains("dlogits"));
  REQUIRE_THROWS_WITH(head.backward(logits.matrix(), wrong.matrix()), Catch::Contains("dx"));
  Parameter<float, dev> other({4, 3});
  REQUIRE_THROWS_WITH(head.tie(other), Catch::Contains("tied weight must be [5, 3]"));
  REQUIRE_THROWS_WITH(Device({.vocab = 0, .d_model = 3}), Catch::Contains("vocab"));
}

// SoftmaxCrossEntropy: the loss (a device scalar), per-token losses, the count and dlogits
// (separate and in place) against the CPU; two device runs bitwise equal.
template <class T, class Id>
void check_cross_entropy(index_t tokens, index_t vocab, double ignored, std::int64_t ignore_index, float scale,
                         std::uint64_t seed) {
  INFO("SoftmaxCrossEntropy " << dtype_name<T>() << ", tokens " << tokens << ", V " << vocab << ", ignored " << ignored
                              << ", ignore_index " << ignore_index << ", scale " << scale);
  const CrossEntropyConfig config{.ignore_index = ignore_index};
  SoftmaxCrossEntropy<float> host(config);
  SoftmaxCrossEntropy<T, dev> device(config);
  const Tensor<float> logits = random_rounded<T>(tokens, vocab, seed, 3.0);
  Tensor<Id> targets = random_ids<Id>(tokens, vocab, seed + 1);
  for (index_t t = 0; t < tokens; ++t)
    if (uniform01(seed, std::uint64_t(t), 9) < ignored) targets[t] = Id(ignore_index);
  const float loss = host.forward(logits.matrix(), span_of(targets));
  Tensor<float> dlogits({tokens, vocab});
  host.backward(logits.matrix(), dlogits.matrix(), scale);
  const auto ld = to_device<T>(logits);
  const auto td = to_device(targets);
  Outputs runs[2];
  for (Outputs& run : runs) {
    auto dld = device_nan<T>({tokens, vocab});
    const auto* loss_on_device = device.forward(ld.matrix(), td);
    REQUIRE(loss_on_device != nullptr);
    device.backward(ld.matrix(), dld.matrix(), scale);
    Tensor<float> loss_value({1});
    loss_value[0] = float(device.read_loss());
    run = {loss_value, to_host<float>(device.token_losses()), to_host<float>(dld)};
    CHECK(device.read_counted() == host.counted());
    CHECK_FALSE(device.had_invalid_targets());
  }
  const double tol = device_tolerance<T>();
  CHECK(runs[0][0][0] == Approx(loss).epsilon(sizeof(T) == 2 ? 1e-5 : tol).margin(1e-7));
  Tensor<float> host_losses({tokens});
  std::copy(host.token_losses().begin(), host.token_losses().end(), host_losses.data());
  require_close_scaled(runs[0][1], host_losses, 1e-5, "token losses");
  require_close_scaled(runs[0][2], dlogits, tol, "dlogits");
  require_bitwise_equal(runs[0], runs[1]);
  // In place: the gradient written over the logits.
  auto inplace = to_device<T>(logits);
  device.forward(std::as_const(inplace).matrix(), td);
  device.backward(std::as_const(inplace).matrix(), inplace.matrix(), scale);
  require_close_scaled(to_host<float>(inplace), runs[0][2], 0, "dlogits in place");
}

// Out-of-range targets: with validate_inputs, the CPU's error; without it, those rows do not count
// (as if ignored) and the device flag is raised.
template <class Id>
void check_cross_entropy_invalid_targets() {
  const index_t N = 4, V = 6;
  SoftmaxCrossEntropy<float> host;
  SoftmaxCrossEntropy<float, dev> device;
  const Tensor<float> logits = smoe::test::random_matrix<float>(N, V, 51);
  Tensor<Id> targets({N});
  targets[0] = 2, targets[1] = Id(V), targets[2] = -100, targets[3] = 5;
  const auto ld = to_device(logits);
  const auto td = to_device(targets);
  REQUIRE_THROWS_WITH(host.forward(logits.matrix(), span_of(targets)),
                      Catch::Contains("targets[1] must be in [0, 6) or ignore_index = -100, got 6"));
  device.validate_inputs = true;
  REQUIRE_THROWS_WITH(device.forward(ld.matrix(), td),
                      Catch::Contains("targets[1] must be in [0, 6) or ignore_index = -100, got 6"));
  device.validate_inputs = false;
  device.forward(ld.matrix(), td);
  CHECK(device.had_invalid_targets());
  Tensor<Id> as_ignored = targets;
  as_ignored[1] = -100;
  const float loss = host.forward(logits.matrix(), span_of(as_ignored));
  CHECK(device.read_loss() == Approx(loss).epsilon(1e-5));
  CHECK(device.read_counted() == 2);
  auto dld = device_nan<float>({N, V});
  Tensor<float> dlogits({N, V});
  host.backward(logits.matrix(), dlogits.matrix());
  device.backward(ld.matrix(), dld.matrix());
  require_close_scaled(to_host(dld), dlogits, 1e-5, "dlogits");
}

inline void check_cross_entropy_errors() {
  SoftmaxCrossEntropy<float, dev> device;
  Tensor<std::int32_t> targets({3});
  targets[0] = 0, targets[1] = 1, targets[2] = 2;
  const auto td = to_device(targets);
  auto logits = device_nan<float>({3, 4}), wrong = device_nan<float>({3, 5});
  auto empty = device_nan<float>({0, 4}), no_vocab = device_nan<float>({3, 0}), two = device_nan<float>({2, 4});
  REQUIRE_THROWS_WITH(device.backward(logits.matrix(), logits.matrix()), Catch::Contains("backward called before forward"));
  REQUIRE_THROWS_WITH(device.forward(empty.matrix(), td), Catch::Contains("at least one row"));
  REQUIRE_THROWS_WITH(device.forward(no_vocab.matrix(), td), Catch::Contains("at least one column"));
  REQUIRE_THROWS_WITH(device.forward(two.matrix(), td), Catch::Contains("targets must have 2 entries"));
  device.validate_inputs = true;
  REQUIRE_THROWS_WITH(device.forward(logits.matrix(), td), Catch::Contains("logits") && Catch::Contains("finite"));
  device.validate_inputs = false;
  logits.zero();
  device.forward(logits.matrix(), td);
  REQUIRE_THROWS_WITH(device.backward(wrong.matrix(), logits.matrix()), Catch::Contains("logits"));
  REQUIRE_THROWS_WITH(device.backward(logits.matrix(), wrong.matrix()), Catch::Contains("dlogits"));
}


// DenseMLP (plain and Top-K activation): y, dx and every parameter gradient against the CPU, two
// device runs bitwise equal.
template <class T, class Act>
void check_dense_mlp(DenseMLPConfig config, index_t tokens, std::uint64_t seed) {
  const index_t d = config.d_model;
  INFO("DenseMLP " << dtype_name<T>() << " " << Act::name << ", d " << d << ", hidden " << config.hidden << ", bias "
                   << config.bias << ", topk " << config.topk << ", tokens " << tokens);
  DenseMLP<float, Act> host(config);
  DenseMLP<T, Act, dev> device(config);
  randomize_parameters<T>(host, seed, 0.5);
  copy_parameters_to_device(host, device);
  const Tensor<float> x = random_rounded<T>(tokens, d, seed + 1), dy = random_rounded<T>(tokens, d, seed + 2);
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
  CHECK(i == runs[0].size());
  require_bitwise_equal(runs[0], runs[1]);
}

inline void check_dense_mlp_errors() {
  using Device = DenseMLP<float, Relu, dev>;
  Device mlp({.d_model = 3, .hidden = 5});
  auto x = device_nan<float>({2, 3}), wrong = device_nan<float>({2, 4});
  REQUIRE_THROWS_WITH(mlp.backward(x.matrix(), x.matrix()), Catch::Contains("backward called before forward"));
  REQUIRE_THROWS_WITH(mlp.forward(wrong.matrix(), x.matrix()), Catch::Contains("x"));
  mlp.validate_inputs = true;
  auto y = device_nan<float>({2, 3});
  REQUIRE_THROWS_WITH(mlp.forward(x.matrix(), y.matrix()), Catch::Contains("finite"));
  mlp.validate_inputs = false;
  x.zero();
  mlp.forward(x.matrix(), y.matrix());
  REQUIRE_THROWS_WITH(mlp.backward(wrong.matrix(), y.matrix()), Catch::Contains("dy"));
  REQUIRE_THROWS_WITH(mlp.backward(y.matrix(), wrong.matrix()), Catch::Contains("dx"));
  REQUIRE_THROWS_WITH(Device({.d_model = 3, .hidden = 0}), Catch::Contains("hidden"));
  REQUIRE_THROWS_WITH(Device({.d_model = 3, .hidden = 40, .topk = 33}), Catch::Contains("topk must be <= 32"));
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

TEST_CASE("cuda Embedding equals the CPU layer: gather, deterministic scatter-free backward, invalid ids",
          "[cuda][transformer][embedding]") {
  check_embedding<float, std::int32_t>(13, 8, 60, 21);
  check_embedding<float, std::int64_t>(13, 8, 60, 22);
  check_embedding<double, std::int32_t>(7, 5, 30, 23);
  check_embedding<bf16, std::int32_t>(11, 16, 50, 24);
  check_embedding<fp16, std::int64_t>(11, 16, 50, 25);
  check_embedding<float, std::int32_t>(300, 4, 20, 26);  // most rows get no token
  check_embedding<float, std::int32_t>(1, 6, 25, 27);    // V = 1: every token on one row
  check_embedding<float, std::int32_t>(9, 4, 1, 28);     // one token
  check_embedding<float, std::int32_t>(9, 4, 0, 29);     // no tokens
  check_embedding_invalid_ids<std::int32_t>();
  check_embedding_invalid_ids<std::int64_t>();
  check_embedding_errors();
}

TEST_CASE("cuda OutputProjection equals the CPU head, untied and tied to the embedding",
          "[cuda][transformer][head]") {
  for (bool tied : {false, true}) {
    check_head<float>(17, 12, 30, tied, 31);
    check_head<double>(9, 6, 11, tied, 32);
    check_head<bf16>(17, 16, 20, tied, 33);
    check_head<fp16>(17, 16, 20, tied, 34);
    check_head<float>(5, 4, 1, tied, 35);  // one token
    check_head<float>(5, 4, 0, tied, 36);  // no tokens
    check_head<float>(1, 1, 7, tied, 37);  // V = d = 1
  }
  check_head_errors();
}

TEST_CASE("cuda SoftmaxCrossEntropy equals the CPU loss: a device scalar, ignore_index, invalid targets",
          "[cuda][transformer][cross_entropy]") {
  check_cross_entropy<float, std::int32_t>(40, 23, 0.2, -100, 1.0f, 41);
  check_cross_entropy<float, std::int64_t>(40, 23, 0.2, -100, 0.5f, 42);
  check_cross_entropy<double, std::int32_t>(20, 9, 0.1, -100, 1.0f, 43);
  check_cross_entropy<bf16, std::int32_t>(30, 32, 0.2, -100, 1.0f, 44);
  check_cross_entropy<fp16, std::int64_t>(30, 32, 0.2, -100, 2.0f, 45);
  check_cross_entropy<float, std::int32_t>(600, 7, 0.3, -100, 1.0f, 46);  // several 256-row blocks
  check_cross_entropy<float, std::int32_t>(1, 5, 0.0, -100, 1.0f, 47);    // one token
  check_cross_entropy<float, std::int32_t>(12, 5, 1.0, -100, 1.0f, 48);   // every token ignored: loss 0
  check_cross_entropy<float, std::int32_t>(12, 5, 0.3, 3, 1.0f, 49);      // ignore_index inside [0, V)
  check_cross_entropy<float, std::int32_t>(12, 1, 0.0, -100, 1.0f, 50);   // V = 1: loss 0
  check_cross_entropy_invalid_targets<std::int32_t>();
  check_cross_entropy_invalid_targets<std::int64_t>();
  check_cross_entropy_errors();
}

TEST_CASE("cuda DenseMLP equals the CPU layer: activations, biases, Top-K activation", "[cuda][transformer][dense]") {
  check_dense_mlp<float, Relu>({.d_model = 12, .hidden = 20}, 30, 61);
  check_dense_mlp<float, Gelu>({.d_model = 12, .hidden = 20, .bias = true}, 30, 62);
  check_dense_mlp<float, SwiGlu>({.d_model = 12, .hidden = 10, .bias = true}, 30, 63);
  check_dense_mlp<double, SwiGlu>({.d_model = 8, .hidden = 6}, 15, 64);
  check_dense_mlp<bf16, Relu>({.d_model = 16, .hidden = 24, .bias = true}, 20, 65);
  check_dense_mlp<fp16, Gelu>({.d_model = 16, .hidden = 24}, 20, 66);
  check_dense_mlp<float, Relu>({.d_model = 12, .hidden = 20, .topk = 5}, 30, 67);                // Top-K
  check_dense_mlp<float, Gelu>({.d_model = 12, .hidden = 20, .bias = true, .topk = 20}, 30, 68);  // K = hidden
  check_dense_mlp<float, SwiGlu>({.d_model = 6, .hidden = 8, .topk = 1}, 9, 69);
  check_dense_mlp<float, Relu>({.d_model = 6, .hidden = 8, .bias = true}, 1, 70);  // one token
  check_dense_mlp<float, Relu>({.d_model = 6, .hidden = 8, .bias = true}, 0, 71);  // no tokens
  check_dense_mlp_errors();
}
