// Issue 14 (Hugging Face MoE checkpoints): the components the HF families add (GPT-OSS router bias
// and clamped SwiGLU, DeepSeek-V3 unnormalized gates, Qwen2-MoE's shared-expert sigmoid gate)
// against central differences and naive references; hf::Config defaults and errors;
// hf::Checkpoint over BF16/F16/F32 files, shards, and broken directories; hf::load_moe_block errors.
// The numbers of whole loaded blocks are checked by tests/oracle/hf_oracle.py against PyTorch.
#include <smoe/hf/moe_block.hpp>
#include <smoe/train/gradient_check.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "helpers.hpp"

namespace {

using namespace smoe;
namespace fs = std::filesystem;

template <HasParameters C>
void randomize_parameters(C& c, double std, std::uint64_t seed = 100) {
  c.for_each_parameter([&](std::string_view, auto& p) { test::randomize(p.value, seed++, std); });
}

template <class Layer>
void check_gradients(Layer& layer, index_t tokens, double tol = 1e-7) {
  auto x = test::random_matrix<double>(tokens, layer.d_model(), 31);
  const auto dy = test::random_matrix<double>(tokens, layer.d_model(), 32);
  const auto r = check_layer_gradients(layer, x, dy);
  INFO("worst parameter " << r.parameters.worst_parameter << "[" << r.parameters.worst_index << "] error "
                          << r.parameters.worst_error << ", input error " << r.input_error);
  CHECK(r.parameters.checked > 0);
  CHECK(r.worst_error() < tol);
}

double sigmoid(double v) { return 1 / (1 + std::exp(-v)); }

std::string error_of(auto&& f) {
  try {
    f();
  } catch (const smoe::error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST_CASE("ClampedSwiGlu: forward equals the GPT-OSS formula; gradients by central differences", "[hf]") {
  // Points on both sides of each clamp (gate > 7 clamps, up outside [-7, 7] clamps).
  const std::vector<double> gates = {-9.0, -1.3, 0.0, 0.4, 6.5, 8.0}, ups = {-8.0, -2.0, 0.3, 6.9, 7.5, -0.1};
  const index_t G = index_t(gates.size());
  std::vector<double> pre(gates);
  pre.insert(pre.end(), ups.begin(), ups.end());
  for (index_t i = 0; i < G; ++i) {
    const double g = std::min(gates[i], 7.0), u = std::clamp(ups[i], -7.0, 7.0);
    const double expected = (u + 1) * g * sigmoid(1.702 * g);
    CHECK(ClampedSwiGlu::unit(pre.data(), i, G) == Approx(expected).epsilon(1e-14));
    std::vector<double> dpre(pre.size(), 0.0);
    ClampedSwiGlu::unit_backward(pre.data(), i, G, 1.0, dpre.data());
    for (index_t which : {i, G + i}) {
      const double numeric = test::central_difference(pre, std::size_t(which), 1e-6,
                                                      [&] { return ClampedSwiGlu::unit(pre.data(), i, G); });
      CHECK(dpre[which] == Approx(numeric).margin(1e-7));
    }
  }
  // A whole layer: biased router (softmax over the k selected) and clamped experts with biases.
  MoE layer(TopKRouter<double, SoftmaxGate>({.d_model = 5, .experts = 4, .k = 2, .bias = true}, SoftmaxGate{true}),
            FeedForwardExperts<double, ClampedSwiGlu>({.d_model = 5, .experts = 4, .hidden = 3, .bias = true}));
  randomize_parameters(layer, 0.7);
  check_gradients(layer, 6);
}

TEST_CASE("TopKRouter with a logit bias: selection and gates see the bias; its gradient", "[hf]") {
  const index_t d = 3, E = 4, K = 2, T = 5;
  TopKRouter<double, SoftmaxGate> router({.d_model = d, .experts = E, .k = K, .bias = true}, SoftmaxGate{true});
  test::randomize(router.weight().value, 3, 0.5);
  test::randomize(router.bias().value, 4, 2.0);
  const auto x = test::random_matrix<double>(T, d, 5);
  Routing<double> r;
  router.forward(x.matrix(), r, Mode::eval);
  for (index_t t = 0; t < T; ++t) {
    std::vector<double> s(E);
    for (index_t e = 0; e < E; ++e) {
      s[e] = router.bias().value[e];
      for (index_t i = 0; i < d; ++i) s[e] += x[t * d + i] * router.weight().value[e * d + i];
    }
    std::vector<int> order = {0, 1, 2, 3};
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return s[a] > s[b]; });
    const double z = std::exp(s[order[0]]) + std::exp(s[order[1]]);
    for (index_t j = 0; j < K; ++j) {
      CHECK(r.experts[t * K + j] == order[j]);
      CHECK(r.gates[t * K + j] == Approx(std::exp(s[order[j]]) / z).epsilon(1e-12));
    }
  }
  MoE layer(TopKRouter<double, SoftmaxGate>({.d_model = 4, .experts = 5, .k = 3, .bias = true}, SoftmaxGate{false}),
            SwiGluExperts<double>({.d_model = 4, .experts = 5, .hidden = 3}));
  randomize_parameters(layer, 0.8);
  check_gradients(layer, 7);
}

TEST_CASE("GroupTopKRouter normalize = false: gates are route_scale · sigmoid, unnormalized", "[hf]") {
  const index_t d = 3, E = 8, K = 3, T = 6;
  const GroupTopKRouterConfig c{
      .d_model = d, .experts = E, .k = K, .n_groups = 4, .topk_groups = 2, .route_scale = 2.5, .normalize = false};
  GroupTopKRouter<double> router(c);
  test::randomize(router.weight().value, 7, 0.8);
  test::randomize(router.bias().values, 8, 0.5);
  const auto x = test::random_matrix<double>(T, d, 9);
  Routing<double> r;
  router.forward(x.matrix(), r, Mode::eval);
  for (index_t t = 0; t < T; ++t)
    for (index_t j = 0; j < K; ++j) {
      const index_t e = r.experts[t * K + j];
      double s = 0;
      for (index_t i = 0; i < d; ++i) s += x[t * d + i] * router.weight().value[e * d + i];
      CHECK(r.gates[t * K + j] == Approx(2.5 * sigmoid(s)).epsilon(1e-12));
    }
  MoE layer(GroupTopKRouter<double>(c), SwiGluExperts<double>({.d_model = d, .experts = E, .hidden = 2}));
  randomize_parameters(layer, 0.8);
  test::randomize(layer.router().bias().values, 8, 0.5);
  check_gradients(layer, T);
}

TEST_CASE("SharedExpertsMoE sigmoid_gate: y = MoE(x) + sigmoid(x·w_g)·shared(x); gradients", "[hf]") {
  const index_t d = 4, E = 3, T = 5;
  using Inner = MoE<TopKRouter<double, SoftmaxGate>, SwiGluExperts<double>>;
  auto make = [&] {
    return SharedExpertsMoE<Inner, SwiGlu>(
        Inner(TopKRouter<double, SoftmaxGate>({.d_model = d, .experts = E, .k = 2}),
              SwiGluExperts<double>({.d_model = d, .experts = E, .hidden = 2})),
        SharedExpertsConfig{.experts = 1, .hidden = 3, .sigmoid_gate = true});
  };
  auto gated = make(), ungated_copy = make();
  randomize_parameters(gated, 0.7);
  randomize_parameters(ungated_copy.moe(), 0.7);  // the same seeds: the same routed experts
  const auto x = test::random_matrix<double>(T, d, 11);
  Tensor<double> y({T, d}), y_routed({T, d});
  gated.forward(x.matrix(), y.matrix());
  ungated_copy.moe().forward(x.matrix(), y_routed.matrix());
  // Naive shared expert: down(silu(gate x) · up x) with W1 [d, 2G] (gate | up), W2 [G, d].
  const auto& w1 = gated.shared().w1().value;
  const auto& w2 = gated.shared().w2().value;
  const index_t G = 3;
  for (index_t t = 0; t < T; ++t) {
    double z = 0;
    for (index_t i = 0; i < d; ++i) z += x[t * d + i] * gated.shared_gate().value[i];
    std::vector<double> h(G);
    for (index_t g = 0; g < G; ++g) {
      double a = 0, b = 0;
      for (index_t i = 0; i < d; ++i) a += x[t * d + i] * w1[i * 2 * G + g], b += x[t * d + i] * w1[i * 2 * G + G + g];
      h[g] = a * sigmoid(a) * b;
    }
    for (index_t o = 0; o < d; ++o) {
      double s = 0;
      for (index_t g = 0; g < G; ++g) s += h[g] * w2[g * d + o];
      CHECK(y[t * d + o] == Approx(y_routed[t * d + o] + sigmoid(z) * s).epsilon(1e-12));
    }
  }
  check_gradients(gated, T);
}

TEST_CASE("hf::parse_config: transformers 4.57 defaults per family and clear errors", "[hf]") {
  const auto olmoe = hf::parse_config(nlohmann::json{{"model_type", "olmoe"}, {"hidden_size", 64}, {"num_attention_heads", 4}},
                                      "t");
  CHECK(olmoe.experts == 64);
  CHECK(olmoe.k == 8);
  CHECK(olmoe.expert_hidden == 2048);
  CHECK(olmoe.kv_heads == 4);  // num_key_value_heads defaults to the head count
  CHECK(olmoe.head_dim == 16);
  CHECK(!olmoe.norm_topk_prob);
  CHECK(olmoe.rms_norm_eps == 1e-5);
  const auto ds = hf::parse_config(nlohmann::json{{"model_type", "deepseek_v3"}}, "t");
  CHECK(ds.experts == 256);
  CHECK(ds.n_group == 8);
  CHECK(ds.topk_group == 4);
  CHECK(ds.routed_scaling_factor == 2.5);
  CHECK(ds.norm_topk_prob);
  CHECK(!ds.is_sparse(2));
  CHECK(ds.is_sparse(3));
  const auto q = hf::parse_config(nlohmann::json{{"model_type", "qwen2_moe"},
                                                 {"decoder_sparse_step", 2},
                                                 {"mlp_only_layers", {3}},
                                                 {"head_dim", nullptr}},
                                  "t");
  CHECK(q.experts == 60);
  CHECK(q.expert_hidden == 1408);
  CHECK(q.shared_expert_hidden == 5632);
  CHECK(q.head_dim == 2048 / 16);
  CHECK(!q.is_sparse(0));
  CHECK(q.is_sparse(1));
  CHECK(!q.is_sparse(3));
  CHECK(q.is_sparse(5));
  const auto mx = hf::parse_config(nlohmann::json{{"model_type", "mixtral"}}, "t");
  CHECK(mx.experts == 8);
  CHECK(mx.expert_hidden == 14336);
  CHECK(mx.norm_topk_prob);
  CHECK(mx.rope_theta == 1e6);
  const auto go = hf::parse_config(nlohmann::json{{"model_type", "gpt_oss"}}, "t");
  CHECK(go.experts == 128);
  CHECK(go.k == 4);
  CHECK(go.head_dim == 64);

  CHECK_THAT(error_of([] { hf::parse_config(nlohmann::json{{"model_type", "llama"}}, "t"); }),
             Catch::Contains("unsupported model_type 'llama'") && Catch::Contains("mixtral, qwen2_moe, qwen3_moe, olmoe"));
  CHECK_THAT(error_of([] { hf::parse_config(nlohmann::json{{"hidden_size", 4}}, "t"); }), Catch::Contains("'model_type'"));
  CHECK_THAT(error_of([] {
               hf::parse_config(nlohmann::json{{"model_type", "mixtral"}, {"num_experts_per_tok", 9}}, "t");
             }),
             Catch::Contains("'num_experts_per_tok' must be in [1, experts = 8], got 9"));
  CHECK_THAT(error_of([] { hf::parse_config(nlohmann::json{{"model_type", "olmoe"}, {"hidden_size", "64"}}, "t"); }),
             Catch::Contains("'hidden_size' must be an integer"));
  CHECK_THAT(error_of([] { hf::parse_config(nlohmann::json{{"model_type", "deepseek_v3"}, {"n_group", 3}}, "t"); }),
             Catch::Contains("'n_group' must divide n_routed_experts = 256, got 3"));
}

namespace {

// Float to bfloat16 by truncation of exactly representable values (the test picks such values).
std::vector<std::uint8_t> bf16_bytes(const std::vector<float>& v) {
  std::vector<std::uint8_t> out;
  for (float f : v) {
    const auto bits = std::uint16_t(std::bit_cast<std::uint32_t>(f) >> 16);
    out.push_back(std::uint8_t(bits & 0xff));
    out.push_back(std::uint8_t(bits >> 8));
  }
  return out;
}
std::vector<std::uint8_t> f16_bytes_of_halves() {  // 0.5, -2.0, 1.0 in IEEE binary16
  return {0x00, 0x38, 0x00, 0xc0, 0x00, 0x3c};
}

fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("smoe_test_hf_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void write_text(const fs::path& p, const std::string& text) { std::ofstream(p) << text; }

}  // namespace

TEST_CASE("hf::Checkpoint: mixed BF16/F16/F32, shards, and every broken directory", "[hf]") {
  const fs::path dir = fresh_dir("shards");
  {
    io::SafetensorsWriter a, b;
    a.add_raw("w.bf16", io::Dtype::bf16, {2, 2}, bf16_bytes({1.5f, -0.25f, 3.0f, 1024.0f}));
    a.add_raw("w.f16", io::Dtype::f16, {3}, f16_bytes_of_halves());
    Tensor<float> f({2});
    f[0] = 0.1f, f[1] = -7.0f;
    b.add("w.f32", f);
    a.save(dir / "model-00001-of-00002.safetensors");
    b.save(dir / "model-00002-of-00002.safetensors");
    write_text(dir / "model.safetensors.index.json",
               R"({"metadata": {"total_size": 18}, "weight_map": {"w.bf16": "model-00001-of-00002.safetensors",
                   "w.f16": "model-00001-of-00002.safetensors", "w.f32": "model-00002-of-00002.safetensors"}})");
  }
  hf::Checkpoint ckpt(dir);
  CHECK(ckpt.size() == 3);
  const auto bf = ckpt.read("w.bf16", {2, 2});
  CHECK(bf[0] == 1.5f);
  CHECK(bf[1] == -0.25f);
  CHECK(bf[3] == 1024.0f);
  const auto h = ckpt.read("w.f16", {3});
  CHECK(h[0] == 0.5f);
  CHECK(h[1] == -2.0f);
  CHECK(h[2] == 1.0f);
  CHECK(ckpt.read("w.f32", {2})[1] == -7.0f);
  CHECK_THAT(error_of([&] { ckpt.read("w.f32", {3}); }),
             Catch::Contains("tensor 'w.f32' must have shape [3], got [2]"));
  CHECK_THAT(error_of([&] { ckpt.read("nope", {1}); }), Catch::Contains("missing tensor 'nope'"));

  // A truncated shard: an error when it is first read, naming the file.
  {
    std::ifstream in(dir / "model-00002-of-00002.safetensors", std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), {});
    bytes.resize(bytes.size() - 3);
    std::ofstream(dir / "model-00002-of-00002.safetensors", std::ios::binary | std::ios::trunc)
        .write(bytes.data(), std::streamsize(bytes.size()));
  }
  hf::Checkpoint truncated(dir);
  CHECK_THAT(error_of([&] { truncated.read("w.f32", {2}); }), Catch::Contains("model-00002-of-00002.safetensors"));
  CHECK(truncated.read("w.bf16", {2, 2})[0] == 1.5f);  // the intact shard still reads

  // An index naming a shard that does not exist: refused at construction.
  fs::remove(dir / "model-00002-of-00002.safetensors");
  CHECK_THAT(error_of([&] { hf::Checkpoint{dir}; }),
             Catch::Contains("names shard 'model-00002-of-00002.safetensors'") && Catch::Contains("does not exist"));
  write_text(dir / "model.safetensors.index.json", R"({"weight_map": {"w": "../escape.safetensors"}})");
  CHECK_THAT(error_of([&] { hf::Checkpoint{dir}; }), Catch::Contains("must name a file in the model directory"));
  const fs::path empty = fresh_dir("empty");
  CHECK_THAT(error_of([&] { hf::Checkpoint{empty}; }), Catch::Contains("neither model.safetensors"));
  fs::remove_all(dir);
  fs::remove_all(empty);
}

TEST_CASE("hf::load_moe_block: errors for dense and out-of-range layers, missing tensors, wrong shapes", "[hf]") {
  const fs::path dir = fresh_dir("block");
  write_text(dir / "config.json", R"({"model_type": "qwen3_moe", "hidden_size": 4, "num_hidden_layers": 2,
      "num_attention_heads": 2, "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 3,
      "mlp_only_layers": [0]})");
  io::SafetensorsWriter w;
  w.add("model.layers.1.mlp.gate.weight", Tensor<float>({2, 4}));
  for (int e = 0; e < 2; ++e) {
    const std::string p = "model.layers.1.mlp.experts." + std::to_string(e) + ".";
    w.add(p + "gate_proj.weight", Tensor<float>({3, 4}));
    w.add(p + "up_proj.weight", Tensor<float>({3, 4}));
    if (e == 0) w.add(p + "down_proj.weight", Tensor<float>({4, 3}));
    if (e == 1) w.add(p + "down_proj.weight", Tensor<float>({3, 4}));  // transposed by mistake
  }
  w.save(dir / "model.safetensors");
  CHECK_THAT(error_of([&] { hf::load_moe_block(dir, 2); }), Catch::Contains("layer must be in [0, num_hidden_layers = 2), got 2"));
  CHECK_THAT(error_of([&] { hf::load_moe_block(dir, 0); }), Catch::Contains("layer 0 of this qwen3_moe model is a dense MLP"));
  CHECK_THAT(error_of([&] { hf::load_moe_block(dir, 1); }),
             Catch::Contains("'model.layers.1.mlp.experts.1.down_proj.weight' must have shape [4, 3], got [3, 4]"));
  write_text(dir / "config.json", R"({"model_type": "mixtral", "hidden_size": 4, "num_hidden_layers": 2,
      "num_attention_heads": 2, "num_local_experts": 2, "num_experts_per_tok": 1, "intermediate_size": 3})");
  CHECK_THAT(error_of([&] { hf::load_moe_block(dir, 1); }),
             Catch::Contains("missing tensor 'model.layers.1.block_sparse_moe.gate.weight'"));
  fs::remove_all(dir);
}

TEST_CASE("hf::SparseMoeBlock: a loaded qwen2_moe block trains (backward through the variant, all gradients)", "[hf]") {
  const fs::path dir = fresh_dir("train");
  write_text(dir / "config.json", R"({"model_type": "qwen2_moe", "hidden_size": 6, "num_hidden_layers": 1,
      "num_attention_heads": 2, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 3,
      "shared_expert_intermediate_size": 5})");
  io::SafetensorsWriter w;
  std::uint64_t seed = 40;
  const auto add = [&](const std::string& name, index_t rows, index_t cols) {
    w.add(name, test::random_matrix<float>(rows, cols, seed++, 0.5));
  };
  const std::string p = "model.layers.0.mlp.";
  add(p + "gate.weight", 4, 6);
  for (int e = 0; e < 4; ++e) {
    add(p + "experts." + std::to_string(e) + ".gate_proj.weight", 3, 6);
    add(p + "experts." + std::to_string(e) + ".up_proj.weight", 3, 6);
    add(p + "experts." + std::to_string(e) + ".down_proj.weight", 6, 3);
  }
  add(p + "shared_expert.gate_proj.weight", 5, 6);
  add(p + "shared_expert.up_proj.weight", 5, 6);
  add(p + "shared_expert.down_proj.weight", 6, 5);
  add(p + "shared_expert_gate.weight", 1, 6);
  w.save(dir / "model.safetensors");
  hf::SparseMoeBlock block = hf::load_moe_block(dir, 0);
  CHECK(block.d_model() == 6);
  CHECK(block.k() == 2);
  int parameters = 0;
  block.for_each_parameter([&](std::string_view, auto& param) {
    ++parameters;
    param.grad.zero();
  });
  CHECK(parameters == 6);  // router.weight, experts.w1/w2, shared.w1/w2, shared_gate
  auto x = test::random_matrix<float>(5, 6, 50);
  const auto dy = test::random_matrix<float>(5, 6, 51);
  Tensor<float> y({5, 6}), dx({5, 6});
  const auto objective = [&] {
    block.forward(std::as_const(x).matrix(), y.matrix());
    double f = 0;
    for (index_t i = 0; i < y.size(); ++i) f += double(y[i]) * double(dy[i]);
    return f;
  };
  objective();
  block.backward(dy.matrix(), dx.matrix());
  // dx against central differences in float (step 1e-2: loose, the float check of the plumbing;
  // the exact checks are the double-precision ones above).
  for (index_t i = 0; i < x.size(); ++i) {
    const float saved = x[i];
    x[i] = saved + 1e-2f;
    const double plus = objective();
    x[i] = saved - 1e-2f;
    const double minus = objective();
    x[i] = saved;
    CHECK(dx[i] == Approx((plus - minus) / 2e-2).margin(2e-2));
  }
  block.for_each_parameter([&](std::string_view name, auto& param) {
    double norm = 0;
    for (index_t i = 0; i < param.grad.size(); ++i) norm += double(param.grad[i]) * double(param.grad[i]);
    INFO(name);
    CHECK(norm > 0);
  });
  fs::remove_all(dir);
}
