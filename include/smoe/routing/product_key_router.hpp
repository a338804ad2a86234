#pragma once
// ProductKeyRouter: product-key memory addressing (Lample et al. 2019, "Large Memory Layers with
// Product Keys"), in the form sigma-MoE studies (Csordás et al. 2023, Sec. 3.2): no query
// projection, no batch norm, H heads, ReLU gates (the paper's change) or softmax (the original).
// With ValueExperts as the pool, MoE<ProductKeyRouter<T>, ValueExperts<T>> is a PKM layer
//   y = Σ_h Σ_k gate_hk · values[id_hk].
//
// For x = x_a | x_b (halves of d/2; d even), per head h with sub-keys "keys_a", "keys_b" [H, N, d/2]:
//   u_a = keys_a[h] x_a,  u_b = keys_b[h] x_b                    [N] each
//   I = top-K(u_a),  J = top-K(u_b)                              (K each, best first)
//   candidates (i, j) ∈ I × J with score u_a[i] + u_b[j] and value id i·N + j
//   ids_h = top-K of the candidates                              ids in [0, N²)
// For finite scores this is the exact top-K of all N² sums u_a[i] + u_b[j]: a pair outside I × J
// has K pairs in I × J that beat it (Lample's product-key argument), and within I × J the pair of
// the p-th and q-th best halves (from 0) is beaten by (p+1)(q+1) − 1 pairs, so only the ~K·ln K
// pairs with (p+1)(q+1) <= K are scored. Index convention: id = i·N + j, i from keys_a (first half of x), as
// Lample's and sigma-MoE's released code (index_combine); sigma-MoE's paper formula
// u[i] = u_b[i / N] + u_a[i mod N] is the transpose.
// Gates: relu: max(0, score), no normalization; softmax: softmax over the head's K scores (Lample);
// softmax_across_heads: softmax over all H·K scores of the token (sigma-MoE's released code).
// A token's ids are the H·K entries, head-major ([T, H·K]); two heads may pick the same value.
// Ties go to the smaller sub-key index, then to the smaller value id; NaN ranks below every number.
// (With rounding, two different sums can round equal: the K selected scores are still the K
// largest, but the id among such equal sums may differ from a full sort's.)
// Gradient: through the gates to the selected u_a[i], u_b[j], then into the keys and x; the
// selection is piecewise constant. routing.logits is [T, 0]: the logit-based balance losses do
// not apply to N² "experts"; ImportanceLoss (gates) does.
// Forward is O(T·H·(N·(d + K) + K·log²K)), backward O(T·H·(N·d + K)); neither touches N² values.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string_view>
#include <vector>

#include "smoe/core/parameter.hpp"
#include "smoe/cpu/eigen.hpp"
#include "smoe/cpu/parallel.hpp"
#include "smoe/routing/routing.hpp"
#include "smoe/routing/topk_select.hpp"
#include "smoe/train/init.hpp"

namespace smoe {

enum class PkmActivation {
  relu,                  // gate = max(0, score) (sigma-MoE's proposal)
  softmax,               // softmax over each head's K scores (Lample et al. 2019)
  softmax_across_heads,  // softmax over the token's H·K scores (sigma-MoE's released code)
};

struct ProductKeyRouterConfig {
  index_t d_model = 0;  // even: x splits into two halves of d/2
  index_t n_keys = 0;   // N sub-keys per half and head; N² values
  index_t heads = 4;    // H
  index_t k = 1;        // K, selected per head, in [1, n_keys]
  PkmActivation activation = PkmActivation::relu;

  static constexpr index_t max_keys = 46340;  // N² must index as int32

  void validate(const char* context) const {
    if (d_model < 2 || d_model % 2 != 0)
      fail(context, ": d_model must be even and >= 2 (x splits into two halves), got ", d_model);
    if (n_keys < 1 || n_keys > max_keys) fail(context, ": n_keys must be in [1, ", max_keys, "], got ", n_keys);
    if (heads < 1) fail(context, ": heads must be >= 1, got ", heads);
    if (k < 1 || k > n_keys) fail(context, ": k must be in [1, n_keys = ", n_keys, "], got ", k);
    if (activation != PkmActivation::relu && activation != PkmActivation::softmax &&
        activation != PkmActivation::softmax_across_heads)
      fail(context, ": activation must be relu, softmax or softmax_across_heads, got ", static_cast<int>(activation));
  }
};

namespace detail {

// Softmax of s[0..n) in place; the largest number is subtracted first (NaN skipped).
template <class T>
SMOE_HOST_DEVICE void pkm_softmax(T* s, index_t n) {
  using std::exp;
  T m = -std::numeric_limits<T>::infinity();
  for (index_t i = 0; i < n; ++i) m = s[i] > m ? s[i] : m;
  T z = 0;
  for (index_t i = 0; i < n; ++i) z += exp(s[i] - m);
  for (index_t i = 0; i < n; ++i) s[i] = exp(s[i] - m) / z;
}

// One token's H·K selected scores → gates in place (shared by both backends).
template <class T>
SMOE_HOST_DEVICE void pkm_activate(PkmActivation activation, index_t H, index_t K, T* g) {
  switch (activation) {
    case PkmActivation::relu:
      for (index_t q = 0; q < H * K; ++q) g[q] = g[q] > T(0) ? g[q] : T(0);  // NaN → 0
      break;
    case PkmActivation::softmax:
      for (index_t h = 0; h < H; ++h) pkm_softmax(g + h * K, K);
      break;
    case PkmActivation::softmax_across_heads:
      pkm_softmax(g, H * K);
      break;
  }
}

// d_score [H·K] of one token from its gates and d_gates; empty ids (−1) carry none.
template <class T>
SMOE_HOST_DEVICE void pkm_score_gradient(PkmActivation activation, index_t H, index_t K, const std::int32_t* ids,
                                         const T* g, const T* dg, T* d_score) {
  const auto softmax_backward = [&](index_t begin, index_t n) {
    T dot = 0;
    for (index_t q = begin; q < begin + n; ++q)
      if (ids[q] >= 0) dot += g[q] * dg[q];
    for (index_t q = begin; q < begin + n; ++q) d_score[q] = g[q] * (dg[q] - dot);
  };
  switch (activation) {
    case PkmActivation::relu:
      for (index_t q = 0; q < H * K; ++q) d_score[q] = g[q] > T(0) ? dg[q] : T(0);
      break;
    case PkmActivation::softmax:
      for (index_t h = 0; h < H; ++h) softmax_backward(h * K, K);
      break;
    case PkmActivation::softmax_across_heads:
      softmax_backward(0, H * K);
      break;
  }
}

}  // namespace detail

// ProductKeyRouter<T, cuda> is the CUDA backend's (smoe/cuda/product_key_router.cuh).
template <class T, class Backend = cpu>
class ProductKeyRouter {
 public:
  using scalar_type = T;
  using backend = cpu;
  static constexpr const char* name = "ProductKeyRouter";

  explicit ProductKeyRouter(ProductKeyRouterConfig config)
      : config_((config.validate(name), config)),
        keys_a_({config.heads, config.n_keys, config.d_model / 2}),
        keys_b_({config.heads, config.n_keys, config.d_model / 2}) {}

  index_t experts() const { return config_.n_keys * config_.n_keys; }
  index_t k() const { return config_.heads * config_.k; }
  index_t d_model() const { return config_.d_model; }
  index_t n_keys() const { return config_.n_keys; }
  index_t heads() const { return config_.heads; }
  index_t k_per_head() const { return config_.k; }
  const ProductKeyRouterConfig& config() const { return config_; }
  Parameter<T>& keys_a() { return keys_a_; }
  Parameter<T>& keys_b() { return keys_b_; }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("keys_a"), keys_a_);
    f(std::string_view("keys_b"), keys_b_);
  }

  void forward(ConstMatrixView<T> x, Routing<T>& out, Mode) {
    using namespace cpu_kernels;
    expect_shape(name, "x", x, x.rows, d_model());
    const index_t tokens = x.rows, H = heads(), N = n_keys(), K = k_per_head(), half = d_model() / 2;
    out.logits.resize({tokens, 0});
    out.experts.resize({tokens, H * K});
    out.gates.resize({tokens, H * K});
    parallel_for_blocks(tokens, token_block, [&](index_t first, index_t last) {
      // Sub-key scores of the block for every head [n, H·N]: one GEMM per half, single-threaded.
      const index_t n = last - first;
      const ConstMatrixView<T> xa(x.row(first), n, half, x.stride), xb(x.row(first) + half, n, half, x.stride);
      Tensor<T> ua({n, H * N}), ub({n, H * N});
      eigen(ua.matrix()).noalias() = eigen(xa) * eigen(keys_a_.value.matrix()).transpose();
      eigen(ub.matrix()).noalias() = eigen(xb) * eigen(keys_b_.value.matrix()).transpose();
      Scratch s(K);
      for (index_t t = first; t < last; ++t) {
        std::int32_t* ids = out.experts.data() + t * H * K;
        T* gates = out.gates.data() + t * H * K;
        for (index_t h = 0; h < H; ++h) {
          const index_t row = ((t - first) * H + h) * N;
          select_head(ua.data() + row, ub.data() + row, s, ids + h * K, gates + h * K);
        }
        detail::pkm_activate(config_.activation, heads(), k_per_head(), gates);
      }
    });
  }

  void backward(ConstMatrixView<T> x, const Routing<T>& r, ConstMatrixView<T> d_gates, MatrixView<T> d_logits,
                MatrixView<T> dx) {
    using namespace cpu_kernels;
    const index_t tokens = x.rows, H = heads(), N = n_keys(), K = k_per_head(), HK = H * K, half = d_model() / 2;
    const index_t E = experts();
    expect_shape(name, "x", x, tokens, d_model());
    expect_shape(name, "routing.experts", ConstMatrixView<std::int32_t>(r.experts.matrix()), tokens, HK);
    expect_shape(name, "routing.gates", ConstMatrixView<T>(r.gates.matrix()), tokens, HK);
    expect_shape(name, "d_gates", d_gates, tokens, HK);
    // No logits, so nothing flows through d_logits: [T, E] (as MoE<> passes it) or empty.
    if (!d_logits.empty()) expect_equal(name, "d_logits rows", tokens, d_logits.rows);
    expect_shape(name, "dx", dx, tokens, d_model());
    if (tokens == 0) return;
    for (index_t i = 0; i < tokens * HK; ++i)  // before any parallel region: a bad id throws here
      if (const auto e = r.experts[i]; e < -1 || e >= E)
        fail(name, ": routing.experts at (token ", i / HK, ", k ", i % HK, ") must be in [-1, ", E, "), got ", e);
    // Gradient of the selected scores, scattered onto the sub-key scores they sum.
    du_a_.resize({tokens, H * N});
    du_b_.resize({tokens, H * N});
    parallel_for_blocks(tokens, token_block, [&](index_t first, index_t last) {
      std::vector<T> d_score(static_cast<std::size_t>(HK));
      for (index_t t = first; t < last; ++t) {
        T* dua = du_a_.data() + t * H * N;
        T* dub = du_b_.data() + t * H * N;
        std::fill_n(dua, H * N, T(0));
        std::fill_n(dub, H * N, T(0));
        const std::int32_t* ids = r.experts.data() + t * HK;
        detail::pkm_score_gradient(config_.activation, H, K, ids, r.gates.data() + t * HK, d_gates.row(t),
                                   d_score.data());
        for (index_t q = 0; q < HK; ++q) {
          if (ids[q] < 0) continue;
          const index_t h = q / K;
          dua[h * N + ids[q] / N] += d_score[static_cast<std::size_t>(q)];
          dub[h * N + ids[q] % N] += d_score[static_cast<std::size_t>(q)];
        }
      }
    });
    // Key gradients by blocks of key rows: every element sums over all tokens in order. x is read
    // here, before dx is written, so dx may alias x.
    const ConstMatrixView<T> xa(x.data, tokens, half, x.stride), xb(x.data + half, tokens, half, x.stride);
    parallel_for_blocks(H * N, key_block, [&](index_t first, index_t last) {
      eigen(keys_a_.grad.matrix().rows_range(first, last)).noalias() +=
          eigen(ConstMatrixView<T>(du_a_.matrix())).middleCols(first, last - first).transpose() * eigen(xa);
      eigen(keys_b_.grad.matrix().rows_range(first, last)).noalias() +=
          eigen(ConstMatrixView<T>(du_b_.matrix())).middleCols(first, last - first).transpose() * eigen(xb);
    });
    parallel_for_blocks(tokens, token_block, [&](index_t first, index_t last) {
      const index_t n = last - first;
      const MatrixView<T> dxa(dx.row(first), n, half, dx.stride), dxb(dx.row(first) + half, n, half, dx.stride);
      const ConstMatrixView<T> dua = du_a_.matrix().rows_range(first, last);
      const ConstMatrixView<T> dub = du_b_.matrix().rows_range(first, last);
      eigen(dxa).noalias() += eigen(dua) * eigen(keys_a_.value.matrix());
      eigen(dxb).noalias() += eigen(dub) * eigen(keys_b_.value.matrix());
    });
  }

 private:
  static constexpr index_t token_block = 128, key_block = 64;

  using Candidate = detail::Candidate<T>;  // topk_select's total order, index = value id

  struct Scratch {
    std::vector<std::int32_t> ia, jb;
    std::vector<Candidate> candidates;  // reused across the tokens of a block
    explicit Scratch(index_t K) : ia(static_cast<std::size_t>(K)), jb(static_cast<std::size_t>(K)) {}
  };

  // One head of one token: ids [K] and their raw scores (in gates [K], activated later).
  void select_head(const T* ua, const T* ub, Scratch& s, std::int32_t* ids, T* scores) const {
    const index_t N = n_keys(), K = k_per_head();
    select_topk(ua, N, K, s.ia.data());  // best first
    select_topk(ub, N, K, s.jb.data());
    // The pair of the p-th best i and the q-th best j (from 0) is beaten by the (p+1)(q+1) − 1
    // pairs of better-ranked halves, so only pairs with (p+1)(q+1) <= K can make the top K:
    // about K·ln K of Lample's K² candidates.
    s.candidates.clear();
    for (index_t p = 0; p < K; ++p)
      for (index_t q = 0; (p + 1) * (q + 1) <= K; ++q) {
        const T score = ua[s.ia[p]] + ub[s.jb[q]];
        s.candidates.push_back({true, !std::isnan(score), score, static_cast<std::int32_t>(s.ia[p] * N + s.jb[q])});
      }
    std::partial_sort(s.candidates.begin(), s.candidates.begin() + K, s.candidates.end(),
                      [](const Candidate& a, const Candidate& b) { return a.beats(b); });
    for (index_t r = 0; r < K; ++r) {
      ids[r] = s.candidates[static_cast<std::size_t>(r)].index;
      scores[r] = s.candidates[static_cast<std::size_t>(r)].score;
    }
  }

  ProductKeyRouterConfig config_;
  Parameter<T> keys_a_, keys_b_;
  Tensor<T> du_a_, du_b_;  // backward scratch: gradients of the sub-key scores [T, H·N]
};

// PKM initialization as sigma-MoE's "PKM + init" (released code, custom_init = 5):
//   keys_a, keys_b ~ N(0, (scale · d^-1/2)²),  values ~ N(0, (scale · n_values^-1/2)²),
// i.e. the values like a dense layer's second weight with d_ff = n_values. `scale` is 1 for
// post-LN, sqrt(2 / n_layers) for the paper's pre-LN models. For a Layer with router() keys and
// experts().values() (MoE<ProductKeyRouter<T>, ValueExperts<T>>).
template <class Layer>
void pkm_init(Layer& layer, InitOptions o = {}) {
  auto& router = layer.router();
  auto& experts = layer.experts();
  const double d = double(router.d_model()), n_values = double(experts.experts());
  fill_normal(router.keys_a().value, o.scale / std::sqrt(d), o.seed, 0);
  fill_normal(router.keys_b().value, o.scale / std::sqrt(d), o.seed, 1);
  fill_normal(experts.values().value, o.scale / std::sqrt(n_values), o.seed, 2);
}

}  // namespace smoe
