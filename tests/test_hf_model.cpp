// Issue 14 item 6 (whole Hugging Face decoder models): CausalSelfAttention's options for the HF
// families (q/k/v bias, per-head and whole q/k RMSNorm, clip_qkv) against a naive double reference
// written from the transformers attention code and against central differences; hf::load_model's
// errors. The logits of whole loaded models are checked by tests/oracle/hf_oracle.py against PyTorch.
#include <smoe/layers/attention.hpp>
#include <smoe/train/gradient_check.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
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
