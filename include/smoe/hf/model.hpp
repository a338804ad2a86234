#pragma once
// hf::load_causal_lm: a whole Hugging Face decoder model (mixtral, qwen2_moe, qwen3_moe, olmoe) as a
// smoe::Model of TransformerBlocks, for inference (logits) and training (Model::forward/backward):
//
//   auto lm = hf::load_causal_lm(model_dir);                  // std::unique_ptr<hf::CausalLM>
//   lm->forward_logits(std::span<const std::int64_t>(ids), B); // ids [B·S], sequence-major
//   lm->logits();                                              // [B·S, vocab]
//
//   HF tensor                                        smoe parameter
//   model.embed_tokens.weight [V, H]                  embed.weight [V, H]
//   model.layers.i.input_layernorm.weight            blocks.i.attn_norm.weight
//   model.layers.i.self_attn.{q,k,v}_proj.weight     blocks.i.attn.qkv.weight [H, (nq + 2 nkv)·dh], transposed,
//                                                      columns [q heads | k heads | v heads]
//   model.layers.i.self_attn.{q,k,v}_proj.bias       blocks.i.attn.qkv.bias (qwen2_moe)
//   model.layers.i.self_attn.{q,k}_norm.weight       blocks.i.attn.{q,k}_norm.weight (qwen3_moe: [dh] per head;
//                                                      olmoe: [nq·dh] and [nkv·dh] over all heads)
//   model.layers.i.self_attn.o_proj.weight           blocks.i.attn.out.weight [nq·dh, H], transposed
//   model.layers.i.post_attention_layernorm.weight   blocks.i.ffn_norm.weight
//   model.layers.i.{block_sparse_moe,mlp}.*          blocks.i.ffn: the layer's SparseMoeBlock (hf/moe_block.hpp),
//   model.layers.i.mlp.{gate,up,down}_proj.weight      or a dense SwiGLU DenseMLP where the config says the layer
//                                                      is dense (qwen decoder_sparse_step, mlp_only_layers)
//   model.norm.weight                                final_norm.weight
//   lm_head.weight [V, H]                            head.weight (absent with tie_word_embeddings: tied to embed)
//
// Attention is CausalSelfAttention with the family's options (rotate_half RoPE with rope_theta, GQA,
// qwen2_moe's q/k/v biases, qwen3_moe's per-head and olmoe's whole q/k RMSNorm with rms_norm_eps,
// olmoe's clip_qkv); every RMSNorm uses rms_norm_eps. Refused with a smoe::error: deepseek_v3 and
// gpt_oss (their attention, MLA and sinks/sliding layers, is not implemented), a non-null
// rope_scaling, attention_bias = true (an o_proj bias). A sliding_window is kept in the Config;
// check_sequence_length refuses sequences longer than it (the window would then mask keys).
// The FFN reports no aux loss and no routing statistics to the Model: the HF blocks carry no
// balance loss (transformers' router_aux_loss_coef only matters for training with output_router_logits).
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>

#include "smoe/core/error.hpp"
#include "smoe/experts/activation.hpp"
#include "smoe/hf/checkpoint.hpp"
#include "smoe/hf/config.hpp"
#include "smoe/hf/moe_block.hpp"
#include "smoe/layers/attention.hpp"
#include "smoe/layers/dense_mlp.hpp"
#include "smoe/layers/model.hpp"
#include "smoe/layers/rms_norm.hpp"
#include "smoe/layers/transformer_block.hpp"

namespace smoe::hf {

// A decoder layer's feed-forward part: its sparse MoE block, or a dense SwiGLU MLP.
class DecoderMlp {
 public:
  using scalar_type = float;
  using Dense = DenseMLP<float, SwiGlu>;

  explicit DecoderMlp(Dense dense) : mlp_(std::move(dense)) {}
  explicit DecoderMlp(SparseMoeBlock sparse) : mlp_(std::move(sparse)) {}

  bool is_sparse() const { return std::holds_alternative<SparseMoeBlock>(mlp_); }
  SparseMoeBlock& sparse() { return std::get<SparseMoeBlock>(mlp_); }
  Dense& dense() { return std::get<Dense>(mlp_); }

  index_t d_model() const {
    return std::visit([](const auto& m) { return m.d_model(); }, mlp_);
  }
  // y [T, d] from x [T, d]; x must stay unchanged until backward (MoE<> and DenseMLP keep a view).
  void forward(ConstMatrixView<float> x, MatrixView<float> y, Mode mode = Mode::eval) {
    std::visit(
        [&](auto& m) {
          if constexpr (std::is_same_v<std::decay_t<decltype(m)>, Dense>)
            m.forward(x, y);
          else
            m.forward(x, y, mode);
        },
        mlp_);
  }
  void backward(ConstMatrixView<float> dy, MatrixView<float> dx) {
    std::visit([&](auto& m) { m.backward(dy, dx); }, mlp_);
  }
  template <class F>
  void for_each_parameter(F&& f) {
    std::visit([&](auto& m) { m.for_each_parameter(f); }, mlp_);
  }

 private:
  std::variant<Dense, SparseMoeBlock> mlp_;
};

using DecoderBlock = TransformerBlock<CausalSelfAttention<float>, DecoderMlp, RMSNorm<float>>;
using CausalLM = Model<DecoderBlock>;

inline constexpr std::string_view causal_lm_model_types[] = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"};

// Throws unless load_causal_lm can build `c`'s whole model.
inline void check_causal_lm_supported(const Config& c) {
  constexpr const char* ctx = "hf::load_causal_lm";
  if (c.model_type == "deepseek_v3" || c.model_type == "gpt_oss")
    fail(ctx, ": whole ", c.model_type,
         " models are not supported (their attention is not implemented; load one MoE block with "
         "load_moe_block / --layer L); whole models: mixtral, qwen2_moe, qwen3_moe, olmoe");
  if (c.rope_scaling) fail(ctx, ": config.json 'rope_scaling' must be null or absent (only plain RoPE is implemented)");
  if (c.attention_bias)
    fail(ctx, ": config.json 'attention_bias' must be false for ", c.model_type, " (o_proj biases are not implemented)");
}

// Throws when sequences of `length` tokens would reach beyond the config's sliding window.
inline void check_sequence_length(const Config& c, index_t length) {
  if (c.sliding_window > 0 && length > c.sliding_window)
    fail("hf::CausalLM: sequence length must be <= sliding_window = ", c.sliding_window,
         " (sliding-window masking is not implemented), got ", length);
}

namespace detail {

inline AttentionConfig attention_config(const Config& c) {
  AttentionConfig a{.d_model = c.hidden,
                    .heads = c.heads,
                    .kv_heads = c.kv_heads,
                    .head_dim = c.head_dim,
                    .rope = true,
                    .rope_base = c.rope_theta};
  a.qkv_bias = c.qkv_bias;
  if (c.model_type == "qwen3_moe") a.qk_norm = QKNorm::per_head;
  if (c.model_type == "olmoe") a.qk_norm = QKNorm::whole;
  a.qk_norm_eps = c.rms_norm_eps;
  a.clip_qkv = c.clip_qkv;
  return a;
}

inline RMSNorm<float> load_rms_norm(Checkpoint& ckpt, const std::string& name, index_t width, double eps) {
  RMSNorm<float> norm({.d_model = width, .eps = eps});
  copy_into(ckpt.read(name, {width}), norm.weight().value);
  return norm;
}

inline CausalSelfAttention<float> load_attention(Checkpoint& ckpt, const Config& c, const std::string& p) {
  CausalSelfAttention<float> attn(attention_config(c));
  const index_t H = c.hidden, dh = attn.head_dim(), nq = attn.heads() * dh, nkv = attn.kv_heads() * dh;
  const index_t W = attn.qkv_width();
  float* w = attn.qkv_weight().value.data();
  put_transposed(ckpt.read(p + "q_proj.weight", {nq, H}), w, W, 0);
  put_transposed(ckpt.read(p + "k_proj.weight", {nkv, H}), w, W, nq);
  put_transposed(ckpt.read(p + "v_proj.weight", {nkv, H}), w, W, nq + nkv);
  put_transposed(ckpt.read(p + "o_proj.weight", {H, nq}), attn.out_weight().value.data(), H, 0);
  if (c.qkv_bias) {
    const Tensor<float> bq = ckpt.read(p + "q_proj.bias", {nq}), bk = ckpt.read(p + "k_proj.bias", {nkv}),
                        bv = ckpt.read(p + "v_proj.bias", {nkv});
    float* b = attn.qkv_bias().value.data();
    for (index_t j = 0; j < nq; ++j) b[j] = bq[j];
    for (index_t j = 0; j < nkv; ++j) b[nq + j] = bk[j], b[nq + nkv + j] = bv[j];
  }
  if (attn.config().qk_norm != QKNorm::none) {
    copy_into(ckpt.read(p + "q_norm.weight", {attn.q_norm_width()}), attn.q_norm_weight().value);
    copy_into(ckpt.read(p + "k_norm.weight", {attn.k_norm_width()}), attn.k_norm_weight().value);
  }
  return attn;
}

inline DecoderMlp load_decoder_mlp(Checkpoint& ckpt, const Config& c, index_t layer) {
  if (c.is_sparse(layer)) return DecoderMlp(load_moe_block(ckpt, c, layer));
  // A dense layer (qwen): Qwen*MoeMLP of width intermediate_size, mlp.{gate,up,down}_proj.
  const std::string p = "model.layers." + std::to_string(layer) + ".mlp.";
  const index_t H = c.hidden, I = c.intermediate;
  DecoderMlp::Dense dense({.d_model = H, .hidden = I});
  put_transposed(ckpt.read(p + "gate_proj.weight", {I, H}), dense.w1().value.data(), 2 * I, 0);
  put_transposed(ckpt.read(p + "up_proj.weight", {I, H}), dense.w1().value.data(), 2 * I, I);
  put_transposed(ckpt.read(p + "down_proj.weight", {H, I}), dense.w2().value.data(), H, 0);
  return DecoderMlp(std::move(dense));
}

}  // namespace detail

// The whole causal LM of the checkpoint with config `c` (every weight read once, converted to float32).
inline std::unique_ptr<CausalLM> load_causal_lm(Checkpoint& ckpt, const Config& c) {
  check_causal_lm_supported(c);
  const double eps = c.rms_norm_eps;
  auto lm = std::make_unique<CausalLM>(
      ModelConfig{.vocab = c.vocab,
                  .d_model = c.hidden,
                  .layers = c.layers,
                  .tie_embeddings = c.tie_word_embeddings,
                  .norm_eps = eps},
      [&](index_t l) {
        const std::string p = "model.layers." + std::to_string(l) + ".";
        return DecoderBlock(detail::load_rms_norm(ckpt, p + "input_layernorm.weight", c.hidden, eps),
                            detail::load_attention(ckpt, c, p + "self_attn."),
                            detail::load_rms_norm(ckpt, p + "post_attention_layernorm.weight", c.hidden, eps),
                            detail::load_decoder_mlp(ckpt, c, l));
      });
  detail::copy_into(ckpt.read("model.embed_tokens.weight", {c.vocab, c.hidden}), lm->embedding().weight().value);
  detail::copy_into(ckpt.read("model.norm.weight", {c.hidden}), lm->final_norm().weight().value);
  if (!c.tie_word_embeddings)
    detail::copy_into(ckpt.read("lm_head.weight", {c.vocab, c.hidden}), lm->head().weight().value);
  return lm;
}

// The causal LM of MODEL_DIR (config.json and the safetensors files).
inline std::unique_ptr<CausalLM> load_causal_lm(const std::filesystem::path& model_dir) {
  const Config c = load_config(model_dir);
  check_causal_lm_supported(c);  // before any shard is opened
  Checkpoint ckpt(model_dir);
  return load_causal_lm(ckpt, c);
}

}  // namespace smoe::hf
