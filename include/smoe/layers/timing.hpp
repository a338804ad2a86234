#pragma once
// Per-layer wall-clock timing of training steps, so users see where a step's time goes:
// embedding, per block the norms, attention and feed-forward layer (and, for MoE layers that
// report them, router, dispatch, experts, combine and aux losses), the final norm, the head and
// the loss, forward and backward.
//
// Opt-in and free when off: every timed section is a ScopedTimer over a `double*` that is null
// when timing is off, so the clock is never read. Times accumulate (seconds) until reset(); a
// Model fills a ModelTimes (Model::set_timing) and its blocks their BlockTimes. print_times writes
// a table, write_times_csv one tidy row (step, layer, part, seconds) per part for training logs.
//
// The MoE parts (MoETimes) are inside ffn_forward / ffn_backward, not in addition to them: a
// feed-forward layer that provides set_times(MoETimes*) fills them, others leave them 0.
#include <chrono>
#include <cstdint>
#include <iomanip>
#include <ostream>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "smoe/core/config.hpp"

namespace smoe {

// Adds the wall time from construction to destruction to *seconds; reads no clock when null.
class ScopedTimer {
 public:
  explicit ScopedTimer(double* seconds) : seconds_(seconds) {
    if (seconds_) start_ = clock::now();
  }
  ~ScopedTimer() {
    if (seconds_) *seconds_ += std::chrono::duration<double>(clock::now() - start_).count();
  }
  ScopedTimer(const ScopedTimer&) = delete;
  ScopedTimer& operator=(const ScopedTimer&) = delete;

 private:
  using clock = std::chrono::steady_clock;
  double* seconds_;
  clock::time_point start_{};
};

// The parts of one MoE layer's forward and backward (filled by a layer with set_times).
struct MoETimes {
  double router_forward = 0;    // scores, top-k, gates
  double dispatch_forward = 0;  // capacity and the CSR dispatch
  double experts_forward = 0;   // the grouped expert GEMMs
  double combine_forward = 0;   // the gated sum back to tokens
  double losses_forward = 0;    // aux losses and routing statistics
  double combine_backward = 0;
  double losses_backward = 0;
  double experts_backward = 0;
  double router_backward = 0;

  template <class F>
  void for_each_part(F&& f) const {
    f(std::string_view("router_forward"), router_forward);
    f(std::string_view("dispatch_forward"), dispatch_forward);
    f(std::string_view("experts_forward"), experts_forward);
    f(std::string_view("combine_forward"), combine_forward);
    f(std::string_view("losses_forward"), losses_forward);
    f(std::string_view("combine_backward"), combine_backward);
    f(std::string_view("losses_backward"), losses_backward);
    f(std::string_view("experts_backward"), experts_backward);
    f(std::string_view("router_backward"), router_backward);
  }
  MoETimes& operator+=(const MoETimes& o) {
    router_forward += o.router_forward, dispatch_forward += o.dispatch_forward;
    experts_forward += o.experts_forward, combine_forward += o.combine_forward, losses_forward += o.losses_forward;
    combine_backward += o.combine_backward, losses_backward += o.losses_backward;
    experts_backward += o.experts_backward, router_backward += o.router_backward;
    return *this;
  }
};

// One transformer block.
struct BlockTimes {
  double norms_forward = 0;  // both norms and both residual adds
  double attention_forward = 0;
  double ffn_forward = 0;    // the whole feed-forward layer (MoE: router, experts, combine, losses)
  double norms_backward = 0;
  double attention_backward = 0;
  double ffn_backward = 0;
  MoETimes moe;              // parts of ffn_forward / ffn_backward, when the layer reports them

  double forward() const { return norms_forward + attention_forward + ffn_forward; }
  double backward() const { return norms_backward + attention_backward + ffn_backward; }
  double total() const { return forward() + backward(); }

  // The block's own parts, then the MoE parts.
  template <class F>
  void for_each_part(F&& f) const {
    f(std::string_view("norms_forward"), norms_forward);
    f(std::string_view("attention_forward"), attention_forward);
    f(std::string_view("ffn_forward"), ffn_forward);
    f(std::string_view("norms_backward"), norms_backward);
    f(std::string_view("attention_backward"), attention_backward);
    f(std::string_view("ffn_backward"), ffn_backward);
    moe.for_each_part(f);
  }
  BlockTimes& operator+=(const BlockTimes& o) {
    norms_forward += o.norms_forward, attention_forward += o.attention_forward, ffn_forward += o.ffn_forward;
    norms_backward += o.norms_backward, attention_backward += o.attention_backward, ffn_backward += o.ffn_backward;
    moe += o.moe;
    return *this;
  }
};

// A whole model; `blocks[l]` is block l. reset() keeps the blocks (the model holds pointers to them).
struct ModelTimes {
  std::int64_t steps = 0;  // forwards timed
  double embedding_forward = 0;
  double final_norm_forward = 0;
  double head_forward = 0;
  double loss_forward = 0;
  double loss_backward = 0;
  double head_backward = 0;
  double final_norm_backward = 0;
  double embedding_backward = 0;
  std::vector<BlockTimes> blocks;

  BlockTimes blocks_total() const {
    BlockTimes s;
    for (const BlockTimes& b : blocks) s += b;
    return s;
  }
  double forward() const {
    return embedding_forward + blocks_total().forward() + final_norm_forward + head_forward + loss_forward;
  }
  double backward() const {
    return loss_backward + head_backward + final_norm_backward + blocks_total().backward() + embedding_backward;
  }
  double total() const { return forward() + backward(); }

  void reset() {
    std::vector<BlockTimes> kept = std::move(blocks);
    *this = ModelTimes{};
    blocks = std::move(kept);  // the same storage: pointers into it stay valid
    for (BlockTimes& b : blocks) b = BlockTimes{};
  }

  // The model's own parts (f(-1, part, seconds)), then every block's (f(l, part, seconds)).
  template <class F>
  void for_each_part(F&& f) const {
    const index_t model = -1;
    f(model, std::string_view("embedding_forward"), embedding_forward);
    f(model, std::string_view("final_norm_forward"), final_norm_forward);
    f(model, std::string_view("head_forward"), head_forward);
    f(model, std::string_view("loss_forward"), loss_forward);
    f(model, std::string_view("loss_backward"), loss_backward);
    f(model, std::string_view("head_backward"), head_backward);
    f(model, std::string_view("final_norm_backward"), final_norm_backward);
    f(model, std::string_view("embedding_backward"), embedding_backward);
    for (std::size_t l = 0; l < blocks.size(); ++l)
      blocks[l].for_each_part([&](std::string_view part, double s) { f(index_t(l), part, s); });
  }
};

// A table: totals per part (blocks summed), milliseconds per step and share of the step, then one
// line per block. MoE parts are printed only when some layer reported them.
inline void print_times(std::ostream& out, const ModelTimes& t) {
  std::ostringstream s;
  const double total = t.total(), steps = double(t.steps > 0 ? t.steps : 1);
  auto share = [&](double v) { return total > 0 ? 100.0 * v / total : 0.0; };
  s << std::fixed << std::setprecision(3);
  s << "timing: " << t.steps << " steps, " << total << " s (" << 1e3 * total / steps
    << " ms/step), forward " << std::setprecision(1) << share(t.forward()) << "%, backward " << share(t.backward())
    << "%\n";
  s << std::left << std::setw(22) << "part" << std::right << std::setw(12) << "seconds" << std::setw(12) << "ms/step"
    << std::setw(9) << "share" << "\n";
  auto row = [&](std::string_view name, double v, int indent = 0) {
    s << std::string(std::size_t(indent), ' ') << std::left << std::setw(22 - indent) << std::string(name)
      << std::right << std::setprecision(4) << std::setw(12) << v << std::setw(12) << 1e3 * v / steps
      << std::setprecision(1) << std::setw(8) << share(v) << "%\n";
  };
  const BlockTimes b = t.blocks_total();
  bool moe = false;
  b.moe.for_each_part([&](std::string_view, double v) { moe = moe || v > 0; });
  auto moe_parts = [&](bool forward) {
    if (!moe) return;
    b.moe.for_each_part([&](std::string_view name, double v) {
      if ((name.find("_forward") != std::string_view::npos) == forward) row(name, v, 2);
    });
  };
  row("embedding_forward", t.embedding_forward);
  row("norms_forward", b.norms_forward);
  row("attention_forward", b.attention_forward);
  row("ffn_forward", b.ffn_forward);
  moe_parts(true);
  row("final_norm_forward", t.final_norm_forward);
  row("head_forward", t.head_forward);
  row("loss_forward", t.loss_forward);
  row("loss_backward", t.loss_backward);
  row("head_backward", t.head_backward);
  row("final_norm_backward", t.final_norm_backward);
  row("ffn_backward", b.ffn_backward);
  moe_parts(false);
  row("attention_backward", b.attention_backward);
  row("norms_backward", b.norms_backward);
  row("embedding_backward", t.embedding_backward);
  if (!t.blocks.empty()) {
    s << "per block, ms/step:\n"
      << std::setw(5) << "layer" << std::setw(12) << "attn_fwd" << std::setw(12) << "ffn_fwd" << std::setw(12)
      << "norms_fwd" << std::setw(12) << "attn_bwd" << std::setw(12) << "ffn_bwd" << std::setw(12) << "norms_bwd"
      << "\n";
    s << std::setprecision(4);
    for (std::size_t l = 0; l < t.blocks.size(); ++l) {
      const BlockTimes& x = t.blocks[l];
      s << std::setw(5) << l;
      for (double v : {x.attention_forward, x.ffn_forward, x.norms_forward, x.attention_backward, x.ffn_backward,
                       x.norms_backward})
        s << std::setw(12) << 1e3 * v / steps;
      s << "\n";
    }
  }
  out << s.str();
}

// CSV for training logs: the header once, then write_times_csv per logged step (layer −1 is the
// model's own parts). Seconds are those accumulated since the last reset().
inline void write_times_csv_header(std::ostream& out) { out << "step,layer,part,seconds\n"; }
inline void write_times_csv(std::ostream& out, std::int64_t step, const ModelTimes& t) {
  std::ostringstream s;
  s << std::setprecision(9);
  t.for_each_part([&](index_t layer, std::string_view part, double v) {
    s << step << "," << layer << "," << part << "," << v << "\n";
  });
  out << s.str();
}

}  // namespace smoe
