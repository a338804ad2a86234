#pragma once
// Naive double-precision references for the MoE layer math, written from the formulas (plain
// loops, no smoe kernels), so tests never compare the library against itself.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

namespace smoe::test::ref {

enum class Act { relu, gelu, swiglu };
enum class Gate { softmax, softmax_renorm, sigmoid };

inline int fan(Act a) { return a == Act::swiglu ? 2 : 1; }

// One expert: pre = x·W1 + b1 ([fan·G]), h = act(pre) ([G]), out = h·W2 + b2 ([d]).
// w1 is [d, fan·G] row-major, w2 [G, d]; empty b1/b2 mean no bias.
inline std::vector<double> expert(Act act, int d, int G, const double* x, const double* w1, const double* w2,
                                  const double* b1, const double* b2) {
  const int H = fan(act) * G;
  std::vector<double> pre(H, 0.0), h(G), out(d, 0.0);
  for (int j = 0; j < H; ++j) {
    pre[j] = b1 ? b1[j] : 0.0;
    for (int i = 0; i < d; ++i) pre[j] += x[i] * w1[i * H + j];
  }
  for (int j = 0; j < G; ++j) {
    const double a = pre[j];
    switch (act) {
      case Act::relu: h[j] = a > 0 ? a : 0; break;
      case Act::gelu: h[j] = 0.5 * a * (1 + std::erf(a / std::sqrt(2.0))); break;
      case Act::swiglu: h[j] = a / (1 + std::exp(-a)) * pre[G + j]; break;
    }
  }
  for (int c = 0; c < d; ++c) {
    out[c] = b2 ? b2[c] : 0.0;
    for (int j = 0; j < G; ++j) out[c] += h[j] * w2[j * d + c];
  }
  return out;
}

// Indices of the k largest scores, ties to the smaller index (a stable sort by descending score).
inline std::vector<int> topk(const std::vector<double>& s, int k) {
  std::vector<int> idx(s.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return s[a] > s[b]; });
  idx.resize(k);
  return idx;
}

inline std::vector<double> gates(Gate g, const std::vector<double>& s, const std::vector<int>& ids) {
  std::vector<double> out;
  if (g == Gate::sigmoid) {
    for (int e : ids) out.push_back(1 / (1 + std::exp(-s[e])));
  } else if (g == Gate::softmax) {
    double z = 0;
    for (double v : s) z += std::exp(v);
    for (int e : ids) out.push_back(std::exp(s[e]) / z);
  } else {
    double z = 0;
    for (int e : ids) z += std::exp(s[e]);
    for (int e : ids) out.push_back(std::exp(s[e]) / z);
  }
  return out;
}

struct Layer {
  int d = 0, E = 0, G = 0, K = 0;
  Act act = Act::relu;
  Gate gate = Gate::sigmoid;
  std::vector<double> router{}, w1{}, w2{}, b1{}, b2{};  // router [E, d]; w1 [E, d, fan·G]; w2 [E, G, d]

  // y [T, d] of the MoE layer for x [T, d].
  std::vector<double> forward(const std::vector<double>& x) const {
    const int T = int(x.size()) / d, H = fan(act) * G;
    std::vector<double> y(x.size(), 0.0);
    for (int t = 0; t < T; ++t) {
      std::vector<double> s(E, 0.0);
      for (int e = 0; e < E; ++e)
        for (int i = 0; i < d; ++i) s[e] += x[t * d + i] * router[e * d + i];
      const auto ids = topk(s, K);
      const auto g = gates(gate, s, ids);
      for (int j = 0; j < K; ++j) {
        const int e = ids[j];
        const auto o = expert(act, d, G, &x[t * d], &w1[std::size_t(e) * d * H], &w2[std::size_t(e) * G * d],
                              b1.empty() ? nullptr : &b1[e * H], b2.empty() ? nullptr : &b2[e * d]);
        for (int c = 0; c < d; ++c) y[t * d + c] += g[j] * o[c];
      }
    }
    return y;
  }
};

}  // namespace smoe::test::ref
