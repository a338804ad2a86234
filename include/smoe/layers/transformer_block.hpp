#pragma once
// TransformerBlock<Attention, FFN, Norm>: the pre-norm residual block of GPT-2 (Radford et al.
// 2019) and LLaMA (Touvron et al. 2023), with any feed-forward layer:
//
//   h = x + Attn(AttnNorm(x))           parameters "attn_norm.…", "attn.…"
//   y = h + FFN(FFNNorm(h))             parameters "ffn_norm.…",  "ffn.…"
//
// backward, with the layers' own backward passes (each writes its input gradient):
//   dh = dy + FFNNormᵀ(FFNᵀ(dy)),   dx = dh + AttnNormᵀ(Attnᵀ(dh))
//
// FFN is any FeedForward (layers/feed_forward.hpp): DenseMLP, the Top-K-activation MLP, any
// MoE<> (token-choice routers, product-key memory, experts over a shared pool) or a user's layer.
// Its aux loss is returned by forward; the training objective adds it with weight 1, and its
// gradient is inside FFN::backward (MoE<>'s convention), so the block's backward is complete.
// The FFN is visited through for_each_layer_parameter, so per-layer parameters of shared-pool
// experts (SaMoE's "combine") are named "ffn.combine".
//
// Memory: the block owns FFNNorm(h) [N, d], which MoE<> keeps as a view until backward (it does
// not copy its input), and h [N, d]; backward scratch is two [N, d] buffers. The layers keep
// their own caches, so the caller may reuse x's buffer between forward and backward.
// Attention is any type with d_model(), forward(x, y, sequences) and backward(dy, dx), such as
// CausalSelfAttention; Norm (RMSNorm by default, or LayerNorm) any type with d_model(),
// forward(x, y), backward(dy, dx) and a config() whose type has d_model (and eps).
#include <algorithm>
#include <cmath>
#include <string_view>
#include <type_traits>
#include <utility>

#include "smoe/core/buffer.hpp"
#include "smoe/core/parameter.hpp"
#include "smoe/core/tensor.hpp"
#include "smoe/core/validate.hpp"
#include "smoe/cpu/parallel.hpp"
#include "smoe/layers/accounting.hpp"
#include "smoe/layers/feed_forward.hpp"
#include "smoe/layers/layer_parameters.hpp"
#include "smoe/layers/rms_norm.hpp"
#include "smoe/layers/row_ops.hpp"
#include "smoe/layers/timing.hpp"

namespace smoe {

// Views in the part's own memory space (backend_of_t: smoe::cpu unless it says otherwise).
template <class A>
concept BlockAttention = requires(A& a, const A& ca, ConstMatrixView<typename A::scalar_type, backend_of_t<A>> x,
                                  MatrixView<typename A::scalar_type, backend_of_t<A>> y, index_t sequences) {
  { ca.d_model() } -> std::convertible_to<index_t>;
  a.forward(x, y, sequences);
  a.backward(x, y);
};

template <class N>
concept BlockNorm = requires(N& n, const N& cn, ConstMatrixView<typename N::scalar_type, backend_of_t<N>> x,
                             MatrixView<typename N::scalar_type, backend_of_t<N>> y) {
  { cn.d_model() } -> std::convertible_to<index_t>;
  n.forward(x, y);
  n.backward(x, y);
};

namespace detail {

// A norm over d features from its own config type, with eps when given (> 0).
template <BlockNorm Norm>
Norm make_norm(index_t d, double eps) {
  using Config = std::remove_cvref_t<decltype(std::declval<const Norm&>().config())>;
  Config c{};
  c.d_model = d;
  if constexpr (requires { c.eps; })
    if (eps > 0) c.eps = eps;
  return Norm(c);
}

inline void check_norm_eps(const char* context, double eps) {
  if (!(eps >= 0) || !std::isfinite(eps))
    fail(context, ": norm_eps must be finite and >= 0 (0: the norm's default), got ", eps);
}

template <class C>
void set_validate_inputs(C& c, bool on) {
  if constexpr (requires { c.validate_inputs = on; }) c.validate_inputs = on;
}

}  // namespace detail

// The parts of a block: one scalar type (and one backend, checked by the block).
template <class Attention, class FFN, class Norm>
concept BlockParts = BlockAttention<Attention> && FeedForward<FFN> && BlockNorm<Norm> &&
                     std::is_same_v<typename Attention::scalar_type, typename FFN::scalar_type> &&
                     std::is_same_v<typename Norm::scalar_type, typename FFN::scalar_type>;

// On the CPU or the device: the parts' backend (one for all three). A block of smoe::cuda parts runs
// on the FFN's stream (set_stream sets every part's), its row additions from cuda/row_ops.cuh.
template <class Attention, class FFN, class Norm = RMSNorm<typename FFN::scalar_type>>
  requires BlockParts<Attention, FFN, Norm>
class TransformerBlock {
 public:
  using scalar_type = typename FFN::scalar_type;
  using T = scalar_type;
  using backend = backend_of_t<FFN>;
  static_assert(std::is_same_v<backend_of_t<Attention>, backend> && std::is_same_v<backend_of_t<Norm>, backend>,
                "TransformerBlock: the attention, FFN and norms must have one backend (smoe::cpu or smoe::cuda)");
  using ConstView = ConstMatrixView<T, backend>;
  using View = MatrixView<T, backend>;
  using attention_type = Attention;
  using ffn_type = FFN;
  using norm_type = Norm;
  static constexpr const char* name = "TransformerBlock";

  // Norms over attention.d_model() with eps `norm_eps` (0: the norm type's default).
  TransformerBlock(Attention attention, FFN ffn, double norm_eps = 0)
      : attn_norm_(detail::make_norm<Norm>(attention.d_model(), (detail::check_norm_eps(name, norm_eps), norm_eps))),
        attn_(std::move(attention)),
        ffn_norm_(detail::make_norm<Norm>(ffn.d_model(), norm_eps)),
        ffn_(std::move(ffn)) {
    check_widths();
  }
  TransformerBlock(Norm attn_norm, Attention attention, Norm ffn_norm, FFN ffn)
      : attn_norm_(std::move(attn_norm)), attn_(std::move(attention)), ffn_norm_(std::move(ffn_norm)),
        ffn_(std::move(ffn)) {
    check_widths();
  }

  index_t d_model() const { return attn_.d_model(); }
  Norm& attn_norm() { return attn_norm_; }
  Attention& attention() { return attn_; }
  Norm& ffn_norm() { return ffn_norm_; }
  FFN& ffn() { return ffn_; }
  const Norm& attn_norm() const { return attn_norm_; }
  const Attention& attention() const { return attn_; }
  const Norm& ffn_norm() const { return ffn_norm_; }
  const FFN& ffn() const { return ffn_; }

  template <class F>
  void for_each_parameter(F&& f) {
    if constexpr (HasParameters<Norm>) attn_norm_.for_each_parameter(with_prefix("attn_norm.", f));
    if constexpr (HasParameters<Attention>) attn_.for_each_parameter(with_prefix("attn.", f));
    if constexpr (HasParameters<Norm>) ffn_norm_.for_each_parameter(with_prefix("ffn_norm.", f));
    if constexpr (HasParameters<FFN>) for_each_layer_parameter(ffn_, with_prefix("ffn.", f));
  }
  // A distributed FFN's parameters (an ExpertParallel layer's experts) keep its sharding
  // (core/parameter.hpp); the rest are replicated.
  GradientSharding sharding(std::string_view parameter_name) const
    requires requires(const FFN& f) { f.sharding(parameter_name); }
  {
    if (!parameter_name.starts_with("ffn.")) return GradientSharding::replicated;
    return ffn_.sharding(parameter_name.substr(4));
  }
  // Non-trained state of the parts (core/buffer.hpp), e.g. "ffn.router.bias".
  template <class F>
  void for_each_buffer(F&& f) {
    for_each_buffer_of(attn_norm_, with_prefix("attn_norm.", f));
    for_each_buffer_of(attn_, with_prefix("attn.", f));
    for_each_buffer_of(ffn_norm_, with_prefix("ffn_norm.", f));
    for_each_buffer_of(ffn_, with_prefix("ffn.", f));
  }
  // Step counters of stochastic parts, e.g. "ffn.router.step".
  template <class F>
  void for_each_counter(F&& f) {
    for_each_counter_of(attn_, with_prefix("attn.", f));
    for_each_counter_of(ffn_, with_prefix("ffn.", f));
  }

  // Accounting (layers/accounting.hpp conventions): norms + attention + FFN.
  index_t total_parameters() const {
    return smoe::total_parameters(attn_norm_) + smoe::total_parameters(attn_) + smoe::total_parameters(ffn_norm_) +
           smoe::total_parameters(ffn_);
  }
  double active_parameters_per_token() const {
    return smoe::active_parameters_per_token(attn_norm_) + smoe::active_parameters_per_token(attn_) +
           smoe::active_parameters_per_token(ffn_norm_) + smoe::active_parameters_per_token(ffn_);
  }
  // Projections and FFN only; flops_per_token(context) adds attention's score and value products.
  double flops_per_token() const { return smoe::flops_per_token(attn_) + smoe::flops_per_token(ffn_); }
  double flops_per_token(index_t context) const {
    if constexpr (requires { attn_.flops_per_token(context); })
      return double(attn_.flops_per_token(context)) + smoe::flops_per_token(ffn_);
    else
      return flops_per_token();
  }
  // Per-forward FLOPs that do not scale with the tokens (SaMoE's weight-space materialization).
  double materialization_flops() const { return smoe::materialization_flops(ffn_); }

  // Sets validate_inputs (NaN/Inf scans) of every part that has it.
  void set_validate_inputs(bool on) {
    detail::set_validate_inputs(attn_norm_, on);
    detail::set_validate_inputs(attn_, on);
    detail::set_validate_inputs(ffn_norm_, on);
    detail::set_validate_inputs(ffn_, on);
  }

  // Where forward and backward add their wall times (null: off, the default). A FFN with
  // set_times(MoETimes*) gets &times->moe.
  void set_times(BlockTimes* times) {
    times_ = times;
    if constexpr (requires(MoETimes* m) { ffn_.set_times(m); }) ffn_.set_times(times ? &times->moe : nullptr);
  }
  BlockTimes* times() const { return times_; }

  // The stream of a block of device parts (the FFN's); set_stream moves every part onto `s`.
  auto stream() const { return detail::stream_of(ffn_); }
  template <class Stream>
  void set_stream(Stream s)
    requires requires(FFN& f, Stream st) { f.set_stream(st); }
  {
    for (auto* n : {&attn_norm_, &ffn_norm_})
      if constexpr (requires { n->set_stream(s); }) n->set_stream(s);
    if constexpr (requires { attn_.set_stream(s); }) attn_.set_stream(s);
    ffn_.set_stream(s);
  }

  // x, y [B·L, d], B = sequences (each causal on its own); y may not be x's memory. A block of
  // device parts reports no aux loss here (its FFN keeps it on the device: ffn().read_losses()).
  FeedForwardOutput<T> forward(ConstView x, View y, index_t sequences, Mode mode = Mode::eval) {
    const index_t N = x.rows, d = d_model();
    expect_shape(name, "x", x, N, d);
    expect_shape(name, "y", y, N, d);
    if (sequences < 1) fail(name, ": sequences must be >= 1, got ", sequences);
    if (N % sequences != 0) fail(name, ": x rows (B·L) must be a multiple of sequences = ", sequences, ", got ", N);
    if (N > 0 && static_cast<const void*>(x.data) == static_cast<const void*>(y.data))
      fail(name, ": y must not be the memory of x (forward reads x after writing y)");
    follow_stream();
    a_.resize({N, d});
    h_.resize({N, d});
    b_.resize({N, d});
    has_forward_ = true;
    {
      ScopedTimer timer(slot(&BlockTimes::norms_forward));
      attn_norm_.forward(x, a_.matrix());
    }
    {
      ScopedTimer timer(slot(&BlockTimes::attention_forward));
      attn_.forward(std::as_const(a_).matrix(), y, sequences);
    }
    {
      ScopedTimer timer(slot(&BlockTimes::norms_forward));
      RowOps<backend>::add(x, ConstView(y), h_.matrix(), stream());
      ffn_norm_.forward(std::as_const(h_).matrix(), b_.matrix());
    }
    FeedForwardOutput<T> out;
    {
      ScopedTimer timer(slot(&BlockTimes::ffn_forward));
      out = feed_forward(ffn_, std::as_const(b_).matrix(), y, mode);  // the FFN may keep a view of b_
    }
    {
      ScopedTimer timer(slot(&BlockTimes::norms_forward));
      RowOps<backend>::add(ConstView(y), std::as_const(h_).matrix(), y, stream());
    }
    return out;
  }

  // Inference with a KV cache (Attention::forward_cached): y = block(x) for the n new tokens of each
  // of the cache's sequences, x and y [B·n, d]. Not differentiable: backward() afterwards is refused.
  template <class Cache>
    requires requires(Attention& a, ConstView x, View y, const Cache& c) { a.forward_cached(x, y, c); }
  FeedForwardOutput<T> forward_cached(ConstView x, View y, const Cache& cache) {
    const index_t N = x.rows, d = d_model();
    expect_shape(name, "x", x, N, d);
    expect_shape(name, "y", y, N, d);
    if (N > 0 && static_cast<const void*>(x.data) == static_cast<const void*>(y.data))
      fail(name, ": y must not be the memory of x (forward reads x after writing y)");
    a_.resize({N, d});
    h_.resize({N, d});
    b_.resize({N, d});
    has_forward_ = false;
    attn_norm_.forward(x, a_.matrix());
    attn_.forward_cached(std::as_const(a_).matrix(), y, cache);
    RowOps<backend>::add(x, ConstView(y), h_.matrix(), stream());
    ffn_norm_.forward(std::as_const(h_).matrix(), b_.matrix());
    const FeedForwardOutput<T> out = feed_forward(ffn_, std::as_const(b_).matrix(), y, Mode::eval);
    RowOps<backend>::add(ConstView(y), std::as_const(h_).matrix(), y, stream());
    return out;
  }

  // dy, dx [B·L, d] of the last forward; dx may be dy's memory. Accumulates every parameter's
  // gradient, the FFN's aux-loss gradient included.
  void backward(ConstView dy, View dx) {
    if (!has_forward_) fail(name, ": backward called before forward");
    const index_t N = h_.dim(0), d = d_model();
    expect_shape(name, "dy", dy, N, d);
    expect_shape(name, "dx", dx, N, d);
    follow_stream();
    g_.resize({N, d});
    dh_.resize({N, d});
    {
      ScopedTimer timer(slot(&BlockTimes::ffn_backward));
      ffn_.backward(dy, g_.matrix());
    }
    {
      ScopedTimer timer(slot(&BlockTimes::norms_backward));
      ffn_norm_.backward(std::as_const(g_).matrix(), dh_.matrix());
      RowOps<backend>::add(std::as_const(dh_).matrix(), dy, dh_.matrix(), stream());
    }
    {
      ScopedTimer timer(slot(&BlockTimes::attention_backward));
      attn_.backward(std::as_const(dh_).matrix(), g_.matrix());
    }
    {
      ScopedTimer timer(slot(&BlockTimes::norms_backward));
      attn_norm_.backward(std::as_const(g_).matrix(), dx);
      RowOps<backend>::add(ConstView(dx), std::as_const(dh_).matrix(), dx, stream());
    }
  }

 private:
  void check_widths() const {
    const index_t d = attn_.d_model();
    expect_equal(name, "ffn.d_model() (= attention.d_model())", d, ffn_.d_model());
    expect_equal(name, "attn_norm.d_model() (= attention.d_model())", d, attn_norm_.d_model());
    expect_equal(name, "ffn_norm.d_model() (= attention.d_model())", d, ffn_norm_.d_model());
  }
  double* slot(double BlockTimes::*part) const { return times_ ? &(times_->*part) : nullptr; }
  // Device buffers allocate on the block's stream (no-op on the CPU).
  void follow_stream() {
    if constexpr (requires { a_.set_stream(stream()); })
      for (auto* t : {&a_, &h_, &b_, &g_, &dh_}) t->set_stream(stream());
  }

  Norm attn_norm_;
  Attention attn_;
  Norm ffn_norm_;
  FFN ffn_;
  bool has_forward_ = false;
  Tensor<T, backend> a_, h_, b_;  // forward: AttnNorm(x), h, FFNNorm(h) (the FFN's input, kept for backward)
  Tensor<T, backend> g_, dh_;     // backward scratch
  BlockTimes* times_ = nullptr;
};

}  // namespace smoe
