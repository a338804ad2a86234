#pragma once
// Naive double-precision references for the transformer layers, written from the formulas (plain
// loops, no smoe kernels): matmul, RMSNorm, LayerNorm, half-split RoPE, causal attention and
// softmax cross-entropy. Used by test_transformer_layers and test_transformer_model.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

namespace smoe::test::xref {

using Vec = std::vector<double>;

// a [n, k] · b [k, m]
inline Vec matmul(const Vec& a, const Vec& b, int n, int k, int m) {
  Vec c(std::size_t(n) * m, 0.0);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < m; ++j) {
      double s = 0;
      for (int p = 0; p < k; ++p) s += a[std::size_t(i) * k + p] * b[std::size_t(p) * m + j];
      c[std::size_t(i) * m + j] = s;
    }
  return c;
}

inline Vec rms_norm(const Vec& x, int n, int d, const Vec& w, double eps) {
  Vec y(x.size());
  for (int t = 0; t < n; ++t) {
    double ms = 0;
    for (int c = 0; c < d; ++c) ms += x[t * d + c] * x[t * d + c] / d;
    for (int c = 0; c < d; ++c) y[t * d + c] = x[t * d + c] / std::sqrt(ms + eps) * w[c];
  }
  return y;
}

inline Vec layer_norm(const Vec& x, int n, int d, const Vec& w, const Vec& b, double eps) {
  Vec y(x.size());
  for (int t = 0; t < n; ++t) {
    double mu = 0, var = 0;
    for (int c = 0; c < d; ++c) mu += x[t * d + c] / d;
    for (int c = 0; c < d; ++c) var += (x[t * d + c] - mu) * (x[t * d + c] - mu) / d;
    for (int c = 0; c < d; ++c) y[t * d + c] = (x[t * d + c] - mu) / std::sqrt(var + eps) * w[c] + b[c];
  }
  return y;
}

// Half-split rotary embedding of one head vector at position pos.
inline void rope(double* v, int dh, double pos, double base) {
  const int h = dh / 2;
  for (int i = 0; i < h; ++i) {
    const double a = pos * std::pow(base, -2.0 * i / dh);
    const double x0 = v[i], x1 = v[i + h];
    v[i] = x0 * std::cos(a) - x1 * std::sin(a);
    v[i + h] = x1 * std::cos(a) + x0 * std::sin(a);
  }
}

struct Attn {
  int B, L, d, H, Hkv, dh;
  bool rope = true;
  double base = 10000;
  int offset = 0;
};

// y = softmax(q kᵀ/√d_head + causal mask) v · W_out per sequence and head, from x, W_qkv, W_out.
// With `only` non-empty, just those rows of y are computed (the others are 0).
inline Vec attention(const Attn& a, const Vec& x, const Vec& wqkv, const Vec& wout, const std::vector<int>& only = {}) {
  const int N = a.B * a.L, W = (a.H + 2 * a.Hkv) * a.dh, HD = a.H * a.dh;
  Vec qkv = matmul(x, wqkv, N, a.d, W);
  if (a.rope)
    for (int t = 0; t < N; ++t)
      for (int head = 0; head < a.H + a.Hkv; ++head)
        rope(&qkv[std::size_t(t) * W + head * a.dh], a.dh, a.offset + t % a.L, a.base);
  Vec o(std::size_t(N) * HD, 0.0);
  std::vector<bool> wanted(N, only.empty());
  for (int r : only) wanted[r] = true;
  for (int t = 0; t < N; ++t) {
    if (!wanted[t]) continue;
    const int b = t / a.L, i = t % a.L;
    for (int h = 0; h < a.H; ++h) {
      const int g = h / (a.H / a.Hkv);
      Vec s(a.L);
      for (int j = 0; j < a.L; ++j) {
        if (j > i) {
          s[j] = -std::numeric_limits<double>::infinity();
          continue;
        }
        double dot = 0;
        for (int c = 0; c < a.dh; ++c)
          dot += qkv[std::size_t(t) * W + h * a.dh + c] * qkv[std::size_t(b * a.L + j) * W + (a.H + g) * a.dh + c];
        s[j] = dot / std::sqrt(double(a.dh));
      }
      const double mx = *std::max_element(s.begin(), s.end());
      double z = 0;
      for (double v : s) z += std::exp(v - mx);
      for (int j = 0; j <= i; ++j) {
        const double p = std::exp(s[j] - mx) / z;
        for (int c = 0; c < a.dh; ++c)
          o[std::size_t(t) * HD + h * a.dh + c] += p * qkv[std::size_t(b * a.L + j) * W + (a.H + a.Hkv + g) * a.dh + c];
      }
    }
  }
  return matmul(o, wout, N, HD, a.d);
}

// Mean over counted rows of −log softmax(z)[y] and its gradient (1/n)(softmax − onehot).
inline double cross_entropy(const Vec& z, int n, int V, const std::vector<long>& y, long ignore, Vec* grad = nullptr) {
  double total = 0;
  int counted = 0;
  for (int t = 0; t < n; ++t) counted += y[t] != ignore;
  if (grad) grad->assign(z.size(), 0.0);
  for (int t = 0; t < n; ++t) {
    if (y[t] == ignore) continue;
    double mx = z[t * V];
    for (int j = 1; j < V; ++j) mx = std::max(mx, z[t * V + j]);
    double s = 0;
    for (int j = 0; j < V; ++j) s += std::exp(z[t * V + j] - mx);
    const double lse = mx + std::log(s);
    total += lse - z[t * V + y[t]];
    if (grad) {
      for (int j = 0; j < V; ++j) (*grad)[t * V + j] = std::exp(z[t * V + j] - lse) / counted;
      (*grad)[t * V + y[t]] -= 1.0 / counted;
    }
  }
  return counted ? total / counted : 0.0;
}

}  // namespace smoe::test::xref
