#pragma once
// Model<Block, Shared>: a decoder-only language model over any transformer block,
//
//   ids → Embedding          "embed.weight" [V, d]
//       → L blocks           "blocks.{l}.…" (TransformerBlock: attn_norm., attn., ffn_norm., ffn.)
//       → final norm         "final_norm.…" (the blocks' norm type, RMSNorm by default)
//       → OutputProjection   "head.weight" [V, d]; absent when tied to the embedding
//       → softmax cross-entropy (mean over counted targets, nats)
//
// forward returns the loss, the sum of the blocks' aux losses (MoE layers: coefficients inside)
// and every routing layer's RoutingStats; backward differentiates objective = loss + aux_loss
// (the aux-loss gradients come from the MoE layers' own backward).
//
// Shared state. Shared (default NoShared, nothing) is an object that several blocks use, e.g. an
// expert pool (ExpertPool for SaMoE, a FeedForwardExperts set tied across layers): the model
// constructs it first and owns it, gives it to the block factory, `make_block(l, shared)` (or
// `make_block(shared, l)`, MoEStack's order), so the layers' experts can hold a reference to it,
// and visits its parameters, buffers and counters once, under Shared::parameter_prefix when it
// has one ("pool." for ExpertPool), "experts." for a tied FeedForwardExperts set, else "shared.".
// Accounting counts its parameters once (the layers report its per-token use). A model is neither
// copyable nor movable, so those references and the tied head's stay valid; construct it in place
// (or in a std::unique_ptr to hand it around).
//
// Buffers: two [N, d] activations (reused for the gradients) and the logits [N, V], which the loss
// backward overwrites with their gradient in place. Timing (layers/timing.hpp) is off by default;
// set_timing(true) makes every forward and backward add its parts' wall time to times().
#include <algorithm>
#include <charconv>
#include <concepts>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "smoe/core/buffer.hpp"
#include "smoe/core/parameter.hpp"
#include "smoe/core/tensor.hpp"
#include "smoe/layers/accounting.hpp"
#include "smoe/layers/cross_entropy.hpp"
#include "smoe/layers/embedding.hpp"
#include "smoe/layers/kv_cache.hpp"
#include "smoe/layers/output_projection.hpp"
#include "smoe/layers/rms_norm.hpp"
#include "smoe/layers/routing_stats.hpp"
#include "smoe/layers/row_ops.hpp"
#include "smoe/layers/timing.hpp"
#include "smoe/layers/transformer_block.hpp"

namespace smoe {

// No shared object: the default of Model's second parameter.
struct NoShared {};

struct ModelConfig {
  index_t vocab = 0;                 // V
  index_t d_model = 0;
  index_t layers = 1;                // L (0 is allowed: embedding → head)
  bool tie_embeddings = false;       // head.weight is embed.weight (Press & Wolf 2017)
  double norm_eps = 0;               // the final norm's eps; 0: the norm type's default
  std::int64_t ignore_index = -100;  // targets equal to it do not count in the loss

  void validate(const char* context) const {
    if (vocab < 1) fail(context, ": vocab must be >= 1, got ", vocab);
    if (d_model < 1) fail(context, ": d_model must be >= 1, got ", d_model);
    if (layers < 0) fail(context, ": layers must be >= 0, got ", layers);
    detail::check_norm_eps(context, norm_eps);
  }
};

// Which rows Model::forward_cached computes logits for.
enum class CachedLogits {
  all,  // every new token: [B·n, V]
  last  // each sequence's last new token: [B, V] (generation)
};

// The routing statistics of block `layer`'s feed-forward layer.
struct LayerRoutingStats {
  index_t layer = 0;
  RoutingStats stats;
};

struct ModelOutput {
  double loss = 0;      // mean cross-entropy over the counted targets (nats); 0 without targets
  double aux_loss = 0;  // Σ over blocks of their aux losses (coefficients included)
  index_t counted = 0;  // targets that counted (not ignore_index)
  std::vector<LayerRoutingStats> routing;  // one per block whose FFN routes, in layer order
  // What backward differentiates.
  double objective() const { return loss + aux_loss; }
};

template <class B>
concept ModelBlock = requires(B& b, const B& cb, ConstMatrixView<typename B::scalar_type, backend_of_t<B>> x,
                              MatrixView<typename B::scalar_type, backend_of_t<B>> y, index_t sequences, Mode mode) {
  { cb.d_model() } -> std::convertible_to<index_t>;
  b.forward(x, y, sequences, mode);
  b.backward(x, y);
};

namespace detail {
template <class B>
struct block_norm {
  using type = RMSNorm<typename B::scalar_type, backend_of_t<B>>;
};
template <class B>
  requires requires { typename B::norm_type; }
struct block_norm<B> {
  using type = typename B::norm_type;
};

// Shared::parameter_prefix, "experts." for a tied FeedForwardExperts set (as MoEStack), else "shared.".
template <class S>
std::string shared_prefix() {
  if constexpr (requires { S::parameter_prefix; })
    return std::string(S::parameter_prefix);
  else if constexpr (is_feed_forward_experts<S>::value)
    return "experts.";
  else
    return "shared.";
}
}  // namespace detail

// On the CPU or the device (the blocks' backend). A model of smoe::cuda blocks takes the same host
// ids and targets, copies them to the device, and reads the loss and the blocks' aux losses back
// at the end of forward (one wait per step); it reports no routing statistics from forward (each
// block's block.ffn().routing_stats() does, on request).
template <ModelBlock Block, class Shared = NoShared>
class Model {
 public:
  using scalar_type = typename Block::scalar_type;
  using T = scalar_type;
  using backend = backend_of_t<Block>;
  static constexpr bool on_device = !std::is_same_v<backend, cpu>;
  using block_type = Block;
  using shared_type = Shared;
  using norm_type = typename detail::block_norm<Block>::type;
  static constexpr const char* name = "Model";

  // Blocks from make_block(l, shared()), make_block(shared(), l) or make_block(l), l = 0 … L−1, in
  // order; Shared default-constructed.
  template <class Factory>
    requires std::is_default_constructible_v<Shared>
  Model(ModelConfig config, Factory&& make_block) : Model(config, Shared{}, std::forward<Factory>(make_block)) {}

  // The model owns `shared` (moved in before any block is built).
  template <class Factory>
  Model(ModelConfig config, Shared shared, Factory&& make_block)
      : config_((config.validate(name), config)),
        shared_(std::move(shared)),
        embed_({.vocab = config.vocab, .d_model = config.d_model}),
        final_norm_(detail::make_norm<norm_type>(config.d_model, config.norm_eps)),
        head_(config.tie_embeddings
                  ? OutputProjection<T, backend>({.vocab = config.vocab, .d_model = config.d_model}, embed_.weight())
                  : OutputProjection<T, backend>({.vocab = config.vocab, .d_model = config.d_model})),
        loss_({.ignore_index = config.ignore_index}) {
    blocks_.reserve(static_cast<std::size_t>(config.layers));
    for (index_t l = 0; l < config.layers; ++l) {
      if constexpr (std::is_invocable_v<Factory&, index_t, Shared&>) {
        blocks_.emplace_back(make_block(l, shared_));
      } else if constexpr (std::is_invocable_v<Factory&, Shared&, index_t>) {
        blocks_.emplace_back(make_block(shared_, l));
      } else {
        static_assert(std::is_invocable_v<Factory&, index_t>,
                      "Model: make_block must be callable as make_block(layer, shared), make_block(shared, layer) "
                      "or make_block(layer)");
        blocks_.emplace_back(make_block(l));
      }
      if (blocks_.back().d_model() != config.d_model)
        fail(name, ": block ", l, " has d_model ", blocks_.back().d_model(), ", config.d_model is ", config.d_model);
    }
    times_.blocks.resize(blocks_.size());
  }

  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return config_; }
  index_t vocab() const { return config_.vocab; }
  index_t d_model() const { return config_.d_model; }
  index_t layers() const { return static_cast<index_t>(blocks_.size()); }
  bool tied() const { return head_.tied(); }

  Shared& shared() { return shared_; }
  Embedding<T, backend>& embedding() { return embed_; }
  Block& block(index_t l) {
    if (l < 0 || l >= layers()) fail(name, ": block index must be in [0, ", layers(), "), got ", l);
    return blocks_[static_cast<std::size_t>(l)];
  }
  std::span<Block> blocks() { return blocks_; }
  norm_type& final_norm() { return final_norm_; }
  OutputProjection<T, backend>& head() { return head_; }
  SoftmaxCrossEntropy<T, backend>& loss_function() { return loss_; }
  // Logits [N, V] of the last forward; backward overwrites them with their gradient.
  ConstMatrixView<T, backend> logits() const { return logits_.matrix(); }

  // "embed.weight", the shared object's (under its prefix), "blocks.{l}.…", "final_norm.…",
  // "head.weight" (untied only).
  template <class F>
  void for_each_parameter(F&& f) {
    embed_.for_each_parameter(with_prefix("embed.", f));
    if constexpr (HasParameters<Shared>) shared_.for_each_parameter(with_prefix(detail::shared_prefix<Shared>(), f));
    for (std::size_t l = 0; l < blocks_.size(); ++l)
      blocks_[l].for_each_parameter(with_prefix(block_prefix(l), f));
    final_norm_.for_each_parameter(with_prefix("final_norm.", f));
    head_.for_each_parameter(with_prefix("head.", f));
  }
  // The blocks' sharding of their parameters (an expert-parallel FFN's experts, core/parameter.hpp);
  // the rest are replicated.
  GradientSharding sharding(std::string_view parameter_name) const
    requires requires(const Block& b) { b.sharding(parameter_name); }
  {
    std::string_view rest = parameter_name;
    if (!rest.starts_with("blocks.")) return GradientSharding::replicated;
    rest.remove_prefix(7);
    const std::size_t dot = rest.find('.');
    std::size_t l = 0;
    const auto r = std::from_chars(rest.data(), rest.data() + std::min(dot, rest.size()), l);
    if (dot == std::string_view::npos || r.ptr != rest.data() + dot || l >= blocks_.size())
      return GradientSharding::replicated;
    return blocks_[l].sharding(rest.substr(dot + 1));
  }
  // Buffers (core/buffer.hpp) of the shared object and the blocks, e.g. "blocks.0.ffn.router.bias".
  template <class F>
  void for_each_buffer(F&& f) {
    for_each_buffer_of(shared_, with_prefix(detail::shared_prefix<Shared>(), f));
    for (std::size_t l = 0; l < blocks_.size(); ++l) for_each_buffer_of(blocks_[l], with_prefix(block_prefix(l), f));
  }
  // Step counters of stochastic routers, e.g. "blocks.0.ffn.router.step" (name, std::uint64_t&):
  // a checkpoint saves them, and set them to resume the same random sequence.
  template <class F>
  void for_each_counter(F&& f) {
    for_each_counter_of(shared_, with_prefix(detail::shared_prefix<Shared>(), f));
    for (std::size_t l = 0; l < blocks_.size(); ++l) for_each_counter_of(blocks_[l], with_prefix(block_prefix(l), f));
  }

  // Accounting (layers/accounting.hpp conventions), shared parameters counted once.
  index_t total_parameters() const {
    index_t n = smoe::total_parameters(embed_) + smoe::total_parameters(shared_) +
                smoe::total_parameters(final_norm_) + smoe::total_parameters(head_);
    for (const Block& b : blocks_) n += smoe::total_parameters(b);
    return n;
  }
  double active_parameters_per_token() const {
    double n = smoe::active_parameters_per_token(embed_) + smoe::active_parameters_per_token(final_norm_) +
               smoe::active_parameters_per_token(head_);
    for (const Block& b : blocks_) n += smoe::active_parameters_per_token(b);
    return n;
  }
  // Forward FLOPs per token of a sequence of `context` tokens (attention's causal products
  // included), matrix products only.
  double flops_per_token(index_t context) const {
    if (context < 1) fail(name, ": context must be >= 1, got ", context);
    double n = smoe::flops_per_token(head_);
    for (const Block& b : blocks_) {
      if constexpr (requires(const Block& cb) { cb.flops_per_token(context); })
        n += double(b.flops_per_token(context));
      else
        n += smoe::flops_per_token(b);
    }
    return n;
  }
  // Per-forward FLOPs that do not scale with the tokens (SaMoE's weight-space materialization).
  double materialization_flops() const {
    double n = 0;
    for (const Block& b : blocks_) n += smoe::materialization_flops(b);
    return n;
  }

  // Sets validate_inputs (NaN/Inf scans) of every part that has it.
  void set_validate_inputs(bool on) {
    detail::set_validate_inputs(embed_, on);
    if constexpr (requires(Block& b) { b.set_validate_inputs(on); })
      for (Block& b : blocks_) b.set_validate_inputs(on);
    detail::set_validate_inputs(final_norm_, on);
    detail::set_validate_inputs(head_, on);
    detail::set_validate_inputs(loss_, on);
  }

  // Per-layer timing, off by default. While on, forward and backward add their parts' wall time
  // to times() (and times().steps counts the forwards) until reset_times().
  void set_timing(bool on) {
    timing_ = on;
    for (std::size_t l = 0; l < blocks_.size(); ++l) {
      if constexpr (requires(Block& b, BlockTimes* t) { b.set_times(t); })
        blocks_[l].set_times(on ? &times_.blocks[l] : nullptr);
    }
  }
  bool timing() const { return timing_; }
  const ModelTimes& times() const { return times_; }
  void reset_times() { times_.reset(); }

  // ids, targets [N] (N = B·L >= 1, B = sequences, sequence-major); ids in [0, V), targets in
  // [0, V) or ignore_index. Everything is checked before anything is modified.
  ModelOutput forward(std::span<const std::int32_t> ids, std::span<const std::int32_t> targets, index_t sequences,
                      Mode mode = Mode::eval) {
    return forward_impl(ids, &targets, sequences, mode);
  }
  ModelOutput forward(std::span<const std::int64_t> ids, std::span<const std::int64_t> targets, index_t sequences,
                      Mode mode = Mode::eval) {
    return forward_impl(ids, &targets, sequences, mode);
  }
  // Logits only (logits()), e.g. for evaluation or sampling; loss and counted are 0, and backward
  // is refused until a forward with targets.
  ModelOutput forward_logits(std::span<const std::int32_t> ids, index_t sequences, Mode mode = Mode::eval) {
    return forward_impl<std::int32_t, std::int32_t>(ids, nullptr, sequences, mode);
  }
  ModelOutput forward_logits(std::span<const std::int64_t> ids, index_t sequences, Mode mode = Mode::eval) {
    return forward_impl<std::int64_t, std::int64_t>(ids, nullptr, sequences, mode);
  }

  // Inference with a KV cache (make_kv_cache): ids [B·n] hold n new tokens of each of the cache's B
  // sequences (sequence-major) at the cache's next positions; every block runs on them alone and the
  // cache advances by n. Prefill is one call with the prompts, a decode step one call with one token
  // per sequence. logits() equals forward_logits() on the whole sequences at those rows. CPU models;
  // not differentiable (backward() afterwards is refused).
  ModelOutput forward_cached(std::span<const std::int32_t> ids, KVCache<T>& cache,
                             CachedLogits which = CachedLogits::all)
    requires(!on_device)
  {
    return forward_cached_impl(ids, cache, which);
  }
  ModelOutput forward_cached(std::span<const std::int64_t> ids, KVCache<T>& cache,
                             CachedLogits which = CachedLogits::all)
    requires(!on_device)
  {
    return forward_cached_impl(ids, cache, which);
  }
  // An empty cache for `sequences` sequences of up to `capacity` positions each (prompt + new tokens).
  KVCache<T> make_kv_cache(index_t sequences, index_t capacity) const
    requires(!on_device)
  {
    const bool any = !blocks_.empty();
    return KVCache<T>({.layers = layers(),
                       .sequences = sequences,
                       .kv_heads = any ? blocks_[0].attention().kv_heads() : 1,
                       .head_dim = any ? blocks_[0].attention().head_dim() : 1,
                       .capacity = capacity});
  }

  // Accumulates the gradient of the last forward's loss_scale · loss + aux_loss into every
  // parameter's grad (call zero_grad(model) first): objective() by default. One backward per
  // forward with targets. A loss_scale other than 1 weights this batch's mean in a larger mean:
  // N_local / N_global when ranks split one batch (expert parallelism), or 1/M for M micro-batches.
  void backward(double loss_scale = 1.0) {
    if (!has_targets_) fail(name, ": backward needs a forward with targets first (one backward per forward)");
    has_targets_ = false;
    MatrixView<T, backend> g0 = act_[0].matrix(), g1 = act_[1].matrix();
    {
      ScopedTimer timer(slot(&ModelTimes::loss_backward));
      loss_.backward(std::as_const(logits_).matrix(), logits_.matrix(), loss_scale);  // in place
    }
    {
      ScopedTimer timer(slot(&ModelTimes::head_backward));
      head_.backward(std::as_const(logits_).matrix(), g0);
    }
    {
      ScopedTimer timer(slot(&ModelTimes::final_norm_backward));
      final_norm_.backward(ConstMatrixView<T, backend>(g0), g1);
    }
    for (std::size_t l = blocks_.size(); l-- > 0;) blocks_[l].backward(ConstMatrixView<T, backend>(g1), g1);
    {
      ScopedTimer timer(slot(&ModelTimes::embedding_backward));
      embed_.backward(ConstMatrixView<T, backend>(g1));
    }
  }

 private:
  static std::string block_prefix(std::size_t l) { return "blocks." + std::to_string(l) + "."; }
  double* slot(double ModelTimes::*part) { return timing_ ? &(times_.*part) : nullptr; }

  template <class Id>
  void check_ids(std::span<const Id> ids, index_t sequences) const {
    const index_t N = static_cast<index_t>(ids.size()), V = vocab();
    if (N < 1) fail(name, ": ids must not be empty");
    if (sequences < 1) fail(name, ": sequences must be >= 1, got ", sequences);
    if (N % sequences != 0) fail(name, ": ids size (B·L) must be a multiple of sequences = ", sequences, ", got ", N);
    for (index_t t = 0; t < N; ++t)
      if (ids[t] < 0 || ids[t] >= V) fail(name, ": ids[", t, "] must be in [0, ", V, "), got ", ids[t]);
  }

  template <class Id>
  ModelOutput forward_cached_impl(std::span<const Id> ids, KVCache<T>& cache, CachedLogits which) {
    const index_t N = static_cast<index_t>(ids.size()), B = cache.sequences(), d = d_model();
    expect_equal(name, "KV cache layers", layers(), cache.config().layers);
    check_ids(ids, B);
    const index_t n = N / B;
    cache.check_room(n);
    has_targets_ = false;
    for (Tensor<T, backend>& a : act_) a.resize({N, d});
    embed_.forward(ids, act_[0].matrix());
    ModelOutput out;
    int cur = 0;
    for (std::size_t l = 0; l < blocks_.size(); ++l) {
      auto r = blocks_[l].forward_cached(std::as_const(act_[cur]).matrix(), act_[1 - cur].matrix(),
                                         cache.layer(index_t(l), n));
      collect(r, index_t(l), out);
      cur = 1 - cur;
    }
    cache.advance(n);
    final_norm_.forward(std::as_const(act_[cur]).matrix(), act_[1 - cur].matrix());
    const Tensor<T, backend>* normed = &act_[1 - cur];
    if (which == CachedLogits::last) {
      act_[cur].resize({B, d});
      for (index_t b = 0; b < B; ++b) std::copy_n(normed->data() + (b * n + n - 1) * d, d, act_[cur].data() + b * d);
      normed = &act_[cur];
    }
    logits_.resize({normed->dim(0), vocab()});
    head_.forward(normed->matrix(), logits_.matrix());
    return out;
  }

  template <class Id, class Target>
  ModelOutput forward_impl(std::span<const Id> ids, const std::span<const Target>* targets, index_t sequences,
                           Mode mode) {
    const index_t N = static_cast<index_t>(ids.size()), V = vocab(), d = d_model();
    check_ids(ids, sequences);
    if (targets) {
      if (static_cast<index_t>(targets->size()) != N)
        fail(name, ": targets must have ", N, " entries (one per id), got ", targets->size());
      for (index_t t = 0; t < N; ++t) {
        const std::int64_t y = (*targets)[t];
        if (y != config_.ignore_index && (y < 0 || y >= V))
          fail(name, ": targets[", t, "] must be in [0, ", V, ") or ignore_index = ", config_.ignore_index, ", got ", y);
      }
    }
    has_targets_ = false;
    if (timing_) ++times_.steps;
    for (Tensor<T, backend>& a : act_) a.resize({N, d});
    logits_.resize({N, V});
    ModelOutput out;
    {
      ScopedTimer timer(slot(&ModelTimes::embedding_forward));
      if constexpr (on_device) {
        Upload<backend>::copy(ids, device_ids<Id>(), detail::stream_of(embed_));
        embed_.forward(device_ids<Id>(), act_[0].matrix());
      } else {
        embed_.forward(ids, act_[0].matrix());
      }
    }
    int cur = 0;
    for (std::size_t l = 0; l < blocks_.size(); ++l) {
      auto r = blocks_[l].forward(std::as_const(act_[cur]).matrix(), act_[1 - cur].matrix(), sequences, mode);
      collect(r, index_t(l), out);
      if constexpr (on_device && requires(Block& b) { b.ffn().read_losses(); })
        out.aux_loss += double(blocks_[l].ffn().read_losses().aux_loss);  // waits for the stream
      cur = 1 - cur;
    }
    {
      ScopedTimer timer(slot(&ModelTimes::final_norm_forward));
      final_norm_.forward(std::as_const(act_[cur]).matrix(), act_[1 - cur].matrix());
    }
    {
      ScopedTimer timer(slot(&ModelTimes::head_forward));
      head_.forward(std::as_const(act_[1 - cur]).matrix(), logits_.matrix());
    }
    if (targets) {
      ScopedTimer timer(slot(&ModelTimes::loss_forward));
      if constexpr (on_device) {
        Upload<backend>::copy(*targets, device_targets<Target>(), detail::stream_of(embed_));
        loss_.forward(std::as_const(logits_).matrix(), device_targets<Target>());
        out.loss = double(loss_.read_loss());  // waits for the stream
        out.counted = loss_.read_counted();
      } else {
        out.loss = double(loss_.forward(std::as_const(logits_).matrix(), *targets));
        out.counted = loss_.counted();
      }
      has_targets_ = true;
    }
    return out;
  }

  // Adds a block's aux loss and routing statistics, whichever it reports.
  template <class R>
  static void collect(R& r, index_t layer, ModelOutput& out) {
    if constexpr (requires { r.aux_loss; }) out.aux_loss += double(r.aux_loss);
    if constexpr (requires { r.stats.has_value(); }) {
      if (r.stats) out.routing.push_back({layer, std::move(*r.stats)});
    } else if constexpr (requires { r.stats; } && std::is_convertible_v<decltype(r.stats), RoutingStats>) {
      out.routing.push_back({layer, std::move(r.stats)});
    }
  }

  // A device model's copies of the ids and targets, by id type.
  template <class Id>
  Tensor<Id, backend>& device_ids() {
    if constexpr (std::is_same_v<Id, std::int32_t>)
      return ids32_;
    else
      return ids64_;
  }
  template <class Id>
  Tensor<Id, backend>& device_targets() {
    if constexpr (std::is_same_v<Id, std::int32_t>)
      return targets32_;
    else
      return targets64_;
  }

  ModelConfig config_;
  Shared shared_;  // constructed before the blocks that refer to it, destroyed after them
  Embedding<T, backend> embed_;
  std::vector<Block> blocks_;
  norm_type final_norm_;
  OutputProjection<T, backend> head_;
  SoftmaxCrossEntropy<T, backend> loss_;
  Tensor<T, backend> act_[2];  // forward activations, reused as backward gradients
  Tensor<T, backend> logits_;
  Tensor<std::int32_t, backend> ids32_, targets32_;  // device model only
  Tensor<std::int64_t, backend> ids64_, targets64_;
  bool has_targets_ = false;
  bool timing_ = false;
  ModelTimes times_;
};

}  // namespace smoe
