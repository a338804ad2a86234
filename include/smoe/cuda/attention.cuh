#pragma once
// CausalSelfAttention<T, cuda>: layers/attention.hpp's causal self-attention on the device (fp32,
// fp64, and bf16/fp16 activations and weights), same config, parameters ("qkv.weight",
// "out.weight"), RoPE and grouped-query heads, B sequences of length L as rows, position_offset.
// x, y, dx and the weights are T; what attention keeps between its steps (q|k|v, the RoPE table,
// the output before the projection, lse, dO, D, d(q|k|v)) is in acc_t<T> (fp32 for 16-bit T), so
// a 16-bit model rounds only where its tensors leave the layer.
//   projections  qkv = x·W_qkv, y = o·W_out, dO = dy·W_outᵀ, dx = dqkv·W_qkvᵀ: RowGemm; the weight
//                gradients xᵀ·dqkv and oᵀ·dy: GroupedOuterSum over the rows in order (grouped_gemm.cuh)
//   RoPE         the table is built on the device from the CPU's rope_angle (double, rounded to T)
//                and rotates with the CPU's rope_rotate_pair (layers/rotary.hpp)
//   forward      one work item per (sequence, head, query row) walks keys 0..row with an online
//                softmax, accumulating the output row in o itself (rescaled when the running max
//                grows): no L×L buffer and no per-thread array; saves lse per (row, head)
//   backward     D = rowsum(dO ⊙ O); dK, dV per (sequence, kv head, key row) over the group's query
//                heads, then query rows ≥ key row, in that order; dQ per (sequence, head, query row)
//                over keys 0..row; P = exp(q·k/√d_head − lse) recomputed. No atomics: every output
//                element is summed by one work item in a fixed order, so reruns are bitwise equal.
// The per-row order differs from the CPU's blocked (Eigen) sums only by rounding.
// Nothing in forward or backward waits for the stream, except validate_inputs (opt-in, as MoE<cuda>).
#include <cmath>
#include <limits>
#include <string_view>
#include <type_traits>

#include "smoe/core/parameter.hpp"
#include "smoe/cuda/device_tensor.cuh"
#include "smoe/cuda/grouped_gemm.cuh"
#include "smoe/cuda/row_ops.cuh"
#include "smoe/cuda/validate.cuh"
#include "smoe/layers/attention.hpp"

namespace smoe {

namespace cuda_kernels {

// Where a head's vectors sit in the [N, W] q|k|v buffer (and in o, dO [N, H·d_head]).
struct AttentionLayout {
  index_t L, H, G, dh, W;  // sequence length, query heads, kv heads, head size, q|k|v row width
  SMOE_HOST_DEVICE index_t q(index_t t, index_t h) const { return t * W + h * dh; }
  SMOE_HOST_DEVICE index_t k(index_t t, index_t g) const { return t * W + (H + g) * dh; }
  SMOE_HOST_DEVICE index_t v(index_t t, index_t g) const { return t * W + (H + G + g) * dh; }
  SMOE_HOST_DEVICE index_t o(index_t t, index_t h) const { return t * H * dh + h * dh; }
};

// cos/sin [L, d_head/2] of positions first .. first + L − 1, computed as RotaryTable::build does.
template <class T>
struct RopeTable {
  double base;
  index_t first, d_head;
  T* cos_table;
  T* sin_table;
  SMOE_HOST_DEVICE void operator()(index_t idx) const {
    using std::cos, std::sin;
    const index_t half = d_head / 2, p = idx / half, i = idx % half;
    const double a = rope_angle(base, d_head, i, first + p);
    cos_table[idx] = T(cos(a));
    sin_table[idx] = T(sin(a));
  }
};

// Rotates pair i of the first `heads` heads of every row (the q heads, then the k heads).
template <class T>
struct RopeRotate {
  T* rows;
  const T* cos_table;
  const T* sin_table;
  index_t L, W, heads, dh;
  bool back;
  SMOE_HOST_DEVICE void operator()(index_t idx) const {
    const index_t half = dh / 2, i = idx % half, h = (idx / half) % heads, t = idx / (half * heads);
    T* v = rows + t * W + h * dh;
    const index_t p = (t % L) * half + i;
    rope_rotate_pair(v[i], v[i + half], cos_table[p], sin_table[p], back);
  }
};

template <class T>
SMOE_HOST_DEVICE acc_t<T> head_dot(const T* a, const T* b, index_t n) {
  acc_t<T> sum = 0;
  for (index_t c = 0; c < n; ++c) sum += acc_t<T>(a[c]) * acc_t<T>(b[c]);
  return sum;
}

// One (sequence, head, query row): o = Σ_j softmax_j(s) v_j over keys j <= row, online.
template <class T>
struct AttentionForwardRow {
  AttentionLayout at;
  const T* qkv;
  T* o;
  T* lse;
  T scale;
  SMOE_HOST_DEVICE void operator()(index_t item) const {
    using std::exp, std::log;
    using Acc = acc_t<T>;
    const index_t i = item % at.L, h = (item / at.L) % at.H, b = item / (at.L * at.H);
    const index_t g = h / (at.H / at.G), row0 = b * at.L, t = row0 + i;
    const T* q = qkv + at.q(t, h);
    T* out = o + at.o(t, h);
    Acc m = 0, l = 0;
    for (index_t j = 0; j <= i; ++j) {
      const T* k = qkv + at.k(row0 + j, g);
      const T* v = qkv + at.v(row0 + j, g);
      const Acc s = Acc(scale) * head_dot(q, k, at.dh);
      if (j == 0) {  // the first key initializes the row (o holds garbage before)
        m = s;
        l = 1;
        for (index_t c = 0; c < at.dh; ++c) out[c] = v[c];
        continue;
      }
      if (s > m) {  // a new running max: rescale what is summed so far
        const Acc alpha = exp(m - s);
        l *= alpha;
        for (index_t c = 0; c < at.dh; ++c) out[c] = T(Acc(out[c]) * alpha);
        m = s;
      }
      const Acc p = exp(s - m);
      l += p;
      for (index_t c = 0; c < at.dh; ++c) out[c] = T(Acc(out[c]) + p * Acc(v[c]));
    }
    const Acc inv = Acc(1) / l;
    for (index_t c = 0; c < at.dh; ++c) out[c] = T(Acc(out[c]) * inv);
    lse[t * at.H + h] = T(m + log(l));
  }
};

// D[t, h] = Σ_c dO[t, h, c] · O[t, h, c].
template <class T>
struct RowDelta {
  AttentionLayout at;
  const T* d_out;
  const T* o;
  T* delta;
  SMOE_HOST_DEVICE void operator()(index_t idx) const {
    const index_t t = idx / at.H, h = idx % at.H;
    delta[idx] = T(head_dot(d_out + at.o(t, h), o + at.o(t, h), at.dh));
  }
};

// The recomputed probability P_ij and dS_ij = P_ij (dO_i·v_j − D_i) of query row t (head h) and key row u.
template <class T>
struct ScoreGradient {
  acc_t<T> p, ds;
};
template <class T>
SMOE_HOST_DEVICE ScoreGradient<T> score_gradient(const AttentionLayout& at, const T* qkv, const T* d_out, const T* lse,
                                                 const T* delta, T scale, index_t t, index_t h, index_t u, index_t g) {
  using std::exp;
  using Acc = acc_t<T>;
  const Acc s = Acc(scale) * head_dot(qkv + at.q(t, h), qkv + at.k(u, g), at.dh);
  const Acc p = exp(s - Acc(lse[t * at.H + h]));
  const Acc dp = head_dot(d_out + at.o(t, h), qkv + at.v(u, g), at.dh);
  return {p, p * (dp - Acc(delta[t * at.H + h]))};
}

// One (sequence, kv head, key row u): dV_u = Σ P_iu dO_i, dK_u = Σ dS_iu q_i / √d_head over the
// group's query heads, then query rows i >= u, accumulated in dqkv's k and v columns of row u.
template <class T>
struct AttentionBackwardKeyRow {
  AttentionLayout at;
  const T* qkv;
  const T* d_out;
  const T* lse;
  const T* delta;
  T* dqkv;
  T scale;
  SMOE_HOST_DEVICE void operator()(index_t item) const {
    using Acc = acc_t<T>;
    const index_t j = item % at.L, g = (item / at.L) % at.G, b = item / (at.L * at.G);
    const index_t rep = at.H / at.G, row0 = b * at.L, u = row0 + j;
    T* dk = dqkv + at.k(u, g);
    T* dv = dqkv + at.v(u, g);
    for (index_t c = 0; c < at.dh; ++c) dk[c] = dv[c] = T(0);
    for (index_t h = g * rep; h < (g + 1) * rep; ++h)
      for (index_t i = j; i < at.L; ++i) {
        const index_t t = row0 + i;
        const ScoreGradient<T> sg = score_gradient(at, qkv, d_out, lse, delta, scale, t, h, u, g);
        const T* q = qkv + at.q(t, h);
        const T* dout = d_out + at.o(t, h);
        const Acc ds = sg.ds * Acc(scale);
        for (index_t c = 0; c < at.dh; ++c) {
          dv[c] = T(Acc(dv[c]) + sg.p * Acc(dout[c]));
          dk[c] = T(Acc(dk[c]) + ds * Acc(q[c]));
        }
      }
  }
};

// One (sequence, head, query row t): dQ_t = Σ_{j <= row} dS_tj k_j / √d_head, in dqkv's q columns.
template <class T>
struct AttentionBackwardQueryRow {
  AttentionLayout at;
  const T* qkv;
  const T* d_out;
  const T* lse;
  const T* delta;
  T* dqkv;
  T scale;
  SMOE_HOST_DEVICE void operator()(index_t item) const {
    using Acc = acc_t<T>;
    const index_t i = item % at.L, h = (item / at.L) % at.H, b = item / (at.L * at.H);
    const index_t g = h / (at.H / at.G), row0 = b * at.L, t = row0 + i;
    T* dq = dqkv + at.q(t, h);
    for (index_t c = 0; c < at.dh; ++c) dq[c] = T(0);
    for (index_t j = 0; j <= i; ++j) {
      const index_t u = row0 + j;
      const Acc ds = score_gradient(at, qkv, d_out, lse, delta, scale, t, h, u, g).ds * Acc(scale);
      const T* k = qkv + at.k(u, g);
      for (index_t c = 0; c < at.dh; ++c) dq[c] = T(Acc(dq[c]) + ds * Acc(k[c]));
    }
  }
};

}  // namespace cuda_kernels

template <class T>
class CausalSelfAttention<T, cuda> : public detail::AttentionShape {
  static_assert(is_device_scalar_v<T>, "CausalSelfAttention<T, smoe::cuda>: T must be float, double, bf16 or fp16");
  using A = acc_t<T>;  // the working precision

 public:
  using scalar_type = T;
  using backend = cuda;
  static constexpr const char* name = "CausalSelfAttention<cuda>";
  // NaN/Inf checks of x and dy copy them to the host and wait for the stream: opt-in on the device.
  bool validate_inputs = false;

  explicit CausalSelfAttention(AttentionConfig c, cuda_stream stream = {})
      : AttentionShape(c),
        qkv_weight_({config_.d_model, qkv_width()}),
        out_weight_({config_.heads * config_.head_dim, config_.d_model}) {
    if (config_.has_qkv_prologue())
      fail(name, ": qkv_bias, qk_norm and clip_qkv are CPU-only options (Hugging Face attention), got qkv_bias = ",
           config_.qkv_bias, ", qk_norm on = ", config_.qk_norm != QKNorm::none, ", clip_qkv = ", config_.clip_qkv);
    set_stream(stream);
  }

  Parameter<T, cuda>& qkv_weight() { return qkv_weight_; }
  Parameter<T, cuda>& out_weight() { return out_weight_; }
  // Per-row log-sum-exp of the scaled scores of the last forward, [B·L, H].
  const Tensor<A, cuda>& log_sum_exp() const { return lse_; }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("qkv.weight"), qkv_weight_);
    f(std::string_view("out.weight"), out_weight_);
  }

  cuda_stream stream() const { return stream_; }
  void set_stream(cuda_stream s) {
    stream_ = s;
    for (auto* p : {&qkv_weight_, &out_weight_}) {
      p->value.set_stream(s);
      p->grad.set_stream(s);
    }
    x_.set_stream(s);
    for (auto* t : {&qkv_, &o_, &lse_, &rope_cos_, &rope_sin_, &do_, &delta_, &dqkv_}) t->set_stream(s);
  }

  // x, y [B·L, d] with B = sequences (>= 1); positions restart at position_offset per sequence.
  void forward(ConstMatrixView<T, cuda> x, MatrixView<T, cuda> y, index_t sequences, index_t position_offset = 0) {
    using namespace cuda_kernels;
    check_forward(name, x, y, sequences, position_offset);
    if (validate_inputs) check_finite(name, "x", x, stream_);
    const index_t N = x.rows, d = d_model(), H = heads(), dh = head_dim(), W = qkv_width();
    sequences_ = sequences;
    length_ = N / sequences;
    x_.resize({N, d});
    qkv_.resize({N, W});
    o_.resize({N, H * dh});
    lse_.resize({N, H});
    if (N == 0) return;
    const AttentionLayout at = layout();
    RowOps<cuda>::copy(x, x_.matrix(), stream_);  // x may be a strided view; backward reads a dense copy
    for_each_index(stream_, N * W,
                   RowGemm<T, T, A>{x_.data(), d, nullptr, Strided<T>{qkv_weight_.value.data(), 0, W, 1}, nullptr,
                                    nullptr, 0, nullptr, qkv_.data(), W, d, W, false});
    if (config_.rope) {
      const index_t half = dh / 2;
      rope_cos_.resize({length_, half});
      rope_sin_.resize({length_, half});
      for_each_index(stream_, length_ * half,
                     RopeTable<A>{config_.rope_base, position_offset, dh, rope_cos_.data(), rope_sin_.data()});
      rotate(qkv_.data(), false);
    }
    for_each_index(stream_, sequences_ * H * length_,
                   AttentionForwardRow<A>{at, qkv_.data(), o_.data(), lse_.data(), scale()});
    for_each_index(stream_, N * d,
                   RowGemm<A, T, T>{o_.data(), H * dh, nullptr, Strided<T>{out_weight_.value.data(), 0, d, 1}, nullptr,
                                    nullptr, 0, nullptr, y.data, y.stride, H * dh, d, false});
  }

  // Writes dx [B·L, d]; accumulates the gradients of both weights.
  void backward(ConstMatrixView<T, cuda> dy, MatrixView<T, cuda> dx) {
    using namespace cuda_kernels;
    if (x_.rank() != 2) fail(name, ": backward called before forward");
    const index_t N = x_.dim(0), d = d_model(), H = heads(), G = kv_heads(), dh = head_dim(), W = qkv_width();
    expect_shape(name, "dy", dy, N, d);
    expect_shape(name, "dx", dx, N, d);
    if (validate_inputs) check_finite(name, "dy", dy, stream_);
    if (N == 0) return;
    const AttentionLayout at = layout();
    do_.resize({N, H * dh});
    delta_.resize({N, H});
    dqkv_.resize({N, W});
    // dO = dy·W_outᵀ (W_out [H·d_head, d] read transposed through strides), W_out.grad += oᵀ·dy.
    for_each_index(stream_, N * H * dh,
                   RowGemm<T, T, A>{dy.data, dy.stride, nullptr, Strided<T>{out_weight_.value.data(), 0, 1, d}, nullptr,
                                    nullptr, 0, nullptr, do_.data(), H * dh, d, H * dh, false});
    for_each_index(stream_, H * dh * d,
                   GroupedOuterSum<A, T, T>{o_.data(), H * dh, nullptr, dy.data, dy.stride, nullptr, N,
                                            out_weight_.grad.data(), H * dh, d});
    for_each_index(stream_, N * H, RowDelta<A>{at, do_.data(), o_.data(), delta_.data()});
    for_each_index(stream_, sequences_ * G * length_,
                   AttentionBackwardKeyRow<A>{at, qkv_.data(), do_.data(), lse_.data(), delta_.data(), dqkv_.data(),
                                              scale()});
    for_each_index(stream_, sequences_ * H * length_,
                   AttentionBackwardQueryRow<A>{at, qkv_.data(), do_.data(), lse_.data(), delta_.data(), dqkv_.data(),
                                                scale()});
    if (config_.rope) rotate(dqkv_.data(), true);
    // W_qkv.grad += xᵀ·dqkv, dx = dqkv·W_qkvᵀ.
    for_each_index(stream_, d * W,
                   GroupedOuterSum<T, A, T>{x_.data(), d, nullptr, dqkv_.data(), W, nullptr, N, qkv_weight_.grad.data(),
                                            d, W});
    for_each_index(stream_, N * d,
                   RowGemm<A, T, T>{dqkv_.data(), W, nullptr, Strided<T>{qkv_weight_.value.data(), 0, 1, W}, nullptr,
                                    nullptr, 0, nullptr, dx.data, dx.stride, W, d, false});
  }

 private:
  cuda_kernels::AttentionLayout layout() const {
    return {length_, heads(), kv_heads(), head_dim(), qkv_width()};
  }
  // As the CPU: 1/√d_head rounded to the working precision.
  A scale() const { return A(1.0 / std::sqrt(double(head_dim()))); }

  // RoPE (or its inverse) on the q and k heads of a [N, W] buffer, by the table of the last forward.
  void rotate(A* rows, bool back) {
    const index_t N = x_.dim(0), dh = head_dim(), heads_rotated = heads() + kv_heads();
    cuda_kernels::for_each_index(stream_, N * heads_rotated * (dh / 2),
                                 cuda_kernels::RopeRotate<A>{rows, rope_cos_.data(), rope_sin_.data(), length_,
                                                             qkv_width(), heads_rotated, dh, back});
  }

  cuda_stream stream_{};
  Parameter<T, cuda> qkv_weight_, out_weight_;
  index_t sequences_ = 0, length_ = 0;
  Tensor<T, cuda> x_;                    // forward cache: input (dense), then in A:
  Tensor<A, cuda> qkv_, o_, lse_;        // rotated q|k|v, attention output, log-sum-exp
  Tensor<A, cuda> rope_cos_, rope_sin_;  // [L, d_head/2] of the last forward's positions
  Tensor<A, cuda> do_, delta_, dqkv_;    // backward: dO, D = rowsum(dO ⊙ O), d(q|k|v)
};

}  // namespace smoe
