#pragma once
// hf::Config: the parts of a Hugging Face config.json that smoe needs to rebuild the MoE blocks and
// decoder layers of six MoE families, with every key that is absent (or null) taking the default of
// transformers 4.57 (the last 4.x release) for that family's config class:
//
//   family        experts key          expert width key          norm_topk_prob   sparse layers
//   mixtral       num_local_experts    intermediate_size         always true      all
//   qwen2_moe     num_experts          moe_intermediate_size     false            (i+1) % decoder_sparse_step == 0,
//   qwen3_moe     num_experts          moe_intermediate_size     false              i not in mlp_only_layers
//   olmoe         num_experts          intermediate_size         false            all
//   deepseek_v3   n_routed_experts     moe_intermediate_size     true             i >= first_k_dense_replace
//   gpt_oss       num_local_experts    intermediate_size         (softmax over k) all
//
// Values are checked (positive sizes, k <= experts, groups dividing experts) so a bad config.json
// is one clear smoe::error naming the key, not a wrong model.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "smoe/core/error.hpp"
#include "smoe/core/tensor.hpp"
#include "smoe/io/json_reader.hpp"

namespace smoe::hf {

inline constexpr std::string_view supported_model_types[] = {"mixtral", "qwen2_moe", "qwen3_moe",
                                                             "olmoe",   "deepseek_v3", "gpt_oss"};

inline std::string supported_model_types_list() {
  std::string s;
  for (std::string_view t : supported_model_types) s += (s.empty() ? "" : ", ") + std::string(t);
  return s;
}

struct Config {
  std::string model_type;
  index_t hidden = 0;               // hidden_size
  index_t layers = 0;               // num_hidden_layers
  index_t vocab = 0;                // vocab_size
  index_t heads = 0;                // num_attention_heads
  index_t kv_heads = 0;             // num_key_value_heads
  index_t head_dim = 0;             // head_dim, hidden / heads when absent or null
  index_t intermediate = 0;         // intermediate_size (dense MLP width; the expert width where noted above)
  index_t experts = 0;              // routed experts
  index_t k = 0;                    // num_experts_per_tok
  index_t expert_hidden = 0;        // per-expert FFN width
  bool norm_topk_prob = false;      // renormalize the k selected weights
  index_t decoder_sparse_step = 1;  // qwen
  std::vector<index_t> mlp_only_layers;  // qwen
  index_t shared_expert_hidden = 0;      // qwen2_moe shared_expert_intermediate_size
  index_t first_k_dense_replace = 0;     // deepseek_v3
  index_t n_group = 1, topk_group = 1;   // deepseek_v3
  double routed_scaling_factor = 1.0;    // deepseek_v3
  index_t n_shared_experts = 0;          // deepseek_v3
  bool tie_word_embeddings = false;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  // Attention details of the whole decoder models (hf/model.hpp):
  bool qkv_bias = false;        // q/k/v projection biases (qwen2_moe: 'qkv_bias', true when absent)
  bool attention_bias = false;  // q/k/v/o biases (qwen3_moe, olmoe 'attention_bias'; refused by load_causal_lm)
  double clip_qkv = 0;          // olmoe 'clip_qkv' (0: null, no clamp)
  index_t sliding_window = 0;   // mixtral 'sliding_window'; qwen 'sliding_window' if 'use_sliding_window' (0: none)
  bool rope_scaling = false;    // a non-null 'rope_scaling' (refused by load_causal_lm)
  std::vector<std::int64_t> eos_token_ids;  // 'eos_token_id' (one id or a list); generation stops after one

  // Whether decoder layer `layer` has a sparse MoE block (a dense MLP otherwise).
  bool is_sparse(index_t layer) const {
    if (model_type == "qwen2_moe" || model_type == "qwen3_moe")
      return experts > 0 && (layer + 1) % decoder_sparse_step == 0 &&
             std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) == mlp_only_layers.end();
    if (model_type == "deepseek_v3") return layer >= first_k_dense_replace;
    return true;
  }
};

namespace detail {

// One config.json key with its family default; a key present with a wrong type is an error.
class ConfigReader {
 public:
  ConfigReader(const nlohmann::json& j, std::string source) : j_(j), source_(std::move(source)) {}

  bool has(const char* key) const { return j_.contains(key) && !j_.at(key).is_null(); }

  index_t integer(const char* key, index_t fallback, index_t min = 1) const {
    if (!has(key)) return fallback;
    const nlohmann::json& v = j_.at(key);
    if (!v.is_number_integer()) fail(source_, ": '", key, "' must be an integer, got ", io::describe_json(v));
    const auto n = v.get<long long>();
    if (n < min || n > (1LL << 40)) fail(source_, ": '", key, "' must be in [", min, ", 2^40], got ", n);
    return index_t(n);
  }
  double number(const char* key, double fallback) const {
    if (!has(key)) return fallback;
    const nlohmann::json& v = j_.at(key);
    if (!v.is_number() || !std::isfinite(v.get<double>()))
      fail(source_, ": '", key, "' must be a finite number, got ", io::describe_json(v));
    return v.get<double>();
  }
  bool boolean(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    const nlohmann::json& v = j_.at(key);
    if (!v.is_boolean()) fail(source_, ": '", key, "' must be true or false, got ", io::describe_json(v));
    return v.get<bool>();
  }
  std::vector<index_t> integers(const char* key) const {
    std::vector<index_t> out;
    if (!has(key)) return out;
    const nlohmann::json& v = j_.at(key);
    if (!v.is_array()) fail(source_, ": '", key, "' must be an array of layer indices, got ", io::describe_json(v));
    for (const auto& e : v) {
      if (!e.is_number_integer() || e.get<long long>() < 0)
        fail(source_, ": '", key, "' must hold layer indices >= 0, got ", io::describe_json(e));
      out.push_back(index_t(e.get<long long>()));
    }
    return out;
  }
  // A token id or a list of them; absent or null: the fallback.
  std::vector<std::int64_t> token_ids(const char* key, std::vector<std::int64_t> fallback) const {
    if (!j_.contains(key)) return fallback;
    const nlohmann::json& v = j_.at(key);
    if (v.is_null()) return {};
    std::vector<std::int64_t> out;
    for (const auto& e : v.is_array() ? v : nlohmann::json::array({v})) {
      if (!e.is_number_integer() || e.get<long long>() < 0)
        fail(source_, ": '", key, "' must be a token id >= 0 or a list of them, got ", io::describe_json(v));
      out.push_back(e.get<std::int64_t>());
    }
    return out;
  }
  const std::string& source() const { return source_; }

 private:
  const nlohmann::json& j_;
  std::string source_;
};

}  // namespace detail

// The Config of a parsed config.json (`source` names it in errors).
inline Config parse_config(const nlohmann::json& j, const std::string& source) {
  if (!j.is_object()) fail(source, ": config.json must be a JSON object, got ", io::describe_json(j));
  if (!j.contains("model_type") || !j.at("model_type").is_string())
    fail(source, ": 'model_type' must be a string, one of: ", supported_model_types_list());
  Config c;
  c.model_type = j.at("model_type").get<std::string>();
  const detail::ConfigReader r(j, source);
  const std::string& t = c.model_type;
  // transformers 4.57 defaults, per config class.
  if (t == "mixtral") {
    c.vocab = r.integer("vocab_size", 32000);
    c.hidden = r.integer("hidden_size", 4096);
    c.intermediate = r.integer("intermediate_size", 14336);
    c.layers = r.integer("num_hidden_layers", 32);
    c.heads = r.integer("num_attention_heads", 32);
    c.kv_heads = r.integer("num_key_value_heads", 8);
    c.rms_norm_eps = r.number("rms_norm_eps", 1e-5);
    c.rope_theta = r.number("rope_theta", 1e6);
    c.k = r.integer("num_experts_per_tok", 2);
    c.experts = r.integer("num_local_experts", 8);
    c.expert_hidden = c.intermediate;
    c.norm_topk_prob = true;  // Mixtral always renormalizes
  } else if (t == "qwen2_moe" || t == "qwen3_moe") {
    const bool q2 = t == "qwen2_moe";
    c.vocab = r.integer("vocab_size", 151936);
    c.hidden = r.integer("hidden_size", 2048);
    c.intermediate = r.integer("intermediate_size", q2 ? 5632 : 6144);
    c.layers = r.integer("num_hidden_layers", 24);
    c.heads = r.integer("num_attention_heads", q2 ? 16 : 32);
    c.kv_heads = r.integer("num_key_value_heads", q2 ? 16 : 4);
    c.rms_norm_eps = r.number("rms_norm_eps", 1e-6);
    c.rope_theta = r.number("rope_theta", 10000.0);
    c.decoder_sparse_step = r.integer("decoder_sparse_step", 1);
    c.expert_hidden = r.integer("moe_intermediate_size", q2 ? 1408 : 768);
    c.k = r.integer("num_experts_per_tok", q2 ? 4 : 8);
    // transformers >= 5.3 may write Qwen3-MoE's count as num_local_experts (an attribute alias).
    c.experts = r.has("num_experts") ? r.integer("num_experts", 0, 0) : r.integer("num_local_experts", q2 ? 60 : 128, 0);
    c.norm_topk_prob = r.boolean("norm_topk_prob", false);
    c.mlp_only_layers = r.integers("mlp_only_layers");
    if (q2) c.shared_expert_hidden = r.integer("shared_expert_intermediate_size", 5632);
  } else if (t == "olmoe") {
    c.vocab = r.integer("vocab_size", 50304);
    c.hidden = r.integer("hidden_size", 2048);
    c.intermediate = r.integer("intermediate_size", 2048);
    c.layers = r.integer("num_hidden_layers", 16);
    c.heads = r.integer("num_attention_heads", 16);
    c.kv_heads = r.integer("num_key_value_heads", c.heads);
    c.rms_norm_eps = r.number("rms_norm_eps", 1e-5);
    c.rope_theta = r.number("rope_theta", 10000.0);
    c.k = r.integer("num_experts_per_tok", 8);
    c.experts = r.integer("num_experts", 64);
    c.expert_hidden = c.intermediate;
    c.norm_topk_prob = r.boolean("norm_topk_prob", false);
  } else if (t == "deepseek_v3") {
    c.vocab = r.integer("vocab_size", 129280);
    c.hidden = r.integer("hidden_size", 7168);
    c.intermediate = r.integer("intermediate_size", 18432);
    c.layers = r.integer("num_hidden_layers", 61);
    c.heads = r.integer("num_attention_heads", 128);
    c.kv_heads = r.integer("num_key_value_heads", 128);
    c.rms_norm_eps = r.number("rms_norm_eps", 1e-6);
    c.rope_theta = r.number("rope_theta", 10000.0);
    c.expert_hidden = r.integer("moe_intermediate_size", 2048);
    c.n_shared_experts = r.integer("n_shared_experts", 1, 0);
    c.experts = r.integer("n_routed_experts", 256);
    c.routed_scaling_factor = r.number("routed_scaling_factor", 2.5);
    c.n_group = r.integer("n_group", 8);
    c.topk_group = r.integer("topk_group", 4);
    c.k = r.integer("num_experts_per_tok", 8);
    c.first_k_dense_replace = r.integer("first_k_dense_replace", 3, 0);
    c.norm_topk_prob = r.boolean("norm_topk_prob", true);
  } else if (t == "gpt_oss") {
    c.vocab = r.integer("vocab_size", 201088);
    c.hidden = r.integer("hidden_size", 2880);
    c.intermediate = r.integer("intermediate_size", 2880);
    c.layers = r.integer("num_hidden_layers", 36);
    c.heads = r.integer("num_attention_heads", 64);
    c.kv_heads = r.integer("num_key_value_heads", 8);
    c.rms_norm_eps = r.number("rms_norm_eps", 1e-5);
    c.rope_theta = r.number("rope_theta", 150000.0);
    c.k = r.integer("num_experts_per_tok", 4);
    c.experts = r.integer("num_local_experts", 128);
    c.expert_hidden = c.intermediate;
    c.norm_topk_prob = true;  // softmax over the k selected logits: the weights sum to 1
  } else {
    fail(source, ": unsupported model_type '", io::clip_text(t), "' (supported: ", supported_model_types_list(), ")");
  }
  c.tie_word_embeddings = r.boolean("tie_word_embeddings", false);
  if (t == "qwen2_moe") c.qkv_bias = r.boolean("qkv_bias", true);
  if (t == "qwen3_moe" || t == "olmoe") c.attention_bias = r.boolean("attention_bias", false);
  if (t == "olmoe") {
    c.clip_qkv = r.number("clip_qkv", 0.0);
    if (r.has("clip_qkv") && !(c.clip_qkv > 0)) fail(source, ": 'clip_qkv' must be > 0 or null, got ", c.clip_qkv);
  }
  // transformers' config classes default eos_token_id to 2 (mixtral), 50279 (olmoe), none otherwise.
  c.eos_token_ids = r.token_ids("eos_token_id", t == "mixtral" ? std::vector<std::int64_t>{2}
                                               : t == "olmoe" ? std::vector<std::int64_t>{50279}
                                                              : std::vector<std::int64_t>{});
  if (t == "mixtral") c.sliding_window = r.integer("sliding_window", 0);
  if ((t == "qwen2_moe" || t == "qwen3_moe") && r.boolean("use_sliding_window", false))
    c.sliding_window = r.integer("sliding_window", 4096);
  c.rope_scaling = r.has("rope_scaling");
  c.head_dim = r.integer("head_dim", t == "gpt_oss" ? 64 : c.hidden / c.heads);

  if (c.experts > 0 && (c.k < 1 || c.k > c.experts))
    fail(source, ": 'num_experts_per_tok' must be in [1, experts = ", c.experts, "], got ", c.k);
  if (t == "deepseek_v3") {
    if (c.experts % c.n_group != 0)
      fail(source, ": 'n_group' must divide n_routed_experts = ", c.experts, ", got ", c.n_group);
    if (c.topk_group > c.n_group) fail(source, ": 'topk_group' must be in [1, n_group = ", c.n_group, "], got ", c.topk_group);
    if (c.n_group > 1 && c.experts / c.n_group < 2)
      fail(source, ": experts per group (n_routed_experts / n_group) must be >= 2 (the group score is a top-2 sum), got ",
           c.experts / c.n_group);
    if (c.k > c.topk_group * (c.experts / c.n_group))
      fail(source, ": 'num_experts_per_tok' must be <= topk_group · n_routed_experts / n_group = ",
           c.topk_group * (c.experts / c.n_group), ", got ", c.k);
  }
  return c;
}

// The Config of MODEL_DIR/config.json.
inline Config load_config(const std::filesystem::path& model_dir) {
  const std::filesystem::path path = model_dir / "config.json";
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("hf::load_config: cannot open '", path.string(), "'");
  std::ostringstream text;
  text << in.rdbuf();
  const std::string source = "'" + path.string() + "'";
  return parse_config(io::parse_json(text.str(), source), source);
}

}  // namespace smoe::hf
