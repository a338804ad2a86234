#pragma once
// CausalSelfAttention: multi-head causal self-attention with a fused QKV projection, rotary
// position embedding and optional grouped-query heads, computed in blocks (flash attention).
//
//   qkv = x · W_qkv                 "qkv.weight" [d, (H + 2·H_kv)·d_head], columns
//                                   [q head 0 … q head H−1 | k head 0 … H_kv−1 | v head 0 … H_kv−1]
//   q, k ← RoPE(q, k)               rotary.hpp: half-split pairs (i, i + d_head/2), base 10000
//   o_h = softmax(q_h k_gᵀ / √d_head + causal mask) v_g,   g = h / (H / H_kv)
//   y = o · W_out                   "out.weight" [H·d_head, d], o = [o_0 … o_{H−1}]
// (Vaswani et al. 2017; RoPE: Su et al. 2021; grouped-query: Ainslie et al. 2023, consecutive
// query heads share a kv head as in LLaMA's repeat_kv; no biases by default.)
//
// Options for the Hugging Face families (hf/model.hpp), applied between the projection and RoPE in
// this order, each off by default (CPU only; the CUDA twin refuses them):
//   qkv += b_qkv                    qkv_bias: "qkv.bias" [(H + 2·H_kv)·d_head] (Qwen2-MoE)
//   q, k ← RMSNorm(q), RMSNorm(k)   qk_norm: "q_norm.weight", "k_norm.weight", r = 1/sqrt(mean x² + eps)
//                                     per_head: over each head's d_head values, weights [d_head] (Qwen3-MoE)
//                                     whole: over all of q [H·d_head] and all of k [H_kv·d_head] (OLMoE)
//   q, k, v ← clamp(·, −c, c)       clip_qkv = c > 0 (OLMoE); the gradient passes where −c <= value <= c
// The norms' backward is RMSNorm's (rms_norm.hpp) per segment; their statistics accumulate in double.
//
// Input: B independent sequences of length L as rows x [B·L, d], sequence-major. Each sequence
// is causal on its own, and its positions are position_offset + 0 … L − 1 (RoPE only; the keys are
// always those of the same call).
//
// Blocked computation (Dao et al. 2022, FlashAttention; Dao 2023, FlashAttention-2): queries and
// keys are cut into blocks of `block` rows; a work item (sequence, head, query block) walks the
// key blocks up to the diagonal with an online softmax (running max m and sum l per row), so the
// scratch is O(block² + block·d_head) per thread and no L×L buffer exists. The forward saves the
// rotated q, k, v, the attention output o and the per-row log-sum-exp; the backward recomputes
// the probabilities blockwise, P = exp(q kᵀ/√d_head − lse), with D_i = Σ_c dO_ic O_ic:
//   dV = Pᵀ dO,   dP = dO Vᵀ,   dS = P ⊙ (dP − D),   dQ = dS K / √d_head,   dK = dSᵀ Q / √d_head
// in two passes so that no result is summed across threads: one over (sequence, kv head, key
// block) accumulating dK, dV over its query heads and query blocks in order, one over (sequence,
// head, query block) accumulating dQ. Results are the same for any thread count.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string_view>
#include <type_traits>
#include <vector>

#include "smoe/core/parameter.hpp"
#include "smoe/core/validate.hpp"
#include "smoe/cpu/eigen.hpp"
#include "smoe/cpu/parallel.hpp"
#include "smoe/layers/detail/blocked_gemm.hpp"
#include "smoe/layers/kv_cache.hpp"
#include "smoe/layers/rotary.hpp"

namespace smoe {

// RMSNorm of the projected queries and keys (before RoPE).
enum class QKNorm {
  none,
  per_head,  // over each head's d_head values (Qwen3-MoE)
  whole,     // over all query heads together, and all key heads together (OLMoE)
};

struct AttentionConfig {
  index_t d_model = 0;
  index_t heads = 1;       // H, query heads
  index_t kv_heads = 0;    // H_kv: 0 means H (multi-head); 1 is multi-query; must divide H
  index_t head_dim = 0;    // d_head: 0 means d_model / H
  bool rope = true;
  double rope_base = 10000;
  index_t block = 64;      // rows per query block and per key block
  bool qkv_bias = false;          // "qkv.bias" added to the projection
  QKNorm qk_norm = QKNorm::none;  // "q_norm.weight", "k_norm.weight"
  double qk_norm_eps = 1e-6;
  double clip_qkv = 0;            // > 0: q, k, v clamped to [−clip_qkv, clip_qkv]; 0: off

  // Whether any step between the projection and RoPE is on (the CUDA twin has none of them).
  bool has_qkv_prologue() const { return qkv_bias || qk_norm != QKNorm::none || clip_qkv > 0; }

  void validate(const char* context) const {
    if (d_model < 1) fail(context, ": d_model must be >= 1, got ", d_model);
    if (heads < 1) fail(context, ": heads must be >= 1, got ", heads);
    if (kv_heads < 0) fail(context, ": kv_heads must be >= 0 (0 means heads), got ", kv_heads);
    if (kv_heads > 0 && heads % kv_heads != 0)
      fail(context, ": kv_heads must divide heads = ", heads, ", got ", kv_heads);
    if (head_dim < 0) fail(context, ": head_dim must be >= 0 (0 means d_model / heads), got ", head_dim);
    if (head_dim == 0 && d_model % heads != 0)
      fail(context, ": head_dim = 0 needs heads to divide d_model = ", d_model, ", got heads = ", heads);
    const index_t dh = head_dim == 0 ? d_model / heads : head_dim;
    if (rope && dh % 2 != 0) fail(context, ": head_dim must be even for RoPE, got ", dh);
    if (rope && (!(rope_base > 0) || !std::isfinite(rope_base)))
      fail(context, ": rope_base must be finite and > 0, got ", rope_base);
    if (block < 1) fail(context, ": block must be >= 1, got ", block);
    if (qk_norm != QKNorm::none && (!(qk_norm_eps > 0) || !std::isfinite(qk_norm_eps)))
      fail(context, ": qk_norm_eps must be finite and > 0, got ", qk_norm_eps);
    if (!(clip_qkv >= 0) || !std::isfinite(clip_qkv))
      fail(context, ": clip_qkv must be finite and >= 0 (0: off), got ", clip_qkv);
  }
};

namespace detail {

// What both backends' CausalSelfAttention share: the resolved config, the sizes it implies, the
// accounting and the forward's argument checks.
class AttentionShape {
 public:
  explicit AttentionShape(AttentionConfig c) : config_(resolve(c)) {}

  // The config with kv_heads and head_dim resolved.
  const AttentionConfig& config() const { return config_; }
  index_t d_model() const { return config_.d_model; }
  index_t heads() const { return config_.heads; }
  index_t kv_heads() const { return config_.kv_heads; }
  index_t head_dim() const { return config_.head_dim; }
  index_t qkv_width() const { return (config_.heads + 2 * config_.kv_heads) * config_.head_dim; }

  // Accounting. Every weight takes part in every token.
  index_t total_parameters() const {
    return d_model() * qkv_width() + heads() * head_dim() * d_model() + (config_.qkv_bias ? qkv_width() : 0) +
           q_norm_width() + k_norm_width();
  }
  // Lengths of the q_norm and k_norm weights (0 without qk_norm).
  index_t q_norm_width() const {
    return config_.qk_norm == QKNorm::none ? 0 : config_.qk_norm == QKNorm::per_head ? head_dim() : heads() * head_dim();
  }
  index_t k_norm_width() const {
    return config_.qk_norm == QKNorm::none ? 0 : config_.qk_norm == QKNorm::per_head ? head_dim() : kv_heads() * head_dim();
  }
  double active_parameters_per_token() const { return double(total_parameters()); }
  // The projections only: 2·(d·(H + 2·H_kv)·d_head + H·d_head·d). Context-dependent work is in
  // flops_per_token(context).
  double flops_per_token() const { return 2.0 * double(total_parameters()); }
  // Projections plus the causal score (q·k) and value (p·v) products averaged over the positions
  // of one sequence of `context` tokens: query i attends i + 1 keys, (context + 1)/2 on average,
  // each costing 2·H·d_head for the score and 2·H·d_head for the value, so
  //   flops = 2·(d·(H + 2·H_kv)·d_head + H·d_head·d) + 2·H·d_head·(context + 1).
  double flops_per_token(index_t context) const {
    if (context < 1) fail("CausalSelfAttention: context must be >= 1, got ", context);
    return flops_per_token() + 2.0 * double(heads() * head_dim()) * double(context + 1);
  }

 protected:
  static AttentionConfig resolve(AttentionConfig c) {
    c.validate("CausalSelfAttention");
    if (c.kv_heads == 0) c.kv_heads = c.heads;
    if (c.head_dim == 0) c.head_dim = c.d_model / c.heads;
    return c;
  }

  template <class X, class Y>
  void check_forward(const char* name, const X& x, const Y& y, index_t sequences, index_t position_offset) const {
    if (sequences < 1) fail(name, ": sequences must be >= 1, got ", sequences);
    if (position_offset < 0) fail(name, ": position_offset must be >= 0, got ", position_offset);
    expect_shape(name, "x", x, x.rows, d_model());
    if (x.rows % sequences != 0)
      fail(name, ": x rows (B·L) must be a multiple of sequences = ", sequences, ", got ", x.rows);
    expect_shape(name, "y", y, x.rows, d_model());
  }

  AttentionConfig config_;
};

}  // namespace detail

// Backend = smoe::cuda: the device twin in <smoe/cuda/attention.cuh>.
template <class T, class Backend = cpu>
class CausalSelfAttention : public detail::AttentionShape {
  static_assert(std::is_same_v<Backend, cpu>, "CausalSelfAttention<T, cuda> needs <smoe/cuda/attention.cuh>");

 public:
  using scalar_type = T;
  using backend = cpu;
  static constexpr const char* name = "CausalSelfAttention";
  bool validate_inputs = validate_by_default;

  explicit CausalSelfAttention(AttentionConfig c)
      : AttentionShape(c),
        qkv_weight_({config_.d_model, qkv_width()}),
        out_weight_({config_.heads * config_.head_dim, config_.d_model}) {
    if (config_.qkv_bias) qkv_bias_ = Parameter<T>({qkv_width()});
    if (config_.qk_norm != QKNorm::none) {
      q_norm_ = Parameter<T>({q_norm_width()});
      k_norm_ = Parameter<T>({k_norm_width()});
      q_norm_.value.fill(T(1));
      k_norm_.value.fill(T(1));
    }
  }

  Parameter<T>& qkv_weight() { return qkv_weight_; }
  Parameter<T>& out_weight() { return out_weight_; }
  // Present only with the matching option (an empty Parameter otherwise).
  Parameter<T>& qkv_bias() { return qkv_bias_; }
  Parameter<T>& q_norm_weight() { return q_norm_; }
  Parameter<T>& k_norm_weight() { return k_norm_; }
  // Per-row log-sum-exp of the scaled scores of the last forward, [B·L, H].
  const Tensor<T>& log_sum_exp() const { return lse_; }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("qkv.weight"), qkv_weight_);
    f(std::string_view("out.weight"), out_weight_);
    if (config_.qkv_bias) f(std::string_view("qkv.bias"), qkv_bias_);
    if (config_.qk_norm != QKNorm::none) {
      f(std::string_view("q_norm.weight"), q_norm_);
      f(std::string_view("k_norm.weight"), k_norm_);
    }
  }

  // x, y [B·L, d] with B = sequences (>= 1); positions restart at position_offset per sequence.
  void forward(ConstMatrixView<T> x, MatrixView<T> y, index_t sequences, index_t position_offset = 0) {
    using namespace cpu_kernels;
    const index_t d = d_model();
    check_forward(name, x, y, sequences, position_offset);
    if (validate_inputs) check_finite(name, "x", x);
    const index_t N = x.rows, H = heads(), G = kv_heads(), dh = head_dim(), W = qkv_width();
    sequences_ = sequences;
    length_ = N / sequences;
    x_.resize({N, d});
    qkv_.resize({N, W});
    o_.resize({N, H * dh});
    lse_.resize({N, H});
    if (N == 0) return;
    parallel_for_blocks(N, row_block, [&](index_t first, index_t last) {
      for (index_t t = first; t < last; ++t) std::copy_n(x.row(t), d, x_.data() + t * d);
    });
    detail::blocked_gemm_nn<T>(x_.matrix(), qkv_weight_.value.matrix(), qkv_.matrix());
    if (config_.has_qkv_prologue()) qkv_prologue_forward();
    if (config_.rope) {
      rope_.build(dh, config_.rope_base, position_offset, length_);
      parallel_for_blocks(N, row_block, [&](index_t first, index_t last) {
        for (index_t t = first; t < last; ++t) {
          T* row = qkv_.data() + t * W;
          for (index_t h = 0; h < H + G; ++h) rope_.rotate(row + h * dh, t % length_);  // q heads, then k heads
        }
      });
    }
    attention_forward();
    detail::blocked_gemm_nn<T>(o_.matrix(), out_weight_.value.matrix(), y);
  }

  // Writes dx [B·L, d]; accumulates the gradients of both weights.
  void backward(ConstMatrixView<T> dy, MatrixView<T> dx) {
    using namespace cpu_kernels;
    if (x_.rank() != 2) fail(name, ": backward called before forward");
    const index_t N = x_.dim(0), d = d_model(), H = heads(), G = kv_heads(), dh = head_dim(), W = qkv_width();
    expect_shape(name, "dy", dy, N, d);
    expect_shape(name, "dx", dx, N, d);
    if (validate_inputs) check_finite(name, "dy", dy);
    if (N == 0) return;
    do_.resize({N, H * dh});
    delta_.resize({N, H});
    dqkv_.resize({N, W});
    detail::blocked_gemm_nt<T>(dy, out_weight_.value.matrix(), do_.matrix(), weight_t_);
    detail::blocked_gemm_tn_add<T>(o_.matrix(), dy, out_weight_.grad.matrix());
    parallel_for_blocks(N, row_block, [&](index_t first, index_t last) {
      for (index_t t = first; t < last; ++t)
        for (index_t h = 0; h < H; ++h) {
          const T* g = do_.data() + t * H * dh + h * dh;
          const T* o = o_.data() + t * H * dh + h * dh;
          T s = 0;
          for (index_t c = 0; c < dh; ++c) s += g[c] * o[c];
          delta_[t * H + h] = s;
        }
    });
    attention_backward_kv();
    attention_backward_q();
    if (config_.rope) {
      parallel_for_blocks(N, row_block, [&](index_t first, index_t last) {
        for (index_t t = first; t < last; ++t) {
          T* row = dqkv_.data() + t * W;
          for (index_t h = 0; h < H + G; ++h) rope_.rotate_back(row + h * dh, t % length_);
        }
      });
    }
    if (config_.has_qkv_prologue()) qkv_prologue_backward();
    detail::blocked_gemm_tn_add<T>(x_.matrix(), dqkv_.matrix(), qkv_weight_.grad.matrix());
    detail::blocked_gemm_nt<T>(dqkv_.matrix(), qkv_weight_.value.matrix(), dx, weight_t_);
  }

  // Inference with a KV cache: x, y [B·n, d] hold n new tokens of each of the cache's B sequences
  // (sequence-major), at positions cache.length … cache.length + n − 1. Their rotated keys and values
  // are written into the cache; each new query attends to every cached position and to the new ones
  // up to its own. The caller advances the cache once all layers have run (Model::forward_cached).
  // Equals forward() on the whole sequences, row for row. Not differentiable: backward() afterwards
  // is refused.
  void forward_cached(ConstMatrixView<T> x, MatrixView<T> y, const LayerKVCache<T>& cache) {
    using namespace cpu_kernels;
    const index_t N = x.rows, d = d_model(), H = heads(), G = kv_heads(), dh = head_dim(), W = qkv_width();
    const index_t B = cache.sequences, past = cache.length;
    expect_shape(name, "x", x, N, d);
    expect_shape(name, "y", y, N, d);
    if (B < 1 || N % B != 0) fail(name, ": x rows (B·n) must be a multiple of the cache's sequences = ", B, ", got ", N);
    expect_equal(name, "cache width (kv_heads · head_dim)", G * dh, cache.width);
    const index_t n = N / B;
    if (past + n > cache.capacity)
      fail(name, ": ", n, " new positions after ", past, " cached ones pass the cache capacity ", cache.capacity);
    if (validate_inputs) check_finite(name, "x", x);
    x_ = Tensor<T>();  // backward() needs a forward()
    qkv_.resize({N, W});
    o_.resize({N, H * dh});
    if (N == 0) return;
    detail::blocked_gemm_nn<T>(x, qkv_weight_.value.matrix(), qkv_.matrix());
    if (config_.has_qkv_prologue()) qkv_prologue_forward();
    if (config_.rope) rope_.build(dh, config_.rope_base, past, n);
    parallel_for_blocks(N, row_block, [&](index_t first, index_t last) {
      for (index_t t = first; t < last; ++t) {
        T* row = qkv_.data() + t * W;
        if (config_.rope)
          for (index_t h = 0; h < H + G; ++h) rope_.rotate(row + h * dh, t % n);
        const index_t b = t / n, p = past + t % n;
        std::copy_n(row + H * dh, G * dh, cache.key_row(b, p));
        std::copy_n(row + (H + G) * dh, G * dh, cache.value_row(b, p));
      }
    });
    // One work item per (sequence, head, block of new queries): S = scale·Q·Kᵀ over the visible
    // positions, softmax per row, O = P·V.
    const index_t blk = config_.block, nb = (n + blk - 1) / blk, rep = H / G;
    const T scale = this->scale();
    scratch_.resize(static_cast<std::size_t>(max_threads()));
    parallel_for_indexed(B * H * nb, [&](index_t item, int thread) {
      const index_t qb = item % nb, h = (item / nb) % H, b = item / (nb * H), g = h / rep;
      const index_t i0 = qb * blk, nq = std::min(blk, n - i0), keys = past + i0 + nq;
      Scratch& sc = scratch_[static_cast<std::size_t>(thread)];
      sc.s.resize({nq, keys});
      const MatrixView<T> s(sc.s.data(), nq, keys);
      const auto q = head_rows(qkv_, W, b * n + i0, nq, h * dh, dh);
      const ConstMatrixView<T> k(cache.key_row(b, 0) + g * dh, keys, dh, cache.width);
      const ConstMatrixView<T> v(cache.value_row(b, 0) + g * dh, keys, dh, cache.width);
      eigen(s).noalias() = scale * (eigen(q) * eigen(k).transpose());
      for (index_t i = 0; i < nq; ++i) {
        T* row = s.row(i);
        const index_t visible = past + i0 + i + 1;
        T m = row[0];
        for (index_t j = 1; j < visible; ++j) m = std::max(m, row[j]);
        T sum = 0;
        for (index_t j = 0; j < visible; ++j) sum += (row[j] = std::exp(row[j] - m));
        const T inv = T(1) / sum;
        for (index_t j = 0; j < visible; ++j) row[j] *= inv;
        for (index_t j = visible; j < keys; ++j) row[j] = T(0);
      }
      MatrixView<T> out(o_.data() + (b * n + i0) * H * dh + h * dh, nq, dh, H * dh);
      eigen(out).noalias() = eigen(ConstMatrixView<T>(s)) * eigen(v);
    });
    detail::blocked_gemm_nn<T>(o_.matrix(), out_weight_.value.matrix(), y);
  }

 private:
  static constexpr index_t row_block = 64;  // tokens per work item of the row-wise steps

  struct Scratch {
    Tensor<T> s, dp, acc, acc2, m, l;  // scores/probabilities, dP/dS, accumulators, row max and sum
  };

  index_t blocks() const { return (length_ + config_.block - 1) / config_.block; }

  // The norm segments of one qkv row: `count` segments of `width` values from column `first`.
  struct NormSegments {
    index_t first, count, width;
  };
  NormSegments q_segments() const {
    const index_t n = q_norm_width();
    return {0, heads() * head_dim() / n, n};
  }
  NormSegments k_segments() const {
    const index_t n = k_norm_width();
    return {heads() * head_dim(), kv_heads() * head_dim() / n, n};
  }
  index_t norm_segments() const { return q_segments().count + k_segments().count; }

  // qkv_ ← clamp(norm(qkv_ + b)), keeping what the backward needs: the normed inputs (pre_), their
  // 1/rms (rstd_) and the clamp's inputs (clip_in_).
  void qkv_prologue_forward() {
    using namespace cpu_kernels;
    const index_t N = qkv_.dim(0), W = qkv_width();
    const bool norm = config_.qk_norm != QKNorm::none, clip = config_.clip_qkv > 0;
    if (norm) {
      pre_.resize({N, W});
      rstd_.resize({N, norm_segments()});
    }
    if (clip) clip_in_.resize({N, W});
    const T c = T(config_.clip_qkv);
    const NormSegments segs_of[2] = {norm ? q_segments() : NormSegments{}, norm ? k_segments() : NormSegments{}};
    const T* ws[2] = {q_norm_.value.data(), k_norm_.value.data()};
    parallel_for_blocks(N, row_block, [&](index_t first, index_t last) {
      for (index_t t = first; t < last; ++t) {
        T* row = qkv_.data() + t * W;
        if (config_.qkv_bias)
          for (index_t j = 0; j < W; ++j) row[j] += qkv_bias_.value[j];
        if (norm) {
          std::copy_n(row, W, pre_.data() + t * W);
          index_t r = 0;
          for (int which = 0; which < 2; ++which) {
            const NormSegments segs = segs_of[which];
            const T* w = ws[which];
            for (index_t s = 0; s < segs.count; ++s, ++r) {
              T* v = row + segs.first + s * segs.width;
              double ss = 0;
              for (index_t j = 0; j < segs.width; ++j) ss += double(v[j]) * double(v[j]);
              const T rs = T(1.0 / std::sqrt(ss / double(segs.width) + config_.qk_norm_eps));
              rstd_[t * norm_segments() + r] = rs;
              for (index_t j = 0; j < segs.width; ++j) v[j] = v[j] * rs * w[j];
            }
          }
        }
        if (clip) {
          std::copy_n(row, W, clip_in_.data() + t * W);
          for (index_t j = 0; j < W; ++j) row[j] = std::clamp(row[j], -c, c);
        }
      }
    });
  }

  // dqkv_ (the gradient of the prologue's output) ← the gradient of the projection's output;
  // accumulates the bias and norm weights' gradients, per fixed block of rows then in order.
  void qkv_prologue_backward() {
    using namespace cpu_kernels;
    const index_t N = dqkv_.dim(0), W = qkv_width(), nq = q_norm_width(), nk = k_norm_width();
    const bool norm = config_.qk_norm != QKNorm::none, clip = config_.clip_qkv > 0;
    const index_t pw = nq + nk + (config_.qkv_bias ? W : 0);  // partial sums: dq_norm | dk_norm | dbias
    const index_t nblocks = std::max<index_t>(1, N / row_block);
    partial_.resize({nblocks, pw});
    const T c = T(config_.clip_qkv);
    const NormSegments segs_of[2] = {norm ? q_segments() : NormSegments{}, norm ? k_segments() : NormSegments{}};
    const T* ws[2] = {q_norm_.value.data(), k_norm_.value.data()};
    parallel_for_blocks(N, row_block, [&](index_t first, index_t last) {
      T* part = partial_.data() + (first / row_block) * pw;
      std::fill_n(part, pw, T(0));
      for (index_t t = first; t < last; ++t) {
        T* g = dqkv_.data() + t * W;
        if (clip) {
          const T* in = clip_in_.data() + t * W;
          for (index_t j = 0; j < W; ++j)
            if (in[j] < -c || in[j] > c) g[j] = T(0);
        }
        if (norm) {
          index_t r = 0;
          T* dw_parts[2] = {part, part + nq};
          for (int which = 0; which < 2; ++which) {
            const NormSegments segs = segs_of[which];
            for (index_t s = 0; s < segs.count; ++s, ++r) {
              const index_t off = segs.first + s * segs.width;
              T* gs = g + off;
              const T* xs = pre_.data() + t * W + off;
              const T rs = rstd_[t * norm_segments() + r];
              const T* w = ws[which];
              double dot = 0;
              for (index_t j = 0; j < segs.width; ++j) dot += double(gs[j] * w[j]) * double(xs[j] * rs);
              const T mean = T(dot / double(segs.width));
              for (index_t j = 0; j < segs.width; ++j) {
                const T xhat = xs[j] * rs;
                dw_parts[which][j] += gs[j] * xhat;
                gs[j] = rs * (gs[j] * w[j] - xhat * mean);
              }
            }
          }
        }
        if (config_.qkv_bias)
          for (index_t j = 0; j < W; ++j) part[nq + nk + j] += g[j];
      }
    });
    for (index_t b = 0; b < nblocks; ++b) {
      const T* part = partial_.data() + b * pw;
      for (index_t j = 0; j < nq; ++j) q_norm_.grad[j] += part[j];
      for (index_t j = 0; j < nk; ++j) k_norm_.grad[j] += part[nq + j];
      if (config_.qkv_bias)
        for (index_t j = 0; j < W; ++j) qkv_bias_.grad[j] += part[nq + nk + j];
    }
  }
  T scale() const { return T(1.0 / std::sqrt(double(head_dim()))); }

  // Rows [row, row + n) of one head's columns starting at `col` in a [N, width] buffer.
  static ConstMatrixView<T> head_rows(const Tensor<T>& buffer, index_t width, index_t row, index_t n, index_t col,
                                      index_t dh) {
    return ConstMatrixView<T>(buffer.data() + row * width + col, n, dh, width);
  }

  // P_ij = exp(S_ij − lse_i) where key j is visible to query i (all of it below the diagonal
  // block, j <= i on it), 0 where masked. s is [nq, nk]; lse holds H-strided row values.
  static void probabilities(MatrixView<T> s, const T* lse, index_t lse_stride, bool diagonal) {
    for (index_t i = 0; i < s.rows; ++i) {
      T* row = s.row(i);
      const T m = lse[i * lse_stride];
      const index_t visible = diagonal ? i + 1 : s.cols;
      for (index_t j = 0; j < visible; ++j) row[j] = std::exp(row[j] - m);
      for (index_t j = visible; j < s.cols; ++j) row[j] = T(0);
    }
  }

  void attention_forward() {
    using namespace cpu_kernels;
    const index_t L = length_, H = heads(), G = kv_heads(), dh = head_dim(), W = qkv_width(), blk = config_.block;
    const index_t nb = blocks(), rep = H / G;
    const T scale = this->scale();
    scratch_.resize(static_cast<std::size_t>(max_threads()));
    parallel_for_indexed(sequences_ * H * nb, [&](index_t item, int thread) {
      const index_t qb = nb - 1 - item % nb;  // long rows first: better balance, same results
      const index_t h = (item / nb) % H, b = item / (nb * H), g = h / rep;
      const index_t q0 = qb * blk, nq = std::min(blk, L - q0), row0 = b * L;
      Scratch& sc = scratch_[static_cast<std::size_t>(thread)];
      sc.acc.resize({nq, dh});
      sc.acc.zero();
      sc.m.resize({nq});
      sc.m.fill(-std::numeric_limits<T>::infinity());
      sc.l.resize({nq});
      sc.l.zero();
      sc.s.resize({nq, blk});
      const auto acc = sc.acc.matrix();
      const auto q = head_rows(qkv_, W, row0 + q0, nq, h * dh, dh);
      for (index_t kb = 0; kb <= qb; ++kb) {
        const index_t k0 = kb * blk, nk = std::min(blk, L - k0);
        const auto k = head_rows(qkv_, W, row0 + k0, nk, (H + g) * dh, dh);
        const auto v = head_rows(qkv_, W, row0 + k0, nk, (H + G + g) * dh, dh);
        const MatrixView<T> s(sc.s.data(), nq, nk);
        eigen(s).noalias() = scale * (eigen(q) * eigen(k).transpose());
        for (index_t i = 0; i < nq; ++i) {
          T* row = s.row(i);
          const index_t visible = kb == qb ? i + 1 : nk;  // the diagonal block has k0 == q0
          T m = sc.m[i];
          for (index_t j = 0; j < visible; ++j) m = std::max(m, row[j]);
          const T alpha = std::exp(sc.m[i] - m);  // 0 on the first block (m was −inf)
          T sum = 0;
          for (index_t j = 0; j < visible; ++j) sum += (row[j] = std::exp(row[j] - m));
          for (index_t j = visible; j < nk; ++j) row[j] = T(0);
          sc.l[i] = sc.l[i] * alpha + sum;
          sc.m[i] = m;
          if (kb > 0) eigen(acc).row(i) *= alpha;
        }
        eigen(acc).noalias() += eigen(ConstMatrixView<T>(s)) * eigen(v);
      }
      for (index_t i = 0; i < nq; ++i) {
        const index_t t = row0 + q0 + i;
        const T inv = T(1) / sc.l[i];
        T* out = o_.data() + t * H * dh + h * dh;
        for (index_t c = 0; c < dh; ++c) out[c] = acc(i, c) * inv;
        lse_[t * H + h] = sc.m[i] + std::log(sc.l[i]);
      }
    });
  }

  // dK, dV: one work item per (sequence, kv head, key block), over its query heads and blocks in order.
  void attention_backward_kv() {
    using namespace cpu_kernels;
    const index_t L = length_, H = heads(), G = kv_heads(), dh = head_dim(), W = qkv_width(), blk = config_.block;
    const index_t nb = blocks(), rep = H / G;
    const T scale = this->scale();
    scratch_.resize(static_cast<std::size_t>(max_threads()));
    parallel_for_indexed(sequences_ * G * nb, [&](index_t item, int thread) {
      const index_t kb = item % nb, g = (item / nb) % G, b = item / (nb * G);
      const index_t k0 = kb * blk, nk = std::min(blk, L - k0), row0 = b * L;
      Scratch& sc = scratch_[static_cast<std::size_t>(thread)];
      sc.acc.resize({nk, dh});
      sc.acc.zero();
      sc.acc2.resize({nk, dh});
      sc.acc2.zero();
      sc.s.resize({blk, nk});
      sc.dp.resize({blk, nk});
      const auto dk = sc.acc.matrix(), dv = sc.acc2.matrix();
      const auto k = head_rows(qkv_, W, row0 + k0, nk, (H + g) * dh, dh);
      const auto v = head_rows(qkv_, W, row0 + k0, nk, (H + G + g) * dh, dh);
      for (index_t h = g * rep; h < (g + 1) * rep; ++h)
        for (index_t qb = kb; qb < nb; ++qb) {
          const index_t q0 = qb * blk, nq = std::min(blk, L - q0);
          const auto q = head_rows(qkv_, W, row0 + q0, nq, h * dh, dh);
          const auto dout = head_rows(do_, H * dh, row0 + q0, nq, h * dh, dh);
          const MatrixView<T> p(sc.s.data(), nq, nk), ds(sc.dp.data(), nq, nk);
          eigen(p).noalias() = scale * (eigen(q) * eigen(k).transpose());
          probabilities(p, lse_.data() + (row0 + q0) * H + h, H, qb == kb);
          eigen(dv).noalias() += eigen(ConstMatrixView<T>(p)).transpose() * eigen(dout);
          eigen(ds).noalias() = eigen(dout) * eigen(v).transpose();
          for (index_t i = 0; i < nq; ++i) {
            const T delta = delta_[(row0 + q0 + i) * H + h];
            T* dsr = ds.row(i);
            const T* pr = p.row(i);
            for (index_t j = 0; j < nk; ++j) dsr[j] = pr[j] * (dsr[j] - delta);
          }
          eigen(dk).noalias() += scale * (eigen(ConstMatrixView<T>(ds)).transpose() * eigen(q));
        }
      for (index_t j = 0; j < nk; ++j) {
        T* row = dqkv_.data() + (row0 + k0 + j) * W;
        std::copy_n(dk.row(j), dh, row + (H + g) * dh);
        std::copy_n(dv.row(j), dh, row + (H + G + g) * dh);
      }
    });
  }

  // dQ: one work item per (sequence, head, query block), over its key blocks in order.
  void attention_backward_q() {
    using namespace cpu_kernels;
    const index_t L = length_, H = heads(), G = kv_heads(), dh = head_dim(), W = qkv_width(), blk = config_.block;
    const index_t nb = blocks(), rep = H / G;
    const T scale = this->scale();
    scratch_.resize(static_cast<std::size_t>(max_threads()));
    parallel_for_indexed(sequences_ * H * nb, [&](index_t item, int thread) {
      const index_t qb = nb - 1 - item % nb;
      const index_t h = (item / nb) % H, b = item / (nb * H), g = h / rep;
      const index_t q0 = qb * blk, nq = std::min(blk, L - q0), row0 = b * L;
      Scratch& sc = scratch_[static_cast<std::size_t>(thread)];
      sc.acc.resize({nq, dh});
      sc.acc.zero();
      sc.s.resize({nq, blk});
      sc.dp.resize({nq, blk});
      const auto dq = sc.acc.matrix();
      const auto q = head_rows(qkv_, W, row0 + q0, nq, h * dh, dh);
      const auto dout = head_rows(do_, H * dh, row0 + q0, nq, h * dh, dh);
      for (index_t kb = 0; kb <= qb; ++kb) {
        const index_t k0 = kb * blk, nk = std::min(blk, L - k0);
        const auto k = head_rows(qkv_, W, row0 + k0, nk, (H + g) * dh, dh);
        const auto v = head_rows(qkv_, W, row0 + k0, nk, (H + G + g) * dh, dh);
        const MatrixView<T> p(sc.s.data(), nq, nk), ds(sc.dp.data(), nq, nk);
        eigen(p).noalias() = scale * (eigen(q) * eigen(k).transpose());
        probabilities(p, lse_.data() + (row0 + q0) * H + h, H, qb == kb);
        eigen(ds).noalias() = eigen(dout) * eigen(v).transpose();
        for (index_t i = 0; i < nq; ++i) {
          const T delta = delta_[(row0 + q0 + i) * H + h];
          T* dsr = ds.row(i);
          const T* pr = p.row(i);
          for (index_t j = 0; j < nk; ++j) dsr[j] = pr[j] * (dsr[j] - delta);
        }
        eigen(dq).noalias() += scale * (eigen(ConstMatrixView<T>(ds)) * eigen(k));
      }
      for (index_t i = 0; i < nq; ++i) std::copy_n(dq.row(i), dh, dqkv_.data() + (row0 + q0 + i) * W + h * dh);
    });
  }

  Parameter<T> qkv_weight_, out_weight_;
  Parameter<T> qkv_bias_, q_norm_, k_norm_;  // the options' parameters, empty when off
  Tensor<T> pre_, rstd_, clip_in_, partial_;  // prologue: normed inputs, their 1/rms, clamp inputs; dw partials
  index_t sequences_ = 0, length_ = 0;
  RotaryTable<T> rope_;
  Tensor<T> x_, qkv_, o_, lse_;   // forward cache: input, rotated q|k|v, attention output, log-sum-exp
  Tensor<T> do_, delta_, dqkv_;   // backward: dO, D = rowsum(dO ⊙ O), d(q|k|v)
  Tensor<T> weight_t_;            // backward: a transposed weight for dx = dy·Wᵀ
  std::vector<Scratch> scratch_;  // per thread
};

}  // namespace smoe
