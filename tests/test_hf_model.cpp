// Issue 14 item 6 (whole Hugging Face decoder models): CausalSelfAttention's options for the HF
// families (q/k/v bias, per-head and whole q/k RMSNorm, clip_qkv) against a naive double reference
// written from the transformers attention code and against central differences; hf::load_model's
// errors. The logits of whole loaded models are checked by tests/oracle/hf_oracle.py against PyTorch.
#include <smoe/hf/model.hpp>
#include <smoe/train/gradient_check.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "helpers.hpp"

namespace {

using namespace smoe;
using Vec = std::vector<double>;

template <HasParameters C>
void randomize_parameters(C& c, double std, std::uint64_t seed = 100) {
  c.for_each_parameter([&](std::string_view, auto& p) { test::randomize(p.value, seed++, std); });
}

double dot(const Tensor<double>& a, const Tensor<double>& b) {
  double s = 0;
  for (index_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

std::string error_of(auto&& f) {
  try {
    f();
  } catch (const smoe::error& e) {
    return e.what();
  }
  return "(no error)";
}

// The HF attention of one layer, from modeling_{qwen2_moe,qwen3_moe,olmoe}.py: q = x Wq + bq, k, v
// likewise; q_norm/k_norm (per head or over all of q / all of k); clamp; rotate_half RoPE;
// causal softmax(q kᵀ / sqrt(dh)) v with kv head h / (H / Hkv); o Wo. Weights as smoe stores them:
// Wqkv [d, (H + 2 Hkv) dh] (x · W), Wout [H dh, d].
struct HfAttn {
  int B, L, d, H, Hkv, dh;
  double theta = 10000;
  bool bias = false;
  QKNorm norm = QKNorm::none;
  double eps = 1e-6;
  double clip = 0;
};

Vec hf_attention(const HfAttn& a, const Vec& x, const Vec& wqkv, const Vec& b, const Vec& qn, const Vec& kn,
                 const Vec& wout) {
  const int W = (a.H + 2 * a.Hkv) * a.dh, N = a.B * a.L, half = a.dh / 2;
  Vec qkv(std::size_t(N) * W, 0.0);
  for (int t = 0; t < N; ++t)
    for (int j = 0; j < W; ++j) {
      double s = a.bias ? b[j] : 0.0;
      for (int c = 0; c < a.d; ++c) s += x[t * a.d + c] * wqkv[c * W + j];
      qkv[t * W + j] = s;
    }
  auto rms_norm = [&](double* v, int n, const Vec& w) {
    double ss = 0;
    for (int j = 0; j < n; ++j) ss += v[j] * v[j];
    const double r = 1 / std::sqrt(ss / n + a.eps);
    for (int j = 0; j < n; ++j) v[j] = w[j] * (v[j] * r);
  };
  for (int t = 0; t < N; ++t) {
    double* row = &qkv[t * W];
    if (a.norm == QKNorm::per_head) {
      for (int h = 0; h < a.H; ++h) rms_norm(row + h * a.dh, a.dh, qn);
      for (int g = 0; g < a.Hkv; ++g) rms_norm(row + (a.H + g) * a.dh, a.dh, kn);
    } else if (a.norm == QKNorm::whole) {
      rms_norm(row, a.H * a.dh, qn);
      rms_norm(row + a.H * a.dh, a.Hkv * a.dh, kn);
    }
    if (a.clip > 0)
      for (int j = 0; j < W; ++j) row[j] = std::min(std::max(row[j], -a.clip), a.clip);
    const int p = t % a.L;
    for (int h = 0; h < a.H + a.Hkv; ++h) {  // rotate_half: q·cos + rotate_half(q)·sin
      double* v = row + h * a.dh;
      Vec r(v, v + a.dh);
      for (int i = 0; i < a.dh; ++i) {
        const int fi = i % half;
        const double ang = p * std::pow(a.theta, -2.0 * fi / a.dh);
        const double rot = i < half ? -r[i + half] : r[i - half];
        v[i] = r[i] * std::cos(ang) + rot * std::sin(ang);
      }
    }
  }
  Vec o(std::size_t(N) * a.H * a.dh, 0.0), y(std::size_t(N) * a.d, 0.0);
  for (int bq = 0; bq < a.B; ++bq)
    for (int h = 0; h < a.H; ++h) {
      const int g = h / (a.H / a.Hkv);
      for (int i = 0; i < a.L; ++i) {
        const double* q = &qkv[(bq * a.L + i) * W + h * a.dh];
        Vec s(std::size_t(i) + 1);
        double mx = -1e300, sum = 0;
        for (int j = 0; j <= i; ++j) {
          const double* k = &qkv[(bq * a.L + j) * W + (a.H + g) * a.dh];
          double v = 0;
          for (int c = 0; c < a.dh; ++c) v += q[c] * k[c];
          s[j] = v / std::sqrt(double(a.dh));
          mx = std::max(mx, s[j]);
        }
        for (int j = 0; j <= i; ++j) sum += (s[j] = std::exp(s[j] - mx));
        for (int j = 0; j <= i; ++j) {
          const double* v = &qkv[(bq * a.L + j) * W + (a.H + a.Hkv + g) * a.dh];
          for (int c = 0; c < a.dh; ++c) o[(bq * a.L + i) * a.H * a.dh + h * a.dh + c] += s[j] / sum * v[c];
        }
      }
    }
  for (int t = 0; t < N; ++t)
    for (int c = 0; c < a.d; ++c) {
      double s = 0;
      for (int j = 0; j < a.H * a.dh; ++j) s += o[t * a.H * a.dh + j] * wout[j * a.d + c];
      y[t * a.d + c] = s;
    }
  return y;
}

template <class T>
Vec values(const Tensor<T>& t) {
  Vec v(std::size_t(t.size()));
  for (index_t i = 0; i < t.size(); ++i) v[std::size_t(i)] = double(t[i]);
  return v;
}

AttentionConfig config_of(const HfAttn& a, index_t block) {
  return {.d_model = a.d,
          .heads = a.H,
          .kv_heads = a.Hkv,
          .head_dim = a.dh,
          .rope = true,
          .rope_base = a.theta,
          .block = block,
          .qkv_bias = a.bias,
          .qk_norm = a.norm,
          .qk_norm_eps = a.eps,
          .clip_qkv = a.clip};
}

struct AttnOptionCase {
  const char* what;
  HfAttn a;
  index_t block;
};

const AttnOptionCase attention_option_cases[] = {
    {"qwen2_moe: q/k/v bias, GQA", {2, 5, 8, 4, 2, 2, 1e6, true}, 2},
    {"qwen3_moe: per-head q_norm/k_norm, head_dim != d/H", {2, 6, 8, 2, 1, 6, 1e4, false, QKNorm::per_head, 1e-6}, 4},
    {"olmoe: whole q_norm/k_norm", {1, 7, 8, 2, 2, 4, 1e4, false, QKNorm::whole, 1e-5}, 3},
    {"olmoe with clip_qkv and GQA", {2, 4, 6, 2, 1, 4, 500.0, false, QKNorm::whole, 1e-5, 0.4}, 8},
    {"every option at once", {1, 5, 6, 4, 2, 2, 1e4, true, QKNorm::per_head, 1e-6, 0.5}, 2},
};

}  // namespace

TEMPLATE_TEST_CASE("attention options of the HF families match the naive transformers reference",
                   "[hf][hfmodel][attention]", float, double) {
  using T = TestType;
  for (const AttnOptionCase& k : attention_option_cases) {
    INFO(k.what);
    CausalSelfAttention<T> layer(config_of(k.a, k.block));
    randomize_parameters(layer, 0.6, 60);
    if (k.a.norm != QKNorm::none) {  // weights around 1, as trained norms are
      for (index_t i = 0; i < layer.q_norm_weight().value.size(); ++i) layer.q_norm_weight().value[i] += T(1);
      for (index_t i = 0; i < layer.k_norm_weight().value.size(); ++i) layer.k_norm_weight().value[i] += T(1);
    }
    const index_t N = k.a.B * k.a.L;
    const auto x = test::random_matrix<T>(N, k.a.d, 61);
    Tensor<T> y({N, k.a.d});
    layer.forward(x.matrix(), y.matrix(), k.a.B);
    const Vec expected = hf_attention(k.a, values(x), values(layer.qkv_weight().value), values(layer.qkv_bias().value),
                                      values(layer.q_norm_weight().value), values(layer.k_norm_weight().value),
                                      values(layer.out_weight().value));
    if (k.a.clip > 0) {  // the case must clip something, or the clamp goes untested
      bool clipped = false;
      auto unclipped = k.a;
      unclipped.clip = 0;
      const Vec free = hf_attention(unclipped, values(x), values(layer.qkv_weight().value),
                                    values(layer.qkv_bias().value), values(layer.q_norm_weight().value),
                                    values(layer.k_norm_weight().value), values(layer.out_weight().value));
      for (std::size_t i = 0; i < free.size(); ++i) clipped = clipped || std::abs(free[i] - expected[i]) > 1e-3;
      CHECK(clipped);
    }
    const double tol = sizeof(T) == 8 ? 1e-12 : 3e-5;
    for (index_t i = 0; i < y.size(); ++i) REQUIRE(std::abs(double(y[i]) - expected[std::size_t(i)]) <= tol * (1 + std::abs(expected[std::size_t(i)])));
  }
}

TEST_CASE("attention options: gradients of every parameter and the input match central differences",
          "[hf][hfmodel][attention][gradient]") {
  for (const AttnOptionCase& k : attention_option_cases) {
    INFO(k.what);
    CausalSelfAttention<double> layer(config_of(k.a, k.block));
    randomize_parameters(layer, 0.6, 70);
    const index_t N = k.a.B * k.a.L;
    auto x = test::random_matrix<double>(N, k.a.d, 71);
    const auto dy = test::random_matrix<double>(N, k.a.d, 72);
    Tensor<double> y({N, k.a.d}), dx({N, k.a.d});
    zero_grad(layer);
    layer.forward(x.matrix(), y.matrix(), k.a.B);
    layer.backward(dy.matrix(), dx.matrix());
    auto objective = [&] {
      layer.forward(x.matrix(), y.matrix(), k.a.B);
      return dot(y, dy);
    };
    const auto r = check_parameter_gradients(layer, objective, 1e-6, 100000);
    INFO("worst parameter " << r.worst_parameter << "[" << r.worst_index << "], error " << r.worst_error);
    CHECK(r.checked > 0);
    CHECK(r.worst_error < 1e-7);
    test::require_input_gradient(x, dx, objective);
  }
}

TEST_CASE("attention options: parameters, accounting and bad configs", "[hf][hfmodel][attention]") {
  CausalSelfAttention<float> plain({.d_model = 8, .heads = 2});
  std::vector<std::string> names;
  plain.for_each_parameter([&](std::string_view n, auto&) { names.emplace_back(n); });
  CHECK(names == std::vector<std::string>{"qkv.weight", "out.weight"});  // defaults: today's layer

  CausalSelfAttention<float> all({.d_model = 8, .heads = 4, .kv_heads = 2, .head_dim = 2, .qkv_bias = true,
                                  .qk_norm = QKNorm::whole});
  names.clear();
  all.for_each_parameter([&](std::string_view n, auto&) { names.emplace_back(n); });
  CHECK(names == std::vector<std::string>{"qkv.weight", "out.weight", "qkv.bias", "q_norm.weight", "k_norm.weight"});
  CHECK(all.qkv_bias().value.size() == 16);
  CHECK(all.q_norm_weight().value.size() == 8);
  CHECK(all.k_norm_weight().value.size() == 4);
  CHECK(all.total_parameters() == 8 * 16 + 8 * 8 + 16 + 8 + 4);

  CHECK_THAT(error_of([] { CausalSelfAttention<float>({.d_model = 8, .heads = 2, .clip_qkv = -1}); }),
             Catch::Contains("clip_qkv must be finite and >= 0"));
  CHECK_THAT(error_of([] {
               CausalSelfAttention<float>({.d_model = 8, .heads = 2, .qk_norm = QKNorm::per_head, .qk_norm_eps = 0});
             }),
             Catch::Contains("qk_norm_eps must be finite and > 0, got 0"));
}

// ---- Whole models: tiny random checkpoints in the HF layout against a naive double reference. ----
namespace {

namespace fs = std::filesystem;
using Weights = std::map<std::string, std::pair<std::vector<index_t>, Vec>>;

struct TinyModel {
  std::string type;
  int V = 11, H = 8, L = 2, nq = 2, nkv = 1, dh = 4, E = 4, k = 2, I = 6, dense_I = 5, shared_I = 3;
  bool tie = false, norm_topk = false;
  double clip = 0;
  std::string extra;  // more config.json keys
};

Weights make_weights(const TinyModel& m, std::uint64_t seed) {
  Weights w;
  auto add = [&](const std::string& name, std::vector<index_t> shape, double std, double mean = 0) {
    index_t n = 1;
    for (index_t s : shape) n *= s;
    Tensor<double> t({n});
    test::randomize(t, seed++, std);
    Vec v = values(t);
    for (double& x : v) x += mean;
    w[name] = {shape, v};
  };
  add("model.embed_tokens.weight", {m.V, m.H}, 1.0);
  add("model.norm.weight", {m.H}, 0.2, 1.0);
  if (!m.tie) add("lm_head.weight", {m.V, m.H}, 0.5);
  const bool mixtral = m.type == "mixtral";
  for (int l = 0; l < m.L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {m.H}, 0.2, 1.0);
    add(p + "post_attention_layernorm.weight", {m.H}, 0.2, 1.0);
    add(p + "self_attn.q_proj.weight", {m.nq * m.dh, m.H}, 0.5);
    add(p + "self_attn.k_proj.weight", {m.nkv * m.dh, m.H}, 0.5);
    add(p + "self_attn.v_proj.weight", {m.nkv * m.dh, m.H}, 0.5);
    add(p + "self_attn.o_proj.weight", {m.H, m.nq * m.dh}, 0.5);
    if (m.type == "qwen2_moe")
      for (const char* b : {"q", "k", "v"}) add(p + "self_attn." + b + "_proj.bias", {(*b == 'q' ? m.nq : m.nkv) * m.dh}, 0.3);
    if (m.type == "qwen3_moe") {
      add(p + "self_attn.q_norm.weight", {m.dh}, 0.2, 1.0);
      add(p + "self_attn.k_norm.weight", {m.dh}, 0.2, 1.0);
    }
    if (m.type == "olmoe") {
      add(p + "self_attn.q_norm.weight", {m.nq * m.dh}, 0.2, 1.0);
      add(p + "self_attn.k_norm.weight", {m.nkv * m.dh}, 0.2, 1.0);
    }
    const bool dense = m.type == "qwen2_moe" && l == 0;  // mlp_only_layers = [0]
    const std::string f = p + (mixtral ? "block_sparse_moe." : "mlp.");
    if (dense) {
      add(f + "gate_proj.weight", {m.dense_I, m.H}, 0.5);
      add(f + "up_proj.weight", {m.dense_I, m.H}, 0.5);
      add(f + "down_proj.weight", {m.H, m.dense_I}, 0.5);
      continue;
    }
    add(f + "gate.weight", {m.E, m.H}, 0.7);
    for (int e = 0; e < m.E; ++e) {
      const std::string x = f + "experts." + std::to_string(e) + ".";
      add(x + (mixtral ? "w1" : "gate_proj") + ".weight", {m.I, m.H}, 0.5);
      add(x + (mixtral ? "w3" : "up_proj") + ".weight", {m.I, m.H}, 0.5);
      add(x + (mixtral ? "w2" : "down_proj") + ".weight", {m.H, m.I}, 0.5);
    }
    if (m.type == "qwen2_moe") {
      add(f + "shared_expert.gate_proj.weight", {m.shared_I, m.H}, 0.5);
      add(f + "shared_expert.up_proj.weight", {m.shared_I, m.H}, 0.5);
      add(f + "shared_expert.down_proj.weight", {m.H, m.shared_I}, 0.5);
      add(f + "shared_expert_gate.weight", {1, m.H}, 0.5);
    }
  }
  return w;
}

void write_model(const fs::path& dir, const TinyModel& m, const Weights& w) {
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ofstream(dir / "config.json")
      << "{\"model_type\": \"" << m.type << "\", \"vocab_size\": " << m.V << ", \"hidden_size\": " << m.H
      << ", \"num_hidden_layers\": " << m.L << ", \"num_attention_heads\": " << m.nq
      << ", \"num_key_value_heads\": " << m.nkv << ", \"head_dim\": " << m.dh << ", \"intermediate_size\": "
      << (m.type == "qwen2_moe" || m.type == "qwen3_moe" ? m.dense_I : m.I) << ", \"moe_intermediate_size\": " << m.I
      << ", \"num_local_experts\": " << m.E << ", \"num_experts\": " << m.E << ", \"num_experts_per_tok\": " << m.k
      << ", \"shared_expert_intermediate_size\": " << m.shared_I << ", \"norm_topk_prob\": "
      << (m.norm_topk ? "true" : "false") << ", \"tie_word_embeddings\": " << (m.tie ? "true" : "false")
      << ", \"rms_norm_eps\": 1e-5, \"rope_theta\": 1000.0"
      << (m.type == "qwen2_moe" ? ", \"mlp_only_layers\": [0]" : "")
      << (m.clip > 0 ? ", \"clip_qkv\": " + std::to_string(m.clip) : std::string()) << m.extra << "}";
  io::SafetensorsWriter out;
  for (const auto& [name, t] : w) {
    Tensor<float> f(t.first);
    for (index_t i = 0; i < f.size(); ++i) f[i] = float(t.second[std::size_t(i)]);
    out.add(name, f);
  }
  out.save(dir / "model.safetensors");
}

// x [n] · Wᵀ for an HF Linear weight W [out, n].
Vec linear(const Vec& W, const double* x, int out, int n) {
  Vec y(std::size_t(out), 0.0);
  for (int o = 0; o < out; ++o)
    for (int i = 0; i < n; ++i) y[o] += W[o * n + i] * x[i];
  return y;
}
Vec rms(const double* x, int n, const Vec& w, double eps) {
  double ss = 0;
  for (int i = 0; i < n; ++i) ss += x[i] * x[i];
  const double r = 1 / std::sqrt(ss / n + eps);
  Vec y(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) y[i] = w[i] * x[i] * r;
  return y;
}
double silu(double v) { return v / (1 + std::exp(-v)); }
Vec swiglu(const Weights& w, const std::string& gate, const std::string& up, const std::string& down, const Vec& x,
           int H, int I) {
  const Vec g = linear(w.at(gate).second, x.data(), I, H), u = linear(w.at(up).second, x.data(), I, H);
  Vec h(static_cast<std::size_t>(I));
  for (int i = 0; i < I; ++i) h[i] = silu(g[i]) * u[i];
  return linear(w.at(down).second, h.data(), H, I);
}

// Logits [B·S, V] of the transformers model, token by token in double.
Vec reference_logits(const TinyModel& m, const Weights& w, const std::vector<std::int64_t>& ids, int B, int S) {
  const int N = B * S, H = m.H;
  const double eps = 1e-5;
  const bool mixtral = m.type == "mixtral";
  Vec x(std::size_t(N) * H);
  for (int t = 0; t < N; ++t)
    for (int c = 0; c < H; ++c) x[t * H + c] = w.at("model.embed_tokens.weight").second[ids[t] * H + c];
  for (int l = 0; l < m.L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    // Attention: the HF weights rearranged into hf_attention's x·W layout.
    HfAttn a{B, S, H, m.nq, m.nkv, m.dh, 1000.0, m.type == "qwen2_moe",
             m.type == "qwen3_moe" ? QKNorm::per_head : m.type == "olmoe" ? QKNorm::whole : QKNorm::none, eps, m.clip};
    const int W = (m.nq + 2 * m.nkv) * m.dh;
    Vec wqkv(std::size_t(H) * W), b(std::size_t(W), 0.0), wout(std::size_t(m.nq * m.dh) * H), qn, kn;
    int col = 0;
    for (const char* name : {"q", "k", "v"}) {
      const auto& t = w.at(p + "self_attn." + name + "_proj.weight");
      const int rows = int(t.first[0]);
      for (int o = 0; o < rows; ++o) {
        for (int c = 0; c < H; ++c) wqkv[c * W + col + o] = t.second[o * H + c];
        if (a.bias) b[col + o] = w.at(p + "self_attn." + name + "_proj.bias").second[o];
      }
      col += rows;
    }
    for (int o = 0; o < H; ++o)
      for (int j = 0; j < m.nq * m.dh; ++j) wout[j * H + o] = w.at(p + "self_attn.o_proj.weight").second[o * m.nq * m.dh + j];
    if (a.norm != QKNorm::none) {
      qn = w.at(p + "self_attn.q_norm.weight").second;
      kn = w.at(p + "self_attn.k_norm.weight").second;
    }
    Vec normed(x.size());
    for (int t = 0; t < N; ++t) {
      const Vec r = rms(&x[t * H], H, w.at(p + "input_layernorm.weight").second, eps);
      std::copy(r.begin(), r.end(), normed.begin() + t * H);
    }
    const Vec att = hf_attention(a, normed, wqkv, b, qn, kn, wout);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] += att[i];
    // MLP or MoE.
    const std::string f = p + (mixtral ? "block_sparse_moe." : "mlp.");
    for (int t = 0; t < N; ++t) {
      const Vec h = rms(&x[t * H], H, w.at(p + "post_attention_layernorm.weight").second, eps);
      Vec y(std::size_t(H), 0.0);
      if (m.type == "qwen2_moe" && l == 0) {
        y = swiglu(w, f + "gate_proj.weight", f + "up_proj.weight", f + "down_proj.weight", h, H, m.dense_I);
      } else {
        const Vec logits = linear(w.at(f + "gate.weight").second, h.data(), m.E, H);
        double mx = -1e300, sum = 0;
        for (double v : logits) mx = std::max(mx, v);
        Vec prob(logits.size());
        for (std::size_t e = 0; e < prob.size(); ++e) sum += (prob[e] = std::exp(logits[e] - mx));
        for (double& v : prob) v /= sum;
        std::vector<int> order(std::size_t(m.E));
        for (int e = 0; e < m.E; ++e) order[e] = e;
        std::stable_sort(order.begin(), order.end(), [&](int i, int j) { return prob[i] > prob[j]; });
        double chosen = 0;
        for (int j = 0; j < m.k; ++j) chosen += prob[order[j]];
        for (int j = 0; j < m.k; ++j) {
          const int e = order[j];
          const double g = (mixtral || m.norm_topk) ? prob[e] / chosen : prob[e];
          const std::string xp = f + "experts." + std::to_string(e) + ".";
          const Vec o = mixtral ? swiglu(w, xp + "w1.weight", xp + "w3.weight", xp + "w2.weight", h, H, m.I)
                                : swiglu(w, xp + "gate_proj.weight", xp + "up_proj.weight", xp + "down_proj.weight", h, H, m.I);
          for (int c = 0; c < H; ++c) y[c] += g * o[c];
        }
        if (m.type == "qwen2_moe") {
          const Vec s = swiglu(w, f + "shared_expert.gate_proj.weight", f + "shared_expert.up_proj.weight",
                               f + "shared_expert.down_proj.weight", h, H, m.shared_I);
          const double gate = 1 / (1 + std::exp(-linear(w.at(f + "shared_expert_gate.weight").second, h.data(), 1, H)[0]));
          for (int c = 0; c < H; ++c) y[c] += gate * s[c];
        }
      }
      for (int c = 0; c < H; ++c) x[t * H + c] += y[c];
    }
  }
  Vec out(std::size_t(N) * m.V);
  const Vec& head = w.at(m.tie ? "model.embed_tokens.weight" : "lm_head.weight").second;
  for (int t = 0; t < N; ++t) {
    const Vec h = rms(&x[t * H], H, w.at("model.norm.weight").second, eps);
    const Vec lg = linear(head, h.data(), m.V, H);
    std::copy(lg.begin(), lg.end(), out.begin() + t * m.V);
  }
  return out;
}

}  // namespace

TEST_CASE("hf::load_causal_lm: logits of tiny mixtral, qwen2_moe, qwen3_moe, olmoe match the naive reference",
          "[hf][hfmodel][model]") {
  std::vector<TinyModel> models(4);
  models[0].type = "mixtral";
  models[0].tie = true;
  models[1].type = "qwen2_moe";
  models[2].type = "qwen3_moe";
  models[2].norm_topk = true;
  models[2].dh = 6;  // head_dim != hidden / heads
  models[3].type = "olmoe";
  models[3].clip = 1.5;
  models[3].nkv = 2;
  for (const TinyModel& m : models) {
    INFO(m.type);
    const Weights w = make_weights(m, 200);
    const fs::path dir = fs::temp_directory_path() / ("smoe_test_hf_model_" + m.type);
    write_model(dir, m, w);
    const int B = 2, S = 5;
    std::vector<std::int64_t> ids(std::size_t(B * S));
    for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = std::int64_t((i * 7 + 3) % std::size_t(m.V));
    auto lm = hf::load_causal_lm(dir);
    CHECK(lm->tied() == m.tie);
    CHECK(lm->block(0).ffn().is_sparse() == (m.type != "qwen2_moe"));
    lm->forward_logits(std::span<const std::int64_t>(ids), B);
    const Vec expected = reference_logits(m, w, ids, B, S);
    const auto logits = lm->logits();
    REQUIRE(logits.rows == B * S);
    REQUIRE(logits.cols == m.V);
    double worst = 0, scale = 0;
    for (int t = 0; t < B * S; ++t)
      for (int v = 0; v < m.V; ++v) {
        worst = std::max(worst, std::abs(double(logits(t, v)) - expected[std::size_t(t * m.V + v)]));
        scale = std::max(scale, std::abs(expected[std::size_t(t * m.V + v)]));
      }
    INFO("worst abs error " << worst << ", largest logit " << scale);
    CHECK(worst <= 1e-4 * std::max(1.0, scale));
    fs::remove_all(dir);
  }
}

TEST_CASE("hf::load_causal_lm refuses what it cannot build, naming it", "[hf][hfmodel][model][errors]") {
  const fs::path dir = fs::temp_directory_path() / "smoe_test_hf_model_errors";
  TinyModel m;
  m.type = "olmoe";
  const Weights w = make_weights(m, 300);
  auto try_config = [&](const TinyModel& t) {
    write_model(dir, t, w);
    return error_of([&] { hf::load_causal_lm(dir); });
  };
  TinyModel d = m;
  d.type = "deepseek_v3";
  CHECK_THAT(try_config(d), Catch::Contains("whole deepseek_v3 models are not supported"));
  d.type = "gpt_oss";
  CHECK_THAT(try_config(d), Catch::Contains("whole gpt_oss models are not supported"));
  d = m;
  d.extra = ", \"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0}";
  CHECK_THAT(try_config(d), Catch::Contains("'rope_scaling' must be null"));
  d.extra = ", \"attention_bias\": true";
  CHECK_THAT(try_config(d), Catch::Contains("'attention_bias' must be false"));
  d.extra = ", \"rope_scaling\": null";
  CHECK(try_config(d) == "(no error)");
  d.extra = "";
  d.nq = 4;  // q_proj of the checkpoint has 2 heads
  CHECK_THAT(try_config(d), Catch::Contains("'model.layers.0.self_attn.q_proj.weight' must have shape [16, 8], got [8, 8]"));
  hf::Config c;
  c.sliding_window = 4;
  CHECK_NOTHROW(hf::check_sequence_length(c, 4));
  CHECK_THAT(error_of([&] { hf::check_sequence_length(c, 5); }), Catch::Contains("<= sliding_window = 4"));
  fs::remove_all(dir);
}
