#pragma once
// hf::SparseMoeBlock: one decoder layer's sparse MoE block of a Hugging Face checkpoint, built from
// smoe's own components (forward and backward, so a loaded block can be fine-tuned):
//
//   family       smoe layer                                                     HF tensors (layer i)
//   mixtral      MoE<TopKRouter<SoftmaxGate{renormalize}>, SwiGluExperts>      block_sparse_moe.gate, experts.j.w1/w3/w2
//   qwen3_moe,   MoE<TopKRouter<SoftmaxGate{norm_topk_prob}>, SwiGluExperts>   mlp.gate, mlp.experts.j.{gate,up,down}_proj
//   olmoe
//   qwen2_moe    SharedExpertsMoE<the same, SwiGlu>, 1 shared expert,            + mlp.shared_expert.*_proj,
//                sigmoid_gate                                                      mlp.shared_expert_gate [1, H]
//   deepseek_v3  SharedExpertsMoE<MoE<GroupTopKRouter, SwiGluExperts>, SwiGlu>,   + mlp.gate.e_score_correction_bias,
//                1 ungated shared expert of width I·n_shared_experts              mlp.shared_experts.*_proj
//   gpt_oss      MoE<TopKRouter{bias}<SoftmaxGate{renormalize}>,                mlp.router.{weight,bias},
//                FeedForwardExperts<ClampedSwiGlu>{bias}>                        mlp.experts.{gate_up,down}_proj(_bias)
//
// Softmax-then-top-k-then-renormalize (Mixtral) equals top-k on the logits then softmax over the k
// (SoftmaxGate{renormalize = true}), so Mixtral and GPT-OSS share the gate; without renormalization
// the gate is the softmax over all experts (Qwen, OLMoE with norm_topk_prob = false). Selection on
// logits equals selection on softmax probabilities (monotone); ties go to the smaller expert id.
// Weights: HF Linear weights are [out, in]; smoe experts hold W1 [E, in, gate|up] and W2 [E, G, out],
// so gate/up/down are transposed on load. GPT-OSS stores [in, out] with gate and up interleaved
// (gate = columns 0::2, up = 1::2): the columns are separated into smoe's [gate half | up half].
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>

#include "smoe/core/error.hpp"
#include "smoe/experts/activation.hpp"
#include "smoe/experts/feed_forward_experts.hpp"
#include "smoe/hf/checkpoint.hpp"
#include "smoe/hf/config.hpp"
#include "smoe/layers/moe.hpp"
#include "smoe/layers/shared_experts_moe.hpp"
#include "smoe/routing/group_topk.hpp"
#include "smoe/routing/softmax_topk.hpp"

namespace smoe::hf {

using SoftmaxMoE = MoE<TopKRouter<float, SoftmaxGate>, SwiGluExperts<float>>;            // mixtral, qwen3_moe, olmoe
using Qwen2MoE = SharedExpertsMoE<SoftmaxMoE, SwiGlu>;                                   // qwen2_moe
using DeepSeekMoE = SharedExpertsMoE<MoE<GroupTopKRouter<float>, SwiGluExperts<float>>, SwiGlu>;  // deepseek_v3
using GptOssMoE = MoE<TopKRouter<float, SoftmaxGate>, FeedForwardExperts<float, ClampedSwiGlu>>;  // gpt_oss

namespace detail {
// The routed MoE<> of a layer (inside SharedExpertsMoE, or the layer itself).
template <class L>
auto& routed_moe(L& l) {
  if constexpr (requires { l.moe(); })
    return l.moe();
  else
    return l;
}
}  // namespace detail

class SparseMoeBlock {
 public:
  using scalar_type = float;
  using Layer = std::variant<SoftmaxMoE, Qwen2MoE, DeepSeekMoE, GptOssMoE>;

  explicit SparseMoeBlock(Layer layer) : layer_(std::move(layer)) {}

  Layer& layer() { return layer_; }
  index_t d_model() const {
    return std::visit([](const auto& l) { return l.d_model(); }, layer_);
  }
  index_t k() const {
    return std::visit([](const auto& l) { return l.k(); }, layer_);
  }

  // y [T, d] = routed experts (+ shared experts) applied to x [T, d]; x must stay unchanged until backward.
  MoEOutput<float> forward(ConstMatrixView<float> x, MatrixView<float> y, Mode mode = Mode::eval) {
    return std::visit([&](auto& l) { return l.forward(x, y, mode); }, layer_);
  }
  // dx [T, d] += ∂loss/∂x for dy = ∂loss/∂y; parameter gradients accumulate.
  void backward(ConstMatrixView<float> dy, MatrixView<float> dx) {
    std::visit([&](auto& l) { l.backward(dy, dx); }, layer_);
  }
  // The routing of the last forward: experts [T, k] best first, gates [T, k] as applied.
  const Routing<float>& routing() const {
    return std::visit([](const auto& l) -> const Routing<float>& { return detail::routed_moe(l).routing(); }, layer_);
  }

  template <class F>
  void for_each_parameter(F&& f) {
    std::visit([&](auto& l) { l.for_each_parameter(f); }, layer_);
  }
  // Non-trained state (DeepSeek-V3's e_score_correction_bias as "router.bias"), for checkpoints.
  template <class F>
  void for_each_buffer(F&& f) {
    std::visit(
        [&](auto& l) {
          auto& m = detail::routed_moe(l);
          if constexpr (requires { m.for_each_buffer(f); }) m.for_each_buffer(f);
        },
        layer_);
  }

 private:

  Layer layer_;
};

namespace detail {

// HF Linear weight [out, in] of each expert → smoe W1 [E, in, 2G] columns [col0, col0 + G) of expert e.
inline void put_transposed(const Tensor<float>& w, float* dst, index_t dst_cols, index_t col0) {
  const index_t out = w.dim(0), in = w.dim(1);
  for (index_t o = 0; o < out; ++o)
    for (index_t i = 0; i < in; ++i) dst[i * dst_cols + col0 + o] = w[o * in + i];
}

// Experts' SwiGLU weights from per-expert (or one shared) gate/up/down Linear tensors.
inline void load_swiglu(Checkpoint& ckpt, FeedForwardExperts<float, SwiGlu>& experts, const std::string& prefix,
                        const char* gate, const char* up, const char* down, bool per_expert) {
  const index_t E = experts.experts(), H = experts.d_model(), G = experts.hidden();
  for (index_t e = 0; e < E; ++e) {
    const std::string p = per_expert ? prefix + std::to_string(e) + "." : prefix;
    float* w1 = experts.w1().value.data() + e * H * 2 * G;
    float* w2 = experts.w2().value.data() + e * G * H;
    put_transposed(ckpt.read(p + gate + ".weight", {G, H}), w1, 2 * G, 0);
    put_transposed(ckpt.read(p + up + ".weight", {G, H}), w1, 2 * G, G);
    put_transposed(ckpt.read(p + down + ".weight", {H, G}), w2, H, 0);
  }
}

inline void copy_into(const Tensor<float>& src, Tensor<float>& dst) {
  for (index_t i = 0; i < src.size(); ++i) dst[i] = src[i];
}

}  // namespace detail

// Layer `layer`'s sparse MoE block of the checkpoint with config `c`.
inline SparseMoeBlock load_moe_block(Checkpoint& ckpt, const Config& c, index_t layer) {
  constexpr const char* ctx = "hf::load_moe_block";
  if (layer < 0 || layer >= c.layers) fail(ctx, ": layer must be in [0, num_hidden_layers = ", c.layers, "), got ", layer);
  if (!c.is_sparse(layer))
    fail(ctx, ": layer ", layer, " of this ", c.model_type, " model is a dense MLP, not a sparse MoE block",
         c.model_type == "deepseek_v3" ? " (first_k_dense_replace = " + std::to_string(c.first_k_dense_replace) + ")" : "");
  const index_t H = c.hidden, E = c.experts, I = c.expert_hidden;
  const std::string base = "model.layers." + std::to_string(layer) + ".";
  const std::string& t = c.model_type;

  if (t == "gpt_oss") {
    const std::string p = base + "mlp.";
    GptOssMoE moe(TopKRouter<float, SoftmaxGate>({.d_model = H, .experts = E, .k = c.k, .bias = true},
                                                 SoftmaxGate{.renormalize = true}),
                  FeedForwardExperts<float, ClampedSwiGlu>({.d_model = H, .experts = E, .hidden = I, .bias = true}));
    detail::copy_into(ckpt.read(p + "router.weight", {E, H}), moe.router().weight().value);
    detail::copy_into(ckpt.read(p + "router.bias", {E}), moe.router().bias().value);
    const Tensor<float> gate_up = ckpt.read(p + "experts.gate_up_proj", {E, H, 2 * I});
    const Tensor<float> gate_up_bias = ckpt.read(p + "experts.gate_up_proj_bias", {E, 2 * I});
    auto& ex = moe.experts();
    // Interleaved [gate0, up0, gate1, up1, ...] → [gate half | up half].
    for (index_t e = 0; e < E; ++e) {
      for (index_t h = 0; h < H; ++h)
        for (index_t j = 0; j < I; ++j) {
          const float* src = gate_up.data() + (e * H + h) * 2 * I;
          float* dst = ex.w1().value.data() + (e * H + h) * 2 * I;
          dst[j] = src[2 * j];
          dst[I + j] = src[2 * j + 1];
        }
      for (index_t j = 0; j < I; ++j) {
        ex.b1().value[e * 2 * I + j] = gate_up_bias[e * 2 * I + 2 * j];
        ex.b1().value[e * 2 * I + I + j] = gate_up_bias[e * 2 * I + 2 * j + 1];
      }
    }
    detail::copy_into(ckpt.read(p + "experts.down_proj", {E, I, H}), ex.w2().value);
    detail::copy_into(ckpt.read(p + "experts.down_proj_bias", {E, H}), ex.b2().value);
    return SparseMoeBlock(std::move(moe));
  }

  if (t == "deepseek_v3") {
    if (c.n_shared_experts < 1)
      fail(ctx, ": deepseek_v3 needs n_shared_experts >= 1 (its block always has shared_experts), got ", c.n_shared_experts);
    const std::string p = base + "mlp.";
    MoE<GroupTopKRouter<float>, SwiGluExperts<float>> routed(
        GroupTopKRouter<float>({.d_model = H,
                                .experts = E,
                                .k = c.k,
                                .n_groups = c.n_group,
                                .topk_groups = c.topk_group,
                                .route_scale = c.routed_scaling_factor,
                                .normalize = c.norm_topk_prob}),
        SwiGluExperts<float>({.d_model = H, .experts = E, .hidden = I}));
    detail::copy_into(ckpt.read(p + "gate.weight", {E, H}), routed.router().weight().value);
    detail::copy_into(ckpt.read(p + "gate.e_score_correction_bias", {E}), routed.router().bias().values);
    detail::load_swiglu(ckpt, routed.experts(), p + "experts.", "gate_proj", "up_proj", "down_proj", true);
    DeepSeekMoE moe(std::move(routed), SharedExpertsConfig{.experts = 1, .hidden = I * c.n_shared_experts});
    detail::load_swiglu(ckpt, moe.shared(), p + "shared_experts.", "gate_proj", "up_proj", "down_proj", false);
    return SparseMoeBlock(std::move(moe));
  }

  // Softmax routers: mixtral, qwen2_moe, qwen3_moe, olmoe.
  const bool mixtral = t == "mixtral";
  const std::string p = base + (mixtral ? "block_sparse_moe." : "mlp.");
  SoftmaxMoE routed(TopKRouter<float, SoftmaxGate>({.d_model = H, .experts = E, .k = c.k},
                                                   SoftmaxGate{.renormalize = c.norm_topk_prob}),
                    SwiGluExperts<float>({.d_model = H, .experts = E, .hidden = I}));
  detail::copy_into(ckpt.read(p + "gate.weight", {E, H}), routed.router().weight().value);
  if (mixtral)
    detail::load_swiglu(ckpt, routed.experts(), p + "experts.", "w1", "w3", "w2", true);
  else
    detail::load_swiglu(ckpt, routed.experts(), p + "experts.", "gate_proj", "up_proj", "down_proj", true);
  if (t != "qwen2_moe") return SparseMoeBlock(std::move(routed));

  Qwen2MoE moe(std::move(routed),
               SharedExpertsConfig{.experts = 1, .hidden = c.shared_expert_hidden, .sigmoid_gate = true});
  detail::load_swiglu(ckpt, moe.shared(), p + "shared_expert.", "gate_proj", "up_proj", "down_proj", false);
  detail::copy_into(ckpt.read(p + "shared_expert_gate.weight", {1, H}), moe.shared_gate().value);
  return SparseMoeBlock(std::move(moe));
}

// The block of MODEL_DIR's layer `layer` (config.json and the safetensors files).
inline SparseMoeBlock load_moe_block(const std::filesystem::path& model_dir, index_t layer) {
  const Config c = load_config(model_dir);
  Checkpoint ckpt(model_dir);
  return load_moe_block(ckpt, c, layer);
}

}  // namespace smoe::hf
