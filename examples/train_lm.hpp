// train_lm: a byte-level language model trained on any text file, built from the library's
// Model (embedding → L pre-norm transformer blocks → final norm → head → cross-entropy) with a
// choice of feed-forward layer: dense, Top-K-activation MLP, sigma-MoE, Switch, S-BASE, SaMoE
// (a weight-space expert pool shared by all layers) or a product-key memory, and for the
// experiments of docs/experiments.md softmax top-K, tied experts (WideNet), PR-MoE's residual
// expert and shared experts.
//
//   train_lm --data data/brown/brown.txt --ffn sigma-moe --minutes 10 --log run.csv --save run.ckpt
//   train_lm --resume run.ckpt --sample 500 --prompt "The "
//
// Training: AdamW, linear warm-up then cosine decay (by steps, or by training wall time with
// --minutes), global gradient-norm clipping, optional gradient accumulation. Batches are random
// windows of the training split (the first 1 − val_fraction of the file), drawn from a
// counter-based RNG seeded by --seed, so a run is a function of its flags (with --steps; a
// --minutes budget stops on the clock). A checkpoint holds the parameters, buffers, AdamW state,
// the step, the data position, the routers' step counters and the run's configuration, so
// --resume continues the same trajectory bit for bit. docs/training.md describes every flag.
//
// This header is the trainer, for either backend: train_lm.cpp (the command line) runs it on the
// CPU, train_lm_cuda.cpp instantiates it over the CUDA backend for --device cuda.
#pragma once
#include <smoe/dist/data_parallel.hpp>
#include <smoe/io/checkpoint.hpp>
#include <smoe/io/safetensors.hpp>
#include <smoe/smoe.hpp>

#include <algorithm>
#include <bit>
#include <charconv>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <limits>
#include <memory>
#include <numbers>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#if __has_include(<unistd.h>)
#include <unistd.h>
#define TRAIN_LM_HAS_ISATTY 1
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace train_lm {

using smoe::index_t;
using T = float;
inline constexpr index_t vocab = 256;  // bytes
inline constexpr std::int64_t unlimited = std::numeric_limits<std::int64_t>::max();
inline const double ln2 = std::numbers::ln2;

// ============================================================================================
// Options
// ============================================================================================

// Raised for bad command lines: main prints it and exits with status 2.
struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// New kinds go at the end: checkpoints store the index.
inline const std::vector<std::string> ffn_kinds = {
    "dense", "topk", "sigma-moe", "switch", "s-base", "samoe", "pkm", "softmax-moe", "tied", "pr-moe", "shared-experts"};
inline const std::vector<std::string> samoe_inits = {"member", "uniform"};
inline const std::vector<std::string> samoe_spaces = {"weight", "output"};

struct Options {
  // data
  std::string data;
  double val_fraction = 0.05;
  // model
  std::string ffn = "sigma-moe";
  std::int64_t d_model = 128, layers = 4, heads = 4, context = 128;
  std::int64_t experts = 0, expert_size = 0, k = 0;  // 0: the kind's default
  std::int64_t d_ff = 0, active = 0, members = 2, pkm_keys = 45, pkm_heads = 4;
  double expert_dropout = 0, entropy_coef = 0.001, switch_coef = 0.01, capacity_factor = 0;
  bool tie_embeddings = false;
  std::string samoe_init = "member", samoe_space = "weight";
  bool softmax_renorm = false;
  // training
  std::int64_t batch = 16, accum = 1, steps = 2000, warmup = -1;
  double minutes = 0, lr = 3e-3, min_lr = -1, weight_decay = 0.01, clip = 1.0;
  std::int64_t seed = 1, threads = 0;
  std::string device = "cpu";
  bool expert_parallel = false;
  // evaluation, logging, checkpoints
  std::int64_t eval_every = 200, eval_tokens = 16384, final_eval_tokens = 0;
  std::int64_t log_every = 1, print_every = 10, stats_every = 10, save_every = 0, stop_at = 0;
  std::string log, stats, save, resume;
  bool timing = false;
  // sampling
  std::int64_t sample = 0, top_k = 0;
  double temperature = 0.8;
  std::string prompt = "The ";

  std::set<std::string> given;  // flags set on the command line
  bool has(const std::string& flag) const { return given.count(flag) > 0; }
};

struct Flag {
  std::string name;     // without "--"
  std::string metavar;  // empty: a switch without a value
  std::string help;
  std::function<void(Options&, const std::string&)> set;
  std::string group;  // printed as a heading before the first flag of the group
};

inline std::int64_t parse_int(const std::string& flag, const std::string& text, std::int64_t lo, std::int64_t hi) {
  std::int64_t v = 0;
  const char* end = text.data() + text.size();
  const auto r = std::from_chars(text.data(), end, v);
  if (text.empty() || r.ec != std::errc() || r.ptr != end)
    throw usage_error("--" + flag + " needs an integer, got '" + text + "'");
  if (v < lo || v > hi)
    throw usage_error("--" + flag + " must be in [" + std::to_string(lo) + ", " +
                      (hi == unlimited ? std::string("inf") : std::to_string(hi)) + "], got " + text);
  return v;
}

inline double parse_double(const std::string& flag, const std::string& text, double lo, double hi, bool lo_open = false) {
  double v = 0;
  std::size_t used = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (text.empty() || used != text.size() || !std::isfinite(v))
    throw usage_error("--" + flag + " needs a finite number, got '" + text + "'");
  if (v < lo || v > hi || (lo_open && v == lo)) {
    std::ostringstream s;
    s << "--" << flag << " must be in " << (lo_open ? "(" : "[") << lo << ", " << hi << "], got " << text;
    throw usage_error(s.str());
  }
  return v;
}

inline std::string one_of(const std::string& flag, const std::string& text, const std::vector<std::string>& choices) {
  for (const auto& c : choices)
    if (c == text) return text;
  std::string list;
  for (const auto& c : choices) list += (list.empty() ? "" : ", ") + c;
  throw usage_error("--" + flag + " must be one of " + list + ", got '" + text + "'");
}

inline std::vector<Flag> make_flags() {
  std::vector<Flag> f;
  std::string group;
  auto add = [&](std::string name, std::string metavar, std::string help, auto set) {
    f.push_back({std::move(name), std::move(metavar), std::move(help), set, group});
    group.clear();
  };
  auto i = [](const char* flag, std::int64_t Options::*m, std::int64_t lo, std::int64_t hi = unlimited) {
    return [flag, m, lo, hi](Options& o, const std::string& v) { o.*m = parse_int(flag, v, lo, hi); };
  };
  auto r = [](const char* flag, double Options::*m, double lo, double hi, bool open = false) {
    return [flag, m, lo, hi, open](Options& o, const std::string& v) { o.*m = parse_double(flag, v, lo, hi, open); };
  };
  auto s = [](std::string Options::*m) { return [m](Options& o, const std::string& v) { o.*m = v; }; };
  auto b = [](bool Options::*m) { return [m](Options& o, const std::string&) { o.*m = true; }; };
  constexpr double big = 1e300;

  group = "Data";
  add("data", "FILE", "text file to train on (bytes are tokens, vocabulary 256)", s(&Options::data));
  add("val-fraction", "F", "held-out split: the last F of the file (default 0.05; 0: none)",
      r("val-fraction", &Options::val_fraction, 0.0, 0.5));

  group = "Model";
  add("ffn", "KIND",
      "feed-forward layer: dense, topk, sigma-moe, switch, s-base, samoe, pkm, softmax-moe, tied, pr-moe, "
      "shared-experts (default sigma-moe; see below)",
      [](Options& o, const std::string& v) { o.ffn = one_of("ffn", v, ffn_kinds); });
  add("d-model", "N", "model width d (default 128)", i("d-model", &Options::d_model, 2, 1 << 16));
  add("layers", "N", "transformer blocks L (default 4)", i("layers", &Options::layers, 1, 1024));
  add("heads", "N", "attention heads; d/heads must be even (RoPE) (default 4)", i("heads", &Options::heads, 1, 1024));
  add("context", "N", "context length in bytes (default 128)", i("context", &Options::context, 2, 1 << 20));
  add("experts", "E", "experts per MoE layer (default 16; switch: 4)", i("experts", &Options::experts, 1, 1 << 20));
  add("expert-size", "G", "hidden units per expert (default 64; switch: 256)",
      i("expert-size", &Options::expert_size, 1, 1 << 20));
  add("k", "K", "experts per token (default 4; switch: 1); pkm: values per head (default 32)",
      i("k", &Options::k, 1, 1 << 20));
  add("d-ff", "N", "dense/topk hidden size (default: the sigma-moe parameter count, (E·d + 2·E·G·d) / 2d)",
      i("d-ff", &Options::d_ff, 1, 1 << 24));
  add("active", "N", "topk: hidden units kept per token (default K·G = 256)",
      i("active", &Options::active, 1, 1 << 24));
  add("members", "M", "samoe: pool members shared by all layers (default 2)", i("members", &Options::members, 1, 1024));
  add("samoe-init", "INIT", "samoe: member (layer l starts near member l mod M, default) or uniform",
      [](Options& o, const std::string& v) { o.samoe_init = one_of("samoe-init", v, samoe_inits); });
  add("samoe-space", "SPACE",
      "samoe: weight (combine the members' weights, default) or output (combine the M members' outputs)",
      [](Options& o, const std::string& v) { o.samoe_space = one_of("samoe-space", v, samoe_spaces); });
  add("softmax-renorm", "", "softmax-moe: softmax over the K selected logits (default: over all E, no renormalization)",
      b(&Options::softmax_renorm));
  add("pkm-keys", "N", "pkm: sub-keys per half, N² values (default 45: 2025 values ≈ 2·E·G)",
      i("pkm-keys", &Options::pkm_keys, 1, 46340));
  add("pkm-heads", "H", "pkm: heads (default 4)", i("pkm-heads", &Options::pkm_heads, 1, 1024));
  add("expert-dropout", "P",
      "sigma-moe, samoe, softmax-moe, tied, pr-moe, shared-experts: expert dropout rate in training (default 0)",
      r("expert-dropout", &Options::expert_dropout, 0.0, 0.99));
  add("entropy-coef", "X", "the kinds of --expert-dropout: entropy regularization coefficient (default 0.001)",
      r("entropy-coef", &Options::entropy_coef, 0.0, big));
  add("switch-coef", "X", "switch: load-balancing loss coefficient (default 0.01)",
      r("switch-coef", &Options::switch_coef, 0.0, big));
  add("capacity-factor", "C", "token-choice MoE kinds: expert capacity factor (default 0: dropless)",
      r("capacity-factor", &Options::capacity_factor, 0.0, big));
  add("tie-embeddings", "", "share the embedding and the output projection", b(&Options::tie_embeddings));

  group = "Training";
  add("steps", "N", "optimizer steps (default 2000; unlimited with --minutes alone)", i("steps", &Options::steps, 1));
  add("minutes", "X", "stop after X minutes of training wall time; the cosine then follows the clock",
      r("minutes", &Options::minutes, 0.0, big, true));
  add("batch", "N", "sequences per micro-batch (default 16)", i("batch", &Options::batch, 1, 1 << 20));
  add("accum", "M", "micro-batches per optimizer step, gradient accumulation (default 1)",
      i("accum", &Options::accum, 1, 1 << 20));
  add("lr", "X", "peak learning rate (default 3e-3)", r("lr", &Options::lr, 0.0, big, true));
  add("min-lr", "X", "final learning rate of the cosine (default lr/10)", r("min-lr", &Options::min_lr, 0.0, big));
  add("warmup", "N", "linear warm-up steps (default min(100, steps/10))", i("warmup", &Options::warmup, 0));
  add("weight-decay", "X", "AdamW decoupled weight decay, not on norms and biases (default 0.01)",
      r("weight-decay", &Options::weight_decay, 0.0, big));
  add("clip", "X", "global gradient-norm clipping (default 1; 0: off)", r("clip", &Options::clip, 0.0, big));
  add("seed", "N", "seed of the initialization, the data order and expert dropout (default 1)",
      i("seed", &Options::seed, 0));
  add("threads", "N", "CPU threads (default: OpenMP's, all cores); results do not depend on it",
      i("threads", &Options::threads, 1, 4096));
  add("device", "NAME", "cpu or cuda: where the model trains (default cpu; cuda needs train_lm built with the "
                        "CUDA backend; checkpoints are the same either way)",
      [](Options& o, const std::string& v) { o.device = one_of("device", v, {"cpu", "cuda"}); });
  add("expert-parallel", "",
      "under mpirun -np P: every MoE layer's experts split over the P ranks (E/P each), the batch split "
      "by sequences; the losses equal one process's (sigma-moe, switch, softmax-moe; docs/distributed.md)",
      b(&Options::expert_parallel));

  group = "Evaluation, logging, checkpoints";
  add("eval-every", "N", "validation every N steps (default 200) and at the end",
      i("eval-every", &Options::eval_every, 1));
  add("eval-tokens", "N", "bytes of the held-out split in each periodic validation (default 16384)",
      i("eval-tokens", &Options::eval_tokens, 1));
  add("final-eval-tokens", "N", "bytes in the final validation (default 0: the whole held-out split)",
      i("final-eval-tokens", &Options::final_eval_tokens, 0));
  add("log", "FILE.csv", "training log: a header, then one row per logged step", s(&Options::log));
  add("log-every", "N", "log every N steps (default 1)", i("log-every", &Options::log_every, 1));
  add("print-every", "N", "progress line every N steps when stdout is not a terminal (default 10)",
      i("print-every", &Options::print_every, 1));
  add("stats", "FILE.csv", "expert usage per MoE layer (and FILE.gp, FILE.png with gnuplot)", s(&Options::stats));
  add("stats-every", "N", "expert usage summed over N steps per row (default 10)",
      i("stats-every", &Options::stats_every, 1));
  add("save", "FILE", "checkpoint: saved every --save-every steps and at the end", s(&Options::save));
  add("save-every", "N", "checkpoint interval (default: --eval-every)", i("save-every", &Options::save_every, 1));
  add("resume", "FILE", "continue the run of this checkpoint (its model and flags unless given)", s(&Options::resume));
  add("stop-at", "N", "stop after step N and save, as an interruption would (the schedule still runs to --steps)",
      i("stop-at", &Options::stop_at, 1));
  add("timing", "", "print per-layer timing (attention, router, experts, combine, backward, ...) at the end",
      b(&Options::timing));

  group = "Sampling";
  add("sample", "N", "generate N bytes from the checkpoint of --resume (or --save) and exit",
      i("sample", &Options::sample, 1, 1 << 30));
  add("prompt", "TEXT", "text the sample continues (default \"The \")", s(&Options::prompt));
  add("temperature", "X", "sampling temperature (default 0.8; 0: greedy)",
      r("temperature", &Options::temperature, 0.0, big));
  add("top-k", "N", "sample among the N most likely bytes (default 0: all)", i("top-k", &Options::top_k, 0, vocab));
  group = "";
  add("help", "", "this text", [](Options&, const std::string&) {});
  return f;
}

inline void print_help(std::ostream& out, const std::vector<Flag>& flags) {
  out << "usage: train_lm --data FILE [options]          train a byte-level language model\n"
         "       train_lm --resume FILE --sample N [...]  generate N bytes from a checkpoint\n";
  for (const Flag& f : flags) {
    if (!f.group.empty()) out << "\n" << f.group << ":\n";
    std::string left = "  --" + f.name + (f.metavar.empty() ? "" : " " + f.metavar);
    out << left << std::string(left.size() < 24 ? 24 - left.size() : 1, ' ') << f.help << "\n";
  }
  out << "\n"
         "FFN kinds (defaults sized for d = 128, 4 layers, context 128 on 2 CPU cores):\n"
         "  sigma-moe  sigmoid top-K router + ReLU experts + entropy regularization (Csordás et al. 2023),\n"
         "             E = 16, G = 64, K = 4: E·G = 1024 hidden units in all, K·G = 256 per token (a quarter),\n"
         "             sigma-MoE init with the pre-LN scale sqrt(2/L)\n"
         "  dense      ReLU MLP with d_ff = (E·d + 2·E·G·d) / 2d = 1032: the parameters of sigma-moe\n"
         "  topk       the same MLP keeping the --active (K·G = 256) largest hidden units per token\n"
         "  switch     softmax top-1 + Switch balance loss 0.01 (Fedus et al. 2022); E = 4, G = 256:\n"
         "             the same total and per-token hidden units as sigma-moe\n"
         "  s-base     Sinkhorn-balanced selection, sigmoid gates (Clark et al. 2022); sigma-moe's sizes\n"
         "  samoe      sigma-moe routing over a weight-space SaMoE pool of M = 2 members shared by all layers\n"
         "  pkm        product-key memory, ReLU gates: 45² = 2025 values, 4 heads, K = 32 per head\n"
         "  softmax-moe  sigma-moe with softmax gates: over all E experts, or over the K selected ones with\n"
         "             --softmax-renorm (the sigma-MoE paper's softmax baselines); sigma-moe's sizes\n"
         "  tied       WideNet (Xue et al. 2022): one set of E experts shared by all layers, per-layer\n"
         "             sigma-moe routers; sigma-moe's sizes\n"
         "  pr-moe     PR-MoE's residual (Rajbhandari et al. 2022): sigma-moe routing over K = 3 of E experts\n"
         "             plus a dense MLP of G units that every token uses, mixed by a learned softmax\n"
         "  shared-experts  DeepSeekMoE: sigma-moe routing over K = 3 of E experts plus 1 shared expert of\n"
         "             G units added ungated; pr-moe and shared-experts have sigma-moe's active size\n"
         "CPU only (--device cpu): softmax-moe, tied, pr-moe, shared-experts and samoe --samoe-space output.\n"
         "The small expert count keeps each expert's GEMM large enough to run near full speed on a CPU\n"
         "at batch 16 × 128 tokens (about 500 tokens per expert per step), and K·G = E·G/4 gives a\n"
         "quarter of the FFN FLOPs of the parameter-matched dense model.\n"
         "\n"
         "Output: a progress line (step, loss in nats and bits per byte, validation bits per byte,\n"
         "tokens/s, learning rate, ETA); --log CSV columns: step, tokens, lr, train_loss (nats/byte),\n"
         "train_bpb, aux_loss, grad_norm, val_loss, val_bpb, val_tokens (empty where not evaluated),\n"
         "elapsed_s (training wall time), tokens_per_s. Errors exit with status 1, bad flags with 2.\n";
}

// ============================================================================================
// Settings persisted in checkpoints (as uint64 counters; doubles by their IEEE-754 bits)
// ============================================================================================

struct Persisted {
  std::string key;   // counter name in the checkpoint
  std::string flag;  // the flag that sets it
  bool arch;         // part of the model: a given flag must agree with the checkpoint
  std::function<std::uint64_t(const Options&)> get;
  std::function<void(Options&, std::uint64_t)> set;
  std::function<std::string(std::uint64_t)> show;
  bool optional = false;  // added after checkpoints without it existed: absent means the default
};

inline std::vector<Persisted> persisted_settings() {
  std::vector<Persisted> p;
  auto i = [&](const char* key, const char* flag, bool arch, std::int64_t Options::*m) {
    p.push_back({key, flag, arch, [m](const Options& o) { return std::uint64_t(o.*m); },
                 [m](Options& o, std::uint64_t v) { o.*m = std::int64_t(v); },
                 [](std::uint64_t v) {
                   return std::int64_t(v) == unlimited ? std::string("unlimited") : std::to_string(std::int64_t(v));
                 }});
  };
  auto r = [&](const char* key, const char* flag, bool arch, double Options::*m) {
    p.push_back({key, flag, arch, [m](const Options& o) { return std::bit_cast<std::uint64_t>(o.*m); },
                 [m](Options& o, std::uint64_t v) { o.*m = std::bit_cast<double>(v); },
                 [](std::uint64_t v) {
                   std::ostringstream s;
                   s << std::bit_cast<double>(v);
                   return s.str();
                 }});
  };
  auto e = [&](const char* key, const char* flag, bool arch, std::string Options::*m,
               const std::vector<std::string>* names) {
    p.push_back({key, flag, arch,
                 [m, names](const Options& o) {
                   return std::uint64_t(std::find(names->begin(), names->end(), o.*m) - names->begin());
                 },
                 [m, names](Options& o, std::uint64_t v) {
                   if (v >= names->size()) throw smoe::error("checkpoint: bad setting index " + std::to_string(v));
                   o.*m = (*names)[v];
                 },
                 [names](std::uint64_t v) { return v < names->size() ? (*names)[v] : std::string("?"); }});
  };
  e("arch.ffn", "ffn", true, &Options::ffn, &ffn_kinds);
  i("arch.d_model", "d-model", true, &Options::d_model);
  i("arch.layers", "layers", true, &Options::layers);
  i("arch.heads", "heads", true, &Options::heads);
  i("arch.context", "context", true, &Options::context);
  i("arch.experts", "experts", true, &Options::experts);
  i("arch.expert_size", "expert-size", true, &Options::expert_size);
  i("arch.k", "k", true, &Options::k);
  i("arch.d_ff", "d-ff", true, &Options::d_ff);
  i("arch.active", "active", true, &Options::active);
  i("arch.members", "members", true, &Options::members);
  e("arch.samoe_init", "samoe-init", true, &Options::samoe_init, &samoe_inits);
  i("arch.pkm_keys", "pkm-keys", true, &Options::pkm_keys);
  i("arch.pkm_heads", "pkm-heads", true, &Options::pkm_heads);
  e("arch.samoe_space", "samoe-space", true, &Options::samoe_space, &samoe_spaces);
  p.back().optional = true;
  p.push_back({"arch.softmax_renorm", "softmax-renorm", true,
               [](const Options& o) { return std::uint64_t(o.softmax_renorm); },
               [](Options& o, std::uint64_t v) { o.softmax_renorm = v != 0; },
               [](std::uint64_t v) { return std::string(v ? "on" : "off"); }, true});
  r("arch.expert_dropout", "expert-dropout", true, &Options::expert_dropout);
  r("arch.entropy_coef", "entropy-coef", true, &Options::entropy_coef);
  r("arch.switch_coef", "switch-coef", true, &Options::switch_coef);
  r("arch.capacity_factor", "capacity-factor", true, &Options::capacity_factor);
  p.push_back({"arch.tie_embeddings", "tie-embeddings", true,
               [](const Options& o) { return std::uint64_t(o.tie_embeddings); },
               [](Options& o, std::uint64_t v) { o.tie_embeddings = v != 0; },
               [](std::uint64_t v) { return std::string(v ? "on" : "off"); }});
  i("run.batch", "batch", false, &Options::batch);
  i("run.accum", "accum", false, &Options::accum);
  i("run.steps", "steps", false, &Options::steps);
  r("run.minutes", "minutes", false, &Options::minutes);
  i("run.warmup", "warmup", false, &Options::warmup);
  r("run.lr", "lr", false, &Options::lr);
  r("run.min_lr", "min-lr", false, &Options::min_lr);
  r("run.weight_decay", "weight-decay", false, &Options::weight_decay);
  r("run.clip", "clip", false, &Options::clip);
  i("run.seed", "seed", false, &Options::seed);
  r("run.val_fraction", "val-fraction", false, &Options::val_fraction);
  i("run.eval_every", "eval-every", false, &Options::eval_every);
  i("run.eval_tokens", "eval-tokens", false, &Options::eval_tokens);
  i("run.final_eval_tokens", "final-eval-tokens", false, &Options::final_eval_tokens);
  return p;
}

// Training counters besides the settings and the model's own (router steps, under "model.").
inline const std::vector<std::string> run_counters = {"step",       "data_position", "train_us", "sched.warmup_progress",
                                               "data.bytes", "data.hash"};

inline std::uint64_t parse_counter_text(const std::string& key, const std::string& text) {
  std::uint64_t v = 0;
  const auto r = std::from_chars(text.data(), text.data() + text.size(), v);
  if (text.empty() || r.ec != std::errc() || r.ptr != text.data() + text.size())
    throw smoe::error("checkpoint: counter '" + key + "' is not a decimal uint64: '" + text + "'");
  return v;
}

// Reads the settings of checkpoint `path` into `o`: a setting given on the command line must agree
// (model settings) or overrides the checkpoint's (training settings, with a note).
inline void apply_checkpoint_settings(const std::string& path, Options& o, bool training) {
  const auto file = smoe::io::SafetensorsFile::load(path);
  const auto& meta = file.metadata();
  for (const Persisted& s : persisted_settings()) {
    const auto it = meta.find("counter." + s.key);
    if (it == meta.end() && !s.optional)
      throw smoe::error("'" + path + "' is not a train_lm checkpoint: it has no counter '" + s.key + "'");
    const std::uint64_t saved = it == meta.end() ? s.get(Options{}) : parse_counter_text(s.key, it->second);
    if (!o.has(s.flag)) {
      s.set(o, saved);
    } else if (s.get(o) != saved) {
      if (s.arch)
        throw usage_error("--" + s.flag + " " + s.show(s.get(o)) + " differs from the checkpoint's " + s.show(saved) +
                          " ('" + path + "'); the model comes from the checkpoint");
      if (training)
        std::cout << "note: --" << s.flag << " " << s.show(s.get(o)) << " overrides the checkpoint's " << s.show(saved)
                  << ": the resumed run will not repeat the original trajectory\n";
    }
  }
}

// Fills the kind-dependent defaults and checks the combinations the flags alone cannot.
inline void resolve(Options& o) {
  const bool sw = o.ffn == "switch", pkm = o.ffn == "pkm";
  if (o.experts == 0) o.experts = sw ? 4 : 16;
  if (o.expert_size == 0) o.expert_size = sw ? 256 : 64;
  const bool plus_one = o.ffn == "pr-moe" || o.ffn == "shared-experts";  // + 1 always-on expert of G units
  if (o.k == 0) o.k = pkm ? 32 : sw ? 1 : plus_one ? 3 : 4;
  if (o.d_ff == 0) {
    // dense/topk: as many parameters as the sigma-moe layer with these E, G (router E·d + experts 2·E·G·d).
    const std::int64_t sigma = o.experts * o.d_model + 2 * o.experts * o.expert_size * o.d_model;
    o.d_ff = (sigma + o.d_model) / (2 * o.d_model);
  }
  if (o.active == 0) o.active = std::min(o.d_ff, o.k * o.expert_size);
  if (o.min_lr < 0) o.min_lr = o.lr / 10;
  if (!o.has("steps") && o.has("minutes")) o.steps = unlimited;
  if (o.warmup < 0) o.warmup = std::min<std::int64_t>(100, o.steps == unlimited ? 100 : o.steps / 10);

  auto bad = [](const std::string& m) { throw usage_error(m); };
  if (o.d_model % o.heads != 0 || (o.d_model / o.heads) % 2 != 0)
    bad("--heads " + std::to_string(o.heads) + " must divide --d-model " + std::to_string(o.d_model) +
        " into an even head size (RoPE pairs dimensions)");
  const bool moe = o.ffn != "dense" && o.ffn != "topk" && !pkm;
  if (moe && o.k > o.experts) bad("--k " + std::to_string(o.k) + " must be <= --experts " + std::to_string(o.experts));
  if (pkm && o.k > o.pkm_keys)
    bad("--k " + std::to_string(o.k) + " (values per head) must be <= --pkm-keys " + std::to_string(o.pkm_keys));
  if (pkm && o.d_model % 2 != 0) bad("--ffn pkm needs an even --d-model");
  if (o.ffn == "topk" && o.active > o.d_ff)
    bad("--active " + std::to_string(o.active) + " must be <= --d-ff " + std::to_string(o.d_ff));
  if (o.min_lr > o.lr) bad("--min-lr must be <= --lr");
  const bool cpu_only = o.ffn == "softmax-moe" || o.ffn == "tied" || plus_one ||
                        (o.ffn == "samoe" && o.samoe_space == "output");
  if (o.device == "cuda" && cpu_only)
    bad("--ffn " + o.ffn + (o.ffn == "samoe" ? " --samoe-space output" : "") +
        " runs on the CPU only (train_lm's CUDA build instantiates the original kinds)");
  if (o.device == "cuda" && o.timing)
    bad("--timing times the CPU run's parts; on --device cuda the work is asynchronous (time the whole run instead)");
  if (o.expert_parallel) {
    if (o.ffn != "sigma-moe" && o.ffn != "switch" && o.ffn != "softmax-moe")
      bad("--expert-parallel shards the experts of the token-choice kinds sigma-moe, switch and softmax-moe; --ffn " +
          o.ffn + " is not one of them");
    if (o.device == "cuda") bad("--expert-parallel runs on the CPU (MPI); --device cuda is not supported with it");
    if (o.sample > 0) bad("--sample runs in one process: drop --expert-parallel (the checkpoint is the whole model)");
  }
  if (o.steps != unlimited && o.warmup > o.steps)
    bad("--warmup " + std::to_string(o.warmup) + " must be <= --steps " + std::to_string(o.steps));
}

// ============================================================================================
// Data
// ============================================================================================

inline std::uint64_t fnv1a(const std::vector<std::uint8_t>& bytes) {
  std::uint64_t h = 1469598103934665603ull;
  for (std::uint8_t c : bytes) h = (h ^ c) * 1099511628211ull;
  return h;
}

inline std::uint64_t mix_seed(std::uint64_t seed, std::uint64_t tag) {  // splitmix64 of seed and tag
  std::uint64_t z = seed + 0x9E3779B97F4A7C15ull * (tag + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct Corpus {
  std::vector<std::uint8_t> bytes;
  std::size_t train_size = 0;  // bytes [0, train_size) train, [train_size, size) held out
  std::uint64_t hash = 0;

  std::size_t val_size() const { return bytes.size() - train_size; }
};

inline Corpus load_corpus(const Options& o) {
  std::ifstream in(o.data, std::ios::binary);
  if (!in) throw usage_error("--data: cannot open '" + o.data + "'");
  Corpus c;
  c.bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  const std::size_t n = c.bytes.size(), val = std::size_t(double(n) * o.val_fraction);
  c.train_size = n - val;
  const std::size_t need = std::size_t(o.context) + 2;
  if (c.train_size < need)
    throw usage_error("--data '" + o.data + "' has " + std::to_string(c.train_size) + " training bytes; --context " +
                      std::to_string(o.context) + " needs at least " + std::to_string(need));
  if (val > 0 && val < need)
    throw usage_error("the held-out split of '" + o.data + "' (" + std::to_string(val) +
                      " bytes) is shorter than --context + 2 = " + std::to_string(need) +
                      "; raise --val-fraction or set it to 0");
  c.hash = fnv1a(c.bytes);
  return c;
}

// Training windows: sequence i of a run starts at a uniform position of the training split drawn
// from Philox(seed, i), so the data order is a function of the seed and the sequence count only.
struct Sampler {
  const Corpus* corpus;
  std::uint64_t seed;
  std::uint64_t position = 0;  // sequences drawn so far (saved in checkpoints)

  // Fills B windows of L + 1 bytes: ids = bytes [s, s + L), targets = bytes [s + 1, s + L + 1).
  void next(index_t B, index_t L, std::vector<std::int32_t>& ids, std::vector<std::int32_t>& targets) {
    const std::uint64_t starts = corpus->train_size - std::uint64_t(L);  // s + L < train_size
    ids.resize(std::size_t(B * L));
    targets.resize(ids.size());
    for (index_t b = 0; b < B; ++b) {
      const auto r = smoe::philox4x32(seed, position++, 0xDA7A);
      const std::uint64_t x = (std::uint64_t(r[0]) << 32) | r[1];
      const auto s = std::size_t((static_cast<unsigned __int128>(x) * starts) >> 64);
      for (index_t t = 0; t < L; ++t) {
        ids[std::size_t(b * L + t)] = corpus->bytes[s + std::size_t(t)];
        targets[std::size_t(b * L + t)] = corpus->bytes[s + std::size_t(t) + 1];
      }
    }
  }
};

// Held-out windows: consecutive, non-overlapping targets [s + 1, s + L] for s = 0, L, 2L, ... of
// the held-out split; `max_tokens` > 0 keeps an evenly spaced subset of them.
inline std::vector<std::size_t> eval_windows(const Corpus& c, index_t L, std::int64_t max_tokens) {
  std::vector<std::size_t> all;
  if (c.val_size() < std::size_t(L) + 1) return all;
  for (std::size_t s = c.train_size; s + std::size_t(L) < c.bytes.size(); s += std::size_t(L)) all.push_back(s);
  const std::size_t want =
      max_tokens > 0 ? std::max<std::size_t>(1, std::size_t((max_tokens + L - 1) / L)) : all.size();
  if (want >= all.size()) return all;
  std::vector<std::size_t> some;
  for (std::size_t j = 0; j < want; ++j) some.push_back(all[j * all.size() / want]);
  return some;
}

// ============================================================================================
// The FFN kinds
// ============================================================================================

inline double init_scale(const Options& o) { return std::sqrt(2.0 / double(o.layers)); }  // sigma-MoE's pre-LN scale
inline smoe::InitOptions ffn_init(const Options& o, index_t layer) {
  return {.scale = init_scale(o), .seed = mix_seed(std::uint64_t(o.seed), 1000 + std::uint64_t(layer))};
}

// Each kind is a template over the backend (smoe::cpu, smoe::cuda): the same layers on either. A
// model is built and initialized on the CPU; a device run copies its parameters to the device.
template <class B, class Router, class Experts, class... Losses>
using MoELayer = smoe::MoE<Router, Experts, smoe::WeightedSum<T, B>, Losses...>;

template <class B>
struct DenseKind {
  using FFN = smoe::DenseMLP<T, smoe::Relu, B>;
  using Shared = smoe::NoShared;
  static Shared make_shared(const Options&) { return {}; }
  static FFN make_ffn(const Options& o, index_t, Shared&) {
    return FFN({.d_model = o.d_model, .hidden = o.d_ff, .topk = o.ffn == "topk" ? o.active : 0});
  }
  static void init(FFN& f, Shared&, const Options& o, index_t l) { smoe::dense_init(f, ffn_init(o, l)); }
};

// first_token: this rank's first token in the batch (--expert-parallel), so that every token keeps
// the mask of the single-process run.
inline smoe::ExpertDropout dropout(const Options& o, index_t layer, std::uint64_t first_token = 0) {
  return {.rate = o.expert_dropout,
          .seed = mix_seed(std::uint64_t(o.seed), 2000 + std::uint64_t(layer)),
          .first_token = first_token};
}

template <class B>
smoe::ReluExperts<T, B> relu_experts(const Options& o, index_t experts) {
  return smoe::ReluExperts<T, B>({.d_model = o.d_model, .experts = experts, .hidden = o.expert_size});
}

// The token-choice kinds (sigma-moe, switch, softmax-moe) build their router and loss with
// make_router and make_loss, which --expert-parallel reuses (train_lm_expert_parallel.cpp).
template <class B>
struct SigmaKind {
  using FFN = MoELayer<B, smoe::SigmoidTopK<T, B>, smoe::ReluExperts<T, B>, smoe::EntropyLoss<T, B>>;
  using Shared = smoe::NoShared;
  static Shared make_shared(const Options&) { return {}; }
  static smoe::SigmoidTopK<T, B> make_router(const Options& o, index_t l, std::uint64_t first_token = 0) {
    return smoe::SigmoidTopK<T, B>(
        {.d_model = o.d_model, .experts = o.experts, .k = o.k, .expert_dropout = dropout(o, l, first_token)});
  }
  static smoe::EntropyLoss<T, B> make_loss(const Options& o) { return smoe::EntropyLoss<T, B>(o.entropy_coef); }
  static FFN make_ffn(const Options& o, index_t l, Shared&) {
    FFN f(make_router(o, l), relu_experts<B>(o, o.experts), {}, make_loss(o));
    f.capacity.capacity_factor = o.capacity_factor;
    return f;
  }
  static void init(FFN& f, Shared&, const Options& o, index_t l) { smoe::sigma_moe_init(f, ffn_init(o, l)); }
};

template <class B>
struct SwitchKind {
  using FFN = MoELayer<B, smoe::SoftmaxTopK<T, B>, smoe::ReluExperts<T, B>, smoe::SwitchBalanceLoss<T, B>>;
  using Shared = smoe::NoShared;
  static Shared make_shared(const Options&) { return {}; }
  static smoe::SoftmaxTopK<T, B> make_router(const Options& o, index_t, std::uint64_t = 0) {
    return smoe::SoftmaxTopK<T, B>({.d_model = o.d_model, .experts = o.experts, .k = o.k});
  }
  static smoe::SwitchBalanceLoss<T, B> make_loss(const Options& o) { return smoe::SwitchBalanceLoss<T, B>(o.switch_coef); }
  static FFN make_ffn(const Options& o, index_t l, Shared&) {
    FFN f(make_router(o, l), relu_experts<B>(o, o.experts), {}, make_loss(o));
    f.capacity.capacity_factor = o.capacity_factor;
    return f;
  }
  static void init(FFN& f, Shared&, const Options& o, index_t l) { smoe::sigma_moe_init(f, ffn_init(o, l)); }
};

template <class B>
struct SBaseKind {
  using FFN = MoELayer<B, smoe::SBaseRouter<T, B>, smoe::ReluExperts<T, B>>;
  using Shared = smoe::NoShared;
  static Shared make_shared(const Options&) { return {}; }
  static FFN make_ffn(const Options& o, index_t, Shared&) {
    FFN f(smoe::SBaseRouter<T, B>({.d_model = o.d_model, .experts = o.experts, .k = o.k}),
          relu_experts<B>(o, o.experts));
    f.capacity.capacity_factor = o.capacity_factor;
    return f;
  }
  static void init(FFN& f, Shared&, const Options& o, index_t l) { smoe::sigma_moe_init(f, ffn_init(o, l)); }
};

// Space: smoe::WeightSpace (--samoe-space weight) or smoe::OutputSpace (output; CPU only).
template <class B, class Space>
struct SaMoESpaceKind {
  using Experts = smoe::SaMoEExperts<T, smoe::Relu, Space, B>;
  using FFN = MoELayer<B, smoe::SigmoidTopK<T, B>, Experts, smoe::EntropyLoss<T, B>>;
  using Shared = smoe::ExpertPool<T, smoe::Relu, B>;
  static Shared make_shared(const Options& o) {
    return Shared({.d_model = o.d_model, .experts = o.experts, .hidden = o.expert_size, .members = o.members});
  }
  static FFN make_ffn(const Options& o, index_t l, Shared& pool) {
    FFN f(smoe::SigmoidTopK<T, B>({.d_model = o.d_model, .experts = o.experts, .k = o.k, .expert_dropout = dropout(o, l)}),
          Experts(pool, {.layer = l,
                         .init = o.samoe_init == "uniform" ? smoe::CombineInit::uniform : smoe::CombineInit::member}),
          {}, smoe::EntropyLoss<T, B>(o.entropy_coef));
    f.capacity.capacity_factor = o.capacity_factor;
    return f;
  }
  // The router as sigma-MoE's (rows renormalized); the pool once, by init_pool.
  static void init(FFN& f, Shared&, const Options& o, index_t l) {
    const smoe::InitOptions io = ffn_init(o, l);
    smoe::fill_normal(f.router().weight().value, io.scale / std::sqrt(double(o.d_model)), io.seed, 0);
    smoe::renormalize_rows_keep_std(f.router().weight().value.matrix());
  }
  static void init_pool(Shared& pool, const Options& o) {
    smoe::init_expert_pool(pool, {.scale = init_scale(o), .seed = mix_seed(std::uint64_t(o.seed), 999)});
  }
};

template <class B>
using SaMoEKind = SaMoESpaceKind<B, smoe::WeightSpace>;
template <class B>
using SaMoEOutputKind = SaMoESpaceKind<B, smoe::OutputSpace>;

template <class B>
struct PkmKind {
  using FFN = MoELayer<B, smoe::ProductKeyRouter<T, B>, smoe::ValueExperts<T, B>>;
  using Shared = smoe::NoShared;
  static Shared make_shared(const Options&) { return {}; }
  static FFN make_ffn(const Options& o, index_t, Shared&) {
    return FFN(smoe::ProductKeyRouter<T, B>({.d_model = o.d_model, .n_keys = o.pkm_keys, .heads = o.pkm_heads, .k = o.k}),
               smoe::ValueExperts<T, B>({.d_model = o.d_model, .values = o.pkm_keys * o.pkm_keys}));
  }
  static void init(FFN& f, Shared&, const Options& o, index_t l) { smoe::pkm_init(f, ffn_init(o, l)); }
};

// The sigma-MoE paper's softmax baselines: sigma-moe's router, experts, entropy regularization and
// expert dropout with softmax gates, renormalized over the K selected logits or not.
template <class B>
struct SoftmaxMoEKind {
  using Router = smoe::SoftmaxTopK<T, B>;
  using FFN = MoELayer<B, Router, smoe::ReluExperts<T, B>, smoe::EntropyLoss<T, B>>;
  using Shared = smoe::NoShared;
  static Shared make_shared(const Options&) { return {}; }
  static Router make_router(const Options& o, index_t l, std::uint64_t first_token = 0) {
    return Router({.d_model = o.d_model, .experts = o.experts, .k = o.k, .expert_dropout = dropout(o, l, first_token)},
                  smoe::SoftmaxGate{.renormalize = o.softmax_renorm});
  }
  static smoe::EntropyLoss<T, B> make_loss(const Options& o) { return smoe::EntropyLoss<T, B>(o.entropy_coef); }
  static FFN make_ffn(const Options& o, index_t l, Shared&) {
    FFN f(make_router(o, l), relu_experts<B>(o, o.experts), {}, make_loss(o));
    f.capacity.capacity_factor = o.capacity_factor;
    return f;
  }
  static void init(FFN& f, Shared&, const Options& o, index_t l) { smoe::sigma_moe_init(f, ffn_init(o, l)); }
};

// The sigma-MoE router of layer l, initialized as sigma_moe_init does (rows renormalized), for the
// kinds whose experts are not the layer's own.
template <class Router>
void init_sigma_router(Router& router, const Options& o, index_t l) {
  const smoe::InitOptions io = ffn_init(o, l);
  smoe::fill_normal(router.weight().value, io.scale / std::sqrt(double(o.d_model)), io.seed, 0);
  smoe::renormalize_rows_keep_std(router.weight().value.matrix());
}

// WideNet: one set of E experts that every layer uses (the model owns it, "experts.…"), a sigma-MoE
// router per layer. The set has one layer's expert parameters: L times fewer than sigma-moe.
template <class B>
struct TiedKind {
  using Experts = smoe::TiedExperts<T, smoe::Relu, B>;
  using FFN = MoELayer<B, smoe::SigmoidTopK<T, B>, Experts, smoe::EntropyLoss<T, B>>;
  using Shared = smoe::FeedForwardExperts<T, smoe::Relu, B>;
  static Shared make_shared(const Options& o) {
    return Shared({.d_model = o.d_model, .experts = o.experts, .hidden = o.expert_size});
  }
  static FFN make_ffn(const Options& o, index_t l, Shared& set) {
    FFN f(smoe::SigmoidTopK<T, B>({.d_model = o.d_model, .experts = o.experts, .k = o.k, .expert_dropout = dropout(o, l)}),
          Experts(set), {}, smoe::EntropyLoss<T, B>(o.entropy_coef));
    f.capacity.capacity_factor = o.capacity_factor;
    return f;
  }
  static void init(FFN& f, Shared&, const Options& o, index_t l) { init_sigma_router(f.router(), o, l); }
  // The set as sigma_moe_init initializes one layer's experts.
  static void init_pool(Shared& set, const Options& o) {
    const std::uint64_t seed = mix_seed(std::uint64_t(o.seed), 998);
    const double d = double(o.d_model), dff = double(o.experts * o.expert_size);
    smoe::fill_normal(set.w1().value, init_scale(o) / std::sqrt(d), seed, 1);
    smoe::fill_normal(set.w2().value, init_scale(o) / std::sqrt(dff), seed, 2);
  }
};

// PR-MoE's residual expert around a sigma-MoE layer: y = c0·MoE(x) + c1·MLP(x), MLP of G units (the
// pyramid half of PR-MoE, more experts in later layers, is not a train_lm kind: every layer of a
// Model has the same configuration). K defaults to 3, so K·G + G equals sigma-moe's K·G.
template <class B>
struct PrMoEKind {
  using FFN = smoe::ResidualMoE<typename SigmaKind<B>::FFN, smoe::Relu>;
  using Shared = smoe::NoShared;
  static Shared make_shared(const Options&) { return {}; }
  static FFN make_ffn(const Options& o, index_t l, Shared& none) {
    return FFN(SigmaKind<B>::make_ffn(o, l, none), {.hidden = o.expert_size});
  }
  // The inner layer as sigma-moe; the residual MLP with sigma-MoE's W1 std and W2 std = scale·(E·G)^-1/2
  // (the same as an expert's); the mixing weights 0: the two halves start mixed evenly.
  static void init(FFN& f, Shared& none, const Options& o, index_t l) {
    SigmaKind<B>::init(f.moe(), none, o, l);
    const smoe::InitOptions io = ffn_init(o, l);
    const double d = double(o.d_model), dff = double(o.experts * o.expert_size);
    smoe::fill_normal(f.residual().w1().value, io.scale / std::sqrt(d), io.seed, 3);
    smoe::fill_normal(f.residual().w2().value, io.scale / std::sqrt(dff), io.seed, 4);
    f.mix().value.zero();
  }
};

// DeepSeekMoE's shared experts around a sigma-MoE layer: y = MoE(x) + FFN_shared(x), one shared
// expert of G units. K defaults to 3, so K·G + G equals sigma-moe's K·G.
template <class B>
struct SharedExpertsKind {
  using FFN = smoe::SharedExpertsMoE<typename SigmaKind<B>::FFN, smoe::Relu>;
  using Shared = smoe::NoShared;
  static Shared make_shared(const Options&) { return {}; }
  static FFN make_ffn(const Options& o, index_t l, Shared& none) {
    return FFN(SigmaKind<B>::make_ffn(o, l, none), {.experts = 1, .hidden = o.expert_size});
  }
  // The inner layer as sigma-moe; the shared expert with an expert's init.
  static void init(FFN& f, Shared& none, const Options& o, index_t l) {
    SigmaKind<B>::init(f.moe(), none, o, l);
    const smoe::InitOptions io = ffn_init(o, l);
    const double d = double(o.d_model), dff = double(o.experts * o.expert_size);
    smoe::fill_normal(f.shared().w1().value, io.scale / std::sqrt(d), io.seed, 3);
    smoe::fill_normal(f.shared().w2().value, io.scale / std::sqrt(dff), io.seed, 4);
  }
};

template <class Kind, class B = smoe::backend_of_t<typename Kind::FFN>>
using BlockOf = smoe::TransformerBlock<smoe::CausalSelfAttention<T, B>, typename Kind::FFN, smoe::RMSNorm<T, B>>;
template <class Kind>
using ModelOf = smoe::Model<BlockOf<Kind>, typename Kind::Shared>;

// The model of `o` on the kind's backend, its weights not yet set.
template <class Kind>
std::unique_ptr<ModelOf<Kind>> make_model(const Options& o, typename Kind::Shared shared) {
  using Attn = typename BlockOf<Kind>::attention_type;
  auto make_block = [&](index_t l, typename Kind::Shared& sh) {
    return BlockOf<Kind>(Attn({.d_model = o.d_model, .heads = o.heads}), Kind::make_ffn(o, l, sh));
  };
  return std::make_unique<ModelOf<Kind>>(
      smoe::ModelConfig{.vocab = vocab, .d_model = o.d_model, .layers = o.layers, .tie_embeddings = o.tie_embeddings},
      std::move(shared), make_block);
}
template <class Kind>
std::unique_ptr<ModelOf<Kind>> make_model(const Options& o) {
  return make_model<Kind>(o, Kind::make_shared(o));
}

// The CPU model of `o` with its initialization: every weight N(0, σ²) from the seed. Embedding
// σ = 1 (d^-1/2 when tied to the head), head σ = d^-1/2 (unit-variance logits after the final
// norm), attention projections σ = sqrt(2/L)·d^-1/2, the FFN by its kind's init with the same
// scale; norm gains 1.
template <class Kind>
std::unique_ptr<ModelOf<Kind>> build_model(const Options& o) {
  auto model = make_model<Kind>(o);
  const double d = double(o.d_model), inv_sqrt_d = 1.0 / std::sqrt(d);
  std::uint64_t stream = 0;
  model->for_each_parameter([&](std::string_view name, auto& p) {
    ++stream;
    const std::uint64_t seed = mix_seed(std::uint64_t(o.seed), 7);
    if (name == "embed.weight")
      smoe::fill_normal(p.value, o.tie_embeddings ? inv_sqrt_d : 1.0, seed, stream);
    else if (name == "head.weight")
      smoe::fill_normal(p.value, inv_sqrt_d, seed, stream);
    else if (name.ends_with("attn.qkv.weight") || name.ends_with("attn.out.weight"))
      smoe::fill_normal(p.value, init_scale(o) * inv_sqrt_d, seed, stream);
  });
  if constexpr (requires { Kind::init_pool(model->shared(), o); }) Kind::init_pool(model->shared(), o);
  for (index_t l = 0; l < model->layers(); ++l) Kind::init(model->block(l).ffn(), model->shared(), o, l);
  return model;
}

// Before a forward whose parameters stay fixed (the micro-batches of one step, an evaluation):
// a weight-space SaMoE layer materializes its combined experts once.
template <class Model>
void prepare(Model& model) {
  if constexpr (requires(Model & m) { m.block(0).ffn().experts().freeze(); })
    for (index_t l = 0; l < model.layers(); ++l) model.block(l).ffn().experts().freeze();
}


inline bool is_moe(const std::string& ffn) { return ffn != "dense" && ffn != "topk"; }

// ============================================================================================
// Logging helpers
// ============================================================================================

inline std::string fmt(const char* format, auto... args) {
  char buf[512];
  std::snprintf(buf, sizeof buf, format, args...);
  return buf;
}

inline std::string duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const auto s = std::int64_t(seconds + 0.5);
  if (s >= 3600) return fmt("%lld:%02lld:%02lld", (long long)(s / 3600), (long long)(s / 60 % 60), (long long)(s % 60));
  return fmt("%lld:%02lld", (long long)(s / 60), (long long)(s % 60));
}

inline std::string thousands(double v) {
  std::string s = std::to_string(std::llround(v)), out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (i > 0 && (s.size() - i) % 3 == 0 && s[i - 1] != '-') out += ',';
    out += s[i];
  }
  return out;
}

inline const char* csv_header =
    "step,tokens,lr,train_loss,train_bpb,aux_loss,grad_norm,val_loss,val_bpb,val_tokens,elapsed_s,tokens_per_s";

// Opens a CSV log. Resuming at step s keeps the rows of steps <= s of an existing log with the
// same header, so the log reads as one uninterrupted run; otherwise the file starts afresh.
inline std::ofstream open_log(const std::string& path, const std::string& header, std::int64_t resume_step, bool resuming) {
  std::vector<std::string> kept;
  if (resuming) {
    std::ifstream in(path);
    std::string line;
    if (in && std::getline(in, line) && line == header) {
      while (std::getline(in, line)) {
        std::int64_t step = 0;
        const auto r = std::from_chars(line.data(), line.data() + line.size(), step);
        if (r.ec == std::errc() && step <= resume_step) kept.push_back(line);
      }
    }
  }
  std::ofstream out(path, std::ios::trunc);
  if (!out) throw usage_error("cannot write '" + path + "'");
  out << header << "\n";
  for (const auto& l : kept) out << l << "\n";
  out.flush();
  return out;
}

// Routing statistics summed over the steps of one --stats-every interval, per MoE layer.
struct StatsWindow {
  std::vector<smoe::RoutingStats> sum;  // per layer
  std::vector<double> entropy_sum;
  std::int64_t forwards = 0;

  void add(const std::vector<smoe::LayerRoutingStats>& routing) {
    if (sum.size() < routing.size()) sum.resize(routing.size()), entropy_sum.resize(routing.size());
    for (std::size_t i = 0; i < routing.size(); ++i) {
      const smoe::RoutingStats& s = routing[i].stats;
      smoe::RoutingStats& a = sum[i];
      if (a.tokens_per_expert.size() < s.tokens_per_expert.size())
        a.tokens_per_expert.resize(s.tokens_per_expert.size());
      for (std::size_t e = 0; e < s.tokens_per_expert.size(); ++e) a.tokens_per_expert[e] += s.tokens_per_expert[e];
      a.assignments += s.assignments;
      a.dropped += s.dropped;
      a.tokens_without_expert += s.tokens_without_expert;
      entropy_sum[i] += s.routing_entropy;
    }
    ++forwards;
  }
  // The merged statistics of layer i: summed counts, mean routing entropy, CV of the summed load.
  smoe::RoutingStats merged(std::size_t i) const {
    smoe::RoutingStats s = sum[i];
    s.fraction_dropped = s.assignments + s.dropped == 0 ? 0.0 : double(s.dropped) / double(s.assignments + s.dropped);
    s.routing_entropy = forwards ? entropy_sum[i] / double(forwards) : 0.0;
    const double E = double(s.tokens_per_expert.size()), mean = double(s.assignments) / E;
    double var = 0;
    for (index_t c : s.tokens_per_expert) var += (double(c) - mean) * (double(c) - mean) / E;
    s.load_cv = mean > 0 ? std::sqrt(var) / mean : 0.0;
    return s;
  }
  void clear() { *this = StatsWindow{}; }
  void merge(const StatsWindow& o) {
    if (sum.size() < o.sum.size()) sum.resize(o.sum.size()), entropy_sum.resize(o.sum.size());
    for (std::size_t i = 0; i < o.sum.size(); ++i) {
      smoe::RoutingStats& a = sum[i];
      const smoe::RoutingStats& b = o.sum[i];
      if (a.tokens_per_expert.size() < b.tokens_per_expert.size())
        a.tokens_per_expert.resize(b.tokens_per_expert.size());
      for (std::size_t e = 0; e < b.tokens_per_expert.size(); ++e) a.tokens_per_expert[e] += b.tokens_per_expert[e];
      a.assignments += b.assignments, a.dropped += b.dropped, a.tokens_without_expert += b.tokens_without_expert;
      entropy_sum[i] += o.entropy_sum[i];
    }
    forwards += o.forwards;
  }
};

// A gnuplot script next to the stats CSV: per layer the share of each expert over training, and
// the load CV of every layer; run when gnuplot is installed.
inline void plot_expert_load(const std::string& csv, index_t layers, index_t experts, const std::string& title) {
  std::string base = csv;
  if (base.size() > 4 && base.ends_with(".csv")) base.resize(base.size() - 4);
  const std::string gp = base + ".gp", png = base + ".png";
  const bool per_expert = experts <= 64;
  const index_t panels = (per_expert ? layers : 0) + 1;
  {
    std::ofstream g(gp);
    g << "# Expert load over training, from " << csv << " (train_lm --stats): gnuplot " << gp << "\n"
      << "set datafile separator ','\n"
      << "set terminal png size 1000," << 260 * panels + 60 << "\n"
      << "set output '" << png << "'\n"
      << "set multiplot layout " << panels << ",1 title '" << title << "'\n"
      << "set xlabel 'step'\nset grid\nset key outside right\nset rmargin 16\n";
    if (per_expert)
      g << "do for [l=0:" << layers - 1 << "] {\n"
        << "  set title sprintf('layer %d: share of the assignments per expert', l)\n"
        << "  set ylabel 'share'\n"
        << "  plot for [e=0:" << experts - 1 << "] '" << csv << "' skip 1 every " << layers
        << "::l using 1:(column(9+e)/column(3)) with lines notitle\n"
        << "}\n";
    g << "set title 'load CV (std / mean of the tokens per expert)'\nset ylabel 'CV'\n"
      << "plot for [l=0:" << layers - 1 << "] '" << csv << "' skip 1 every " << layers
      << "::l using 1:8 with lines title sprintf('layer %d', l)\n"
      << "unset multiplot\n";
  }
  if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) {
    std::cout << "expert load: gnuplot is not installed; " << gp << " plots " << csv << " when it is\n";
    return;
  }
  const std::string cmd = "gnuplot '" + gp + "' 2>&1";
  if (std::system(cmd.c_str()) == 0)
    std::cout << "expert load: plotted " << png << "\n";
  else
    std::cout << "expert load: gnuplot failed on " << gp << " (the CSV is complete)\n";
}

inline volatile std::sig_atomic_t interrupted = 0;
extern "C" inline void on_signal(int sig) { interrupted = sig; }

inline bool stdout_is_terminal() {
#if defined(TRAIN_LM_HAS_ISATTY)
  return isatty(fileno(stdout)) != 0;
#else
  return false;
#endif
}

// ============================================================================================
// The run
// ============================================================================================

// One process trains the whole batch: Run's default Ranks.
struct SingleProcess {
  int rank() const { return 0; }
  int size() const { return 1; }
};

// The sequences [first, first + count) of a batch of B that one rank runs, and its share of the
// batch's mean loss, count / B.
struct BatchSlice {
  index_t first = 0, count = 0;
  double weight = 1;
};

// Rank r of P runs sequences [r·B/P, (r+1)·B/P) of a batch of B (the first B % P ranks one more).
inline BatchSlice batch_slice(index_t B, int rank, int ranks) {
  const index_t P = ranks, r = rank, first = r * (B / P) + std::min(r, B % P);
  const index_t count = B / P + (r < B % P ? 1 : 0);
  return {first, count, double(count) / double(B)};
}

// A run: the model of HostKind (always on the CPU) is built and initialized there (host_); it
// trains itself, or a twin (twin_) of TrainKind takes its parameters and trains:
//   --device cuda      the same kind on the device
//   --expert-parallel  Ranks (train_lm_expert_parallel.cpp) has the communicator: this rank's
//                      share of every MoE layer's experts (TrainKind = ExpertParallelKind), the
//                      batch split by sequences, replicated gradients summed over ranks
// The CPU model holds what a checkpoint saves and what sampling reads; a checkpoint holds the
// whole model, whatever the ranks.
template <class HostKind, class TrainKind, class Ranks = SingleProcess>
class Run {
 public:
  using HostModel = ModelOf<HostKind>;
  using Model = ModelOf<TrainKind>;
  using B = smoe::backend_of_t<typename TrainKind::FFN>;
  static constexpr bool on_device = !std::is_same_v<B, smoe::cpu>;
  static constexpr bool distributed = !std::is_same_v<Ranks, SingleProcess>;

  explicit Run(Options& o, Ranks ranks = {}) : o_(o), ranks_(std::move(ranks)), host_(build_model<HostKind>(o)) {
    if constexpr (on_device || distributed) {
      if constexpr (distributed)
        twin_ = make_model<TrainKind>(o, TrainKind::make_shared(o, ranks_));
      else
        twin_ = make_model<TrainKind>(o);
      upload();
      model_ = twin_.get();
    } else {
      model_ = host_.get();
    }
  }

  int sample() {
    smoe::io::load_checkpoint(checkpoint_path(), *host_, {.allow_extra = true});
    std::cerr << "train_lm: sampling " << o_.sample << " bytes from '" << checkpoint_path() << "' (" << o_.ffn << ", "
              << thousands(double(host_->total_parameters())) << " parameters), temperature " << o_.temperature
              << ", top-k " << o_.top_k << ", seed " << o_.seed << "\n";
    prepare(*host_);
    std::vector<std::int32_t> text;
    for (unsigned char c : o_.prompt) text.push_back(c);
    if (text.empty()) text.push_back('\n');
    std::cout << o_.prompt << std::flush;
    const std::uint64_t seed = mix_seed(std::uint64_t(o_.seed), 3000);
    std::vector<double> p(vocab);
    for (std::int64_t i = 0; i < o_.sample; ++i) {
      const std::size_t n = std::min<std::size_t>(text.size(), std::size_t(o_.context));
      const std::span<const std::int32_t> window(text.data() + text.size() - n, n);
      host_->forward_logits(window, 1, smoe::Mode::eval);
      const T* z = host_->logits().row(index_t(n) - 1);
      const int next = choose(z, p, smoe::uniform01(seed, std::uint64_t(i)));
      text.push_back(next);
      std::cout.put(char(next));
      if (i % 16 == 15) std::cout.flush();
    }
    std::cout << "\n";
    return 0;
  }

  int train(const Corpus& corpus) {
    const bool resuming = !o_.resume.empty();
    smoe::AdamW<T, B> opt(adamw_config(), no_decay());
    sampler_ = {&corpus, mix_seed(std::uint64_t(o_.seed), 4000), 0};
    if (resuming) {
      smoe::io::Counters c = counter_keys();
      smoe::AdamW<T> host_opt(adamw_config(), no_decay());
      smoe::io::load_checkpoint(o_.resume, *host_, host_opt, c);
      if constexpr (on_device) {
        opt.restore(host_opt.steps(), host_opt.state());
        upload();
      } else if constexpr (distributed) {
        opt.restore(host_opt.steps(), shard_state(host_opt.state()));
        upload();
      } else {
        opt = std::move(host_opt);
      }
      if (c.at("data.bytes") != corpus.bytes.size() || c.at("data.hash") != corpus.hash)
        throw usage_error("--data '" + o_.data + "' is not the file the checkpoint '" + o_.resume +
                          "' was trained on (" + std::to_string(c.at("data.bytes")) + " bytes)");
      step_ = std::int64_t(c.at("step"));
      sampler_.position = c.at("data_position");
      train_us_ = c.at("train_us");
      warmup_progress_ = std::bit_cast<double>(c.at("sched.warmup_progress"));
      model_->for_each_counter(
          [&](std::string_view name, std::uint64_t& v) { v = c.at("model." + std::string(name)); });
      std::cout << "resumed '" << o_.resume << "' at step " << step_ << " (" << duration(double(train_us_) * 1e-6)
                << " of training)\n";
    }
    print_header(corpus);
    if (o_.steps != unlimited && step_ >= o_.steps) {
      std::cout << "nothing to train: the checkpoint is at step " << step_ << " of --steps " << o_.steps << "\n";
      return 0;
    }
    if (o_.minutes > 0 && double(train_us_) * 1e-6 >= o_.minutes * 60.0) {
      std::cout << "nothing to train: the checkpoint has used the --minutes " << o_.minutes << " budget\n";
      return 0;
    }

    std::ofstream log, stats;
    if (!o_.log.empty()) log = open_log(o_.log, csv_header, step_, resuming);
    const index_t E = stats_experts();
    if (!o_.stats.empty()) {
      std::ostringstream h;
      smoe::write_routing_stats_csv_header(h, E);
      std::string header = h.str();
      header.pop_back();
      stats = open_log(o_.stats, header, step_, resuming);
    }
    const auto windows = eval_windows(corpus, o_.context, o_.eval_tokens);
    const std::int64_t save_every = o_.save_every > 0 ? o_.save_every : o_.eval_every;
    const index_t batch = o_.batch, L = o_.context;
    const double tokens_per_step = double(batch * L * o_.accum);
    const double budget_s = o_.minutes * 60.0;
    const bool tty = stdout_is_terminal();
    model_->set_timing(o_.timing);
    std::signal(SIGINT, on_signal);
    std::signal(SIGTERM, on_signal);

    const std::int64_t first_step = step_;
    double session_s = 0, print_loss = 0, last_val = -1;
    std::int64_t print_n = 0, skipped = 0;
    int stopped_by = 0;  // the signal that ended the run
    std::vector<std::int32_t> ids, targets;
    StatsWindow window, last_window;
    enum class End { none, steps, budget, stop_at, signal } end = End::none;
    const BatchSlice part = slice(batch);  // this rank's sequences of every batch
    while (end == End::none) {
      const auto t0 = std::chrono::steady_clock::now();
      const double lr = learning_rate(double(train_us_) * 1e-6);
      smoe::zero_grad(*model_);
      prepare(*model_);
      double loss = 0, aux = 0;
      for (std::int64_t m = 0; m < o_.accum; ++m) {
        sampler_.next(batch, L, ids, targets);
        keep_slice(part, L, ids, targets);
        const smoe::ModelOutput out = model_->forward(ids, targets, part.count, smoe::Mode::train);
        model_->backward(part.weight);
        loss += out.loss * part.weight / double(o_.accum);  // summed over ranks below
        aux += out.aux_loss / double(o_.accum);             // the global batch's already
        window.add(routing_stats(out));
      }
      if constexpr (distributed) smoe::allreduce_gradients(*model_, ranks_.comm(), smoe::Reduction::sum);
      if (o_.accum > 1) smoe::scale_gradients(*model_, 1.0 / double(o_.accum));
      const smoe::ClipResult clip = clip_gradients();
      if (clip.finite()) {
        opt.set_lr(lr);
        opt.step(*model_);
      } else {
        ++skipped;
      }
      ++step_;
      double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      int sig = interrupted;  // read once per step
      if constexpr (distributed) {
        // One agreement per step: the batch's loss, the mean step time and whether any rank was
        // signalled, so that every rank follows the same schedule (--minutes) and stops together.
        double v[3] = {loss, dt, sig != 0 ? 1.0 : 0.0};
        ranks_.comm().all_reduce_sum(std::span<double>(v));
        loss = v[0], dt = v[1] / double(ranks_.size());
        if (v[2] > 0 && sig == 0) sig = SIGTERM;  // another rank's signal
      }
      session_s += dt;
      train_us_ += std::uint64_t(dt * 1e6);
      if (step_ == o_.warmup && budget_s > 0) warmup_progress_ = progress(double(train_us_) * 1e-6);

      const double elapsed = double(train_us_) * 1e-6;
      if (o_.steps != unlimited && step_ >= o_.steps)
        end = End::steps;
      else if (budget_s > 0 && elapsed >= budget_s)
        end = End::budget;
      else if (o_.stop_at > 0 && step_ >= o_.stop_at)
        end = End::stop_at;
      else if (sig != 0)
        end = End::signal, stopped_by = sig;
      const bool finished = end == End::steps || end == End::budget;

      // Validation: periodic on a subset, and at the end on --final-eval-tokens.
      std::optional<std::pair<double, std::int64_t>> val;
      if (corpus.val_size() > 0 && (step_ % o_.eval_every == 0 || finished)) {
        val = finished ? evaluate(corpus, eval_windows(corpus, L, o_.final_eval_tokens)) : evaluate(corpus, windows);
        last_val = val->first;
      }
      const double tps = double(step_ - first_step) * tokens_per_step / session_s;
      if (log.is_open() && (step_ % o_.log_every == 0 || end != End::none || val)) {
        log << step_ << "," << std::int64_t(double(step_) * tokens_per_step) << "," << fmt("%.6g", lr) << ","
            << fmt("%.17g", loss) << "," << fmt("%.6f", loss / ln2) << "," << fmt("%.9g", aux) << ","
            << fmt("%.6g", clip.norm) << ",";
        if (val)
          log << fmt("%.17g", val->first) << "," << fmt("%.6f", val->first / ln2) << "," << val->second;
        else
          log << ",,";
        log << "," << fmt("%.3f", elapsed) << "," << fmt("%.1f", tps) << "\n";
        log.flush();
      }
      if (!window.sum.empty() && (step_ % o_.stats_every == 0 || end != End::none)) {
        if (stats.is_open()) {
          for (std::size_t l = 0; l < window.sum.size(); ++l)
            smoe::write_routing_stats_csv_row(stats, step_, int(l), window.merged(l));
          stats.flush();
        }
        // The summary at the end covers at least one whole interval.
        if (end != End::none && window.forwards < o_.stats_every * o_.accum) window.merge(last_window);
        last_window = window;
        window.clear();
      }

      // Progress.
      print_loss += loss, ++print_n;
      if (tty || step_ % o_.print_every == 0 || end != End::none || val) {
        double eta = o_.steps != unlimited ? double(o_.steps - step_) * session_s / double(step_ - first_step)
                                           : std::numeric_limits<double>::infinity();
        if (budget_s > 0) eta = std::min(eta, budget_s - elapsed);
        const double shown = print_loss / double(print_n);
        std::string line = fmt("step %lld", (long long)step_) +
                           (o_.steps != unlimited ? fmt("/%lld", (long long)o_.steps) : std::string()) +
                           fmt(" | loss %.4f (%.3f bpb)", shown, shown / ln2) +
                           (last_val >= 0 ? fmt(" | val %.3f bpb", last_val / ln2) : std::string()) +
                           fmt(" | %s tok/s | lr %.2e | %s elapsed, ETA %s", thousands(tps).c_str(), lr,
                               duration(elapsed).c_str(), duration(end != End::none ? 0.0 : eta).c_str());
        const bool newline = !tty || val || end != End::none || step_ % o_.print_every == 0;
        if (tty)
          std::cout << "\r" << line << "\033[K";
        else
          std::cout << line;
        if (newline) std::cout << "\n";
        std::cout.flush();
        if (newline) print_loss = 0, print_n = 0;
      }

      if (!o_.save.empty() && (step_ % save_every == 0 || end != End::none)) save(opt);
    }

    // Summary.
    std::cout << "\n";
    if (o_.timing) {
      smoe::print_times(std::cout, model_->times());
      const double steps = double(step_ - first_step), outside = session_s - model_->times().total();
      std::cout << fmt("outside the model (data, zero_grad, clipping, AdamW): %.3f s, %.3f ms/step\n", outside,
                       1e3 * outside / steps);
    }
    if (!last_window.sum.empty()) print_expert_usage(last_window);
    if (!o_.stats.empty() && !last_window.sum.empty())
      plot_expert_load(o_.stats, index_t(last_window.sum.size()), E, "expert load, --ffn " + o_.ffn);
    if (skipped > 0) std::cout << "skipped " << skipped << " steps with non-finite gradients\n";
    const double tps = double(step_ - first_step) * tokens_per_step / session_s;
    std::cout << "final: ffn=" << o_.ffn << " steps=" << step_ << " train_s=" << fmt("%.1f", double(train_us_) * 1e-6)
              << " tokens=" << std::int64_t(double(step_) * tokens_per_step) << " tokens_per_s=" << fmt("%.1f", tps)
              << " steps_per_s=" << fmt("%.3f", double(step_ - first_step) / session_s)
              << " parameters=" << host_->total_parameters()
              << " active_per_token=" << std::llround(per_token().first);
    if (last_val >= 0) std::cout << " val_loss=" << fmt("%.5f", last_val) << " val_bpb=" << fmt("%.4f", last_val / ln2);
    std::cout << "\n";
    if (end == End::signal) {
      std::cout << "interrupted" << (o_.save.empty() ? "" : "; resume with --resume " + o_.save) << "\n";
      return 128 + stopped_by;
    }
    if (end == End::stop_at) std::cout << "stopped at step " << step_ << " (--stop-at)\n";
    return 0;
  }

 private:
  const std::string& checkpoint_path() const { return o_.resume.empty() ? o_.save : o_.resume; }

  // Every counter a checkpoint of this run holds, with its current value.
  smoe::io::Counters counter_keys() {
    smoe::io::Counters c;
    for (const Persisted& s : persisted_settings()) c[s.key] = s.get(o_);
    for (const std::string& k : run_counters) c[k] = 0;
    model_->for_each_counter([&](std::string_view name, std::uint64_t& v) { c["model." + std::string(name)] = v; });
    return c;
  }

  smoe::AdamWConfig adamw_config() const { return {.lr = o_.lr, .weight_decay = o_.weight_decay}; }
  static smoe::NoDecayRule no_decay() {
    return smoe::no_decay_if_name_ends_with({"norm.weight", "norm.bias", ".b1", ".b2", ".combine"});
  }

  // CPU model → the twin: parameters (on the device, or this rank's expert shards) and counters
  // (the routers' steps).
  void upload() {
    if constexpr (on_device) {
      copy_parameters_to_device(*host_, *twin_);
    } else {
      const auto full = host_parameters();
      twin_->for_each_parameter([&](std::string_view name, smoe::Parameter<T>& p) {
        p.value = shard_of(name, full.at(std::string(name))->value);
      });
    }
    copy_counters(*host_, *twin_);
  }
  // The twin → CPU model, before a checkpoint (collective under --expert-parallel: every rank
  // gathers every layer's experts).
  void download() {
    if constexpr (on_device) {
      for_each_parameter_pair(*host_, *twin_, [](std::string_view, auto& hp, auto& dp) { hp.value = to_host(dp.value); });
    } else {
      const auto full = host_parameters();
      twin_->for_each_parameter([&](std::string_view name, smoe::Parameter<T>& p) {
        gather(name, p.value, full.at(std::string(name))->value);
      });
    }
    copy_counters(*twin_, *host_);
  }
  std::map<std::string, smoe::Parameter<T>*> host_parameters() {
    std::map<std::string, smoe::Parameter<T>*> by_name;
    host_->for_each_parameter([&](std::string_view name, smoe::Parameter<T>& p) { by_name[std::string(name)] = &p; });
    return by_name;
  }
  template <class From, class To>
  static void copy_counters(From& from, To& to) {
    std::map<std::string, std::uint64_t, std::less<>> values;
    from.for_each_counter([&](std::string_view name, std::uint64_t& v) { values[std::string(name)] = v; });
    to.for_each_counter([&](std::string_view name, std::uint64_t& v) { v = values.at(std::string(name)); });
  }

  // --expert-parallel: whether the twin's parameter `name` is this rank's shard of the whole
  // model's tensor (a block of its leading dimension, this rank's experts).
  bool is_shard(std::string_view name) const {
    return smoe::gradient_sharding(*twin_, name) == smoe::GradientSharding::sharded;
  }
  smoe::Tensor<T> shard_of(std::string_view name, const smoe::Tensor<T>& whole) const {
    if (!is_shard(name)) return whole;
    std::vector<index_t> shape(whole.shape().begin(), whole.shape().end());
    shape[0] /= ranks_.size();
    smoe::Tensor<T> part(shape);
    const T* from = whole.data() + index_t(ranks_.rank()) * part.size();
    std::copy(from, from + part.size(), part.data());
    return part;
  }
  // Every rank's shard into `whole` (every rank takes part; replicated tensors are copied).
  void gather(std::string_view name, const smoe::Tensor<T>& part, smoe::Tensor<T>& whole) {
    if (!is_shard(name)) {
      whole = part;
      return;
    }
    std::fill(whole.data(), whole.data() + whole.size(), T(0));
    std::copy(part.data(), part.data() + part.size(), whole.data() + index_t(ranks_.rank()) * part.size());
    ranks_.comm().all_reduce_sum(std::span<T>(whole.data(), std::size_t(whole.size())));
  }
  // A checkpoint's AdamW moments → this rank's (the shards of the experts' moments).
  typename smoe::AdamW<T>::StateMap shard_state(const typename smoe::AdamW<T>::StateMap& whole) const {
    typename smoe::AdamW<T>::StateMap out;
    for (const auto& [name, st] : whole)
      out.emplace(name, typename smoe::AdamW<T>::State{shard_of(name, st.m), shard_of(name, st.v)});
    return out;
  }

  // The routing statistics of the last forward, per routing layer: of the whole batch under
  // --expert-parallel (counts summed over ranks; the routing entropy the ranks' entropies weighted
  // by their shares of the batch, not the entropy of the batch's mean distribution); on the device
  // each layer copies its routing to the host.
  std::vector<smoe::LayerRoutingStats> routing_stats(const smoe::ModelOutput& out) {
    std::vector<smoe::LayerRoutingStats> r;
    if constexpr (on_device) {
      if constexpr (requires { twin_->block(0).ffn().routing_stats(); })
        for (index_t l = 0; l < twin_->layers(); ++l) r.push_back({l, twin_->block(l).ffn().routing_stats()});
      return r;
    } else {
      r = out.routing;
      if constexpr (distributed) {
        std::vector<double> v;
        for (const auto& layer : r) {
          const smoe::RoutingStats& st = layer.stats;
          for (index_t c : st.tokens_per_expert) v.push_back(double(c));
          v.insert(v.end(), {double(st.assignments), double(st.dropped), double(st.tokens_without_expert),
                             st.routing_entropy * slice(o_.batch).weight});
        }
        ranks_.comm().all_reduce_sum(std::span<double>(v));
        std::size_t at = 0;
        for (auto& layer : r) {
          smoe::RoutingStats& st = layer.stats;
          for (index_t& c : st.tokens_per_expert) c = index_t(v[at++]);
          st.assignments = index_t(v[at++]), st.dropped = index_t(v[at++]);
          st.tokens_without_expert = index_t(v[at++]), st.routing_entropy = v[at++];
        }
      }
      return r;
    }
  }

  // This rank's sequences of a batch (all of them in one process).
  BatchSlice slice(index_t sequences) const { return batch_slice(sequences, ranks_.rank(), ranks_.size()); }
  // Keeps the rows of `part` of a batch of ids and targets (L per sequence).
  static void keep_slice(const BatchSlice& part, index_t L, std::vector<std::int32_t>& ids,
                         std::vector<std::int32_t>& targets) {
    if (part.first == 0 && part.count * L == index_t(ids.size())) return;
    for (auto* v : {&ids, &targets}) {
      v->erase(v->begin(), v->begin() + std::ptrdiff_t(part.first * L));
      v->resize(std::size_t(part.count * L));
    }
  }

  // Global gradient-norm clipping of the whole model (over ranks under --expert-parallel).
  smoe::ClipResult clip_gradients() {
    const double max_norm = o_.clip > 0 ? o_.clip : std::numeric_limits<double>::infinity();
    if constexpr (distributed) return smoe::clip_grad_norm(*model_, max_norm, ranks_.comm());
    else return smoe::clip_grad_norm(*model_, max_norm);
  }

  void save(const smoe::AdamW<T, B>& opt) {
    if constexpr (on_device) {
      download();
      smoe::AdamW<T> host_opt(opt.config(), no_decay());
      host_opt.restore(opt.steps(), opt.host_state());
      save_checkpoint(host_opt);
    } else if constexpr (distributed) {
      download();
      typename smoe::AdamW<T>::StateMap whole;
      const auto full = host_parameters();
      for (const auto& [name, st] : opt.state()) {  // the same names, in the same order, on every rank
        const auto& shape = full.at(name)->value.shape();
        typename smoe::AdamW<T>::State w{smoe::Tensor<T>(shape), smoe::Tensor<T>(shape)};
        gather(name, st.m, w.m);
        gather(name, st.v, w.v);
        whole.emplace(name, std::move(w));
      }
      smoe::AdamW<T> host_opt(opt.config(), no_decay());
      host_opt.restore(opt.steps(), std::move(whole));
      if (ranks_.rank() == 0) save_checkpoint(host_opt);
    } else {
      save_checkpoint(opt);
    }
  }

  void save_checkpoint(const smoe::AdamW<T>& opt) {
    smoe::io::Counters c = counter_keys();
    c["step"] = std::uint64_t(step_);
    c["data_position"] = sampler_.position;
    c["train_us"] = train_us_;
    c["sched.warmup_progress"] = std::bit_cast<std::uint64_t>(warmup_progress_);
    c["data.bytes"] = sampler_.corpus->bytes.size();
    c["data.hash"] = sampler_.corpus->hash;
    smoe::io::save_checkpoint(o_.save, *host_, opt, c);
  }

  // Training progress in [0, 1]: steps taken of --steps, or training time of --minutes.
  double progress(double elapsed_s) const {
    double p = 0;
    if (o_.steps != unlimited) p = double(step_) / double(o_.steps);
    if (o_.minutes > 0) p = std::max(p, elapsed_s / (o_.minutes * 60.0));
    return std::min(p, 1.0);
  }

  // Linear warm-up over --warmup steps, then cosine to --min-lr: by steps (smoe::CosineSchedule),
  // or with --minutes by the progress of the time budget from where the warm-up ended.
  double learning_rate(double elapsed_s) const {
    if (o_.minutes <= 0)
      return smoe::CosineSchedule({.peak_lr = o_.lr,
                                   .min_lr = o_.min_lr,
                                   .warmup_steps = std::uint64_t(o_.warmup),
                                   .total_steps = std::uint64_t(o_.steps)})(std::uint64_t(step_));
    if (step_ < o_.warmup) return o_.lr * double(step_) / double(o_.warmup);
    const double q = warmup_progress_ >= 1
                         ? 1.0
                         : std::clamp((progress(elapsed_s) - warmup_progress_) / (1 - warmup_progress_), 0.0, 1.0);
    return o_.min_lr + (o_.lr - o_.min_lr) * 0.5 * (1 + std::cos(std::numbers::pi * q));
  }

  // Mean cross-entropy (nats per byte) over the windows, and the bytes predicted. Batches of
  // --batch windows; under --expert-parallel each rank runs its slice of every batch (a last batch
  // with fewer windows than ranks joins the one before), and a rank without a window when there
  // are fewer windows than ranks runs the first one, uncounted: every rank takes part in every
  // forward.
  std::pair<double, std::int64_t> evaluate(const Corpus& corpus, const std::vector<std::size_t>& starts) {
    const bool timing = model_->timing();
    model_->set_timing(false);
    prepare(*model_);
    const index_t L = o_.context;
    const std::size_t per_batch = std::size_t(o_.batch), min_batch = std::size_t(ranks_.size());
    std::vector<std::int32_t> ids, targets;
    double totals[2] = {0, 0};  // [Σ loss · counted, counted]
    for (std::size_t first = 0; first < starts.size();) {
      std::size_t n = std::min(starts.size() - first, per_batch);
      if (starts.size() - first - n < min_batch) n = starts.size() - first;
      const BatchSlice part = slice(index_t(n));
      const bool counts = part.count > 0;
      const std::size_t from = first + std::size_t(part.first), rows = counts ? std::size_t(part.count) : 1;
      ids.resize(rows * std::size_t(L));
      targets.resize(ids.size());
      for (std::size_t b = 0; b < rows; ++b) {
        const std::size_t start = starts[counts ? from + b : first];
        for (index_t t = 0; t < L; ++t) {
          ids[b * std::size_t(L) + std::size_t(t)] = corpus.bytes[start + std::size_t(t)];
          targets[b * std::size_t(L) + std::size_t(t)] = corpus.bytes[start + std::size_t(t) + 1];
        }
      }
      const smoe::ModelOutput out = model_->forward(ids, targets, index_t(rows), smoe::Mode::eval);
      if (counts) totals[0] += out.loss * double(out.counted), totals[1] += double(out.counted);
      first += n;
    }
    if constexpr (distributed) ranks_.comm().all_reduce_sum(std::span<double>(totals));
    model_->set_timing(timing);
    const auto count = std::int64_t(totals[1]);
    return {count ? totals[0] / totals[1] : 0.0, count};
  }

  // A byte from the logits z: temperature, top-k, then inverse CDF at u.
  int choose(const T* z, std::vector<double>& p, double u) const {
    int best = 0;
    for (int c = 1; c < vocab; ++c)
      if (z[c] > z[best]) best = c;
    if (o_.temperature <= 0) return best;
    double cut = -std::numeric_limits<double>::infinity();
    if (o_.top_k > 0 && o_.top_k < vocab) {
      std::vector<double> sorted(z, z + vocab);
      std::nth_element(sorted.begin(), sorted.begin() + (o_.top_k - 1), sorted.end(), std::greater<>());
      cut = sorted[std::size_t(o_.top_k - 1)];
    }
    double total = 0;
    for (int c = 0; c < vocab; ++c) {
      p[std::size_t(c)] = double(z[c]) >= cut ? std::exp((double(z[c]) - double(z[best])) / o_.temperature) : 0.0;
      total += p[std::size_t(c)];
    }
    double acc = 0;
    for (int c = 0; c < vocab; ++c) {
      acc += p[std::size_t(c)] / total;
      if (u < acc) return c;
    }
    return best;
  }

  index_t stats_experts() const {
    if (o_.ffn == "pkm") return o_.pkm_keys * o_.pkm_keys;
    return is_moe(o_.ffn) ? o_.experts : 0;
  }

  // Active parameters and forward FLOPs per token.
  std::pair<double, double> per_token() {
    return {host_->active_parameters_per_token(), host_->flops_per_token(o_.context)};
  }

  void print_header(const Corpus& corpus) {
    const HostModel& m = *host_;
    const auto [active, flops] = per_token();
    std::cout << "train_lm: --ffn " << o_.ffn << ", d_model " << o_.d_model << ", " << o_.layers << " layers, "
              << o_.heads << " heads, context " << o_.context;
    if (o_.ffn == "dense") std::cout << ", d_ff " << o_.d_ff;
    if (o_.ffn == "topk") std::cout << ", d_ff " << o_.d_ff << ", top-" << o_.active << " active";
    if (o_.ffn == "pkm")
      std::cout << ", " << o_.pkm_keys * o_.pkm_keys << " values (" << o_.pkm_keys << "² keys), " << o_.pkm_heads
                << " heads, K " << o_.k;
    else if (is_moe(o_.ffn))
      std::cout << ", E " << o_.experts << ", G " << o_.expert_size << ", K " << o_.k;
    if (o_.ffn == "samoe")
      std::cout << ", pool of M " << o_.members << " (" << o_.samoe_init << " init, " << o_.samoe_space << " space)";
    if (o_.ffn == "softmax-moe") std::cout << (o_.softmax_renorm ? ", softmax over the K" : ", softmax over all E");
    if (o_.ffn == "pr-moe") std::cout << ", + residual MLP of " << o_.expert_size;
    if (o_.ffn == "shared-experts") std::cout << ", + 1 shared expert of " << o_.expert_size;
    std::cout << "\n";
    if constexpr (distributed) {
      const std::int64_t P = ranks_.size(), per = o_.batch / P;
      std::cout << "expert parallel: " << P << " ranks; rank r owns experts [r·" << o_.experts / P << ", (r+1)·"
                << o_.experts / P << ") of every MoE layer and runs " << per
                << (o_.batch % P ? " or " + std::to_string(per + 1) : std::string()) << " sequences of each batch\n";
    }
    std::cout << "parameters: " << thousands(double(m.total_parameters())) << " total, " << thousands(active)
              << " active per token; forward " << fmt("%.3f", flops * 1e-6) << " MFLOP/token\n";
    if (o_.ffn == "dense" || o_.ffn == "topk") {
      Options sigma = o_;
      sigma.ffn = "sigma-moe";
      std::cout << "parameters of the sigma-moe configuration it matches (E " << o_.experts << ", G " << o_.expert_size
                << "): " << thousands(double(build_model<SigmaKind<smoe::cpu>>(sigma)->total_parameters())) << "\n";
    }
    std::cout << "data: '" << o_.data << "', " << thousands(double(corpus.train_size)) << " training bytes, "
              << thousands(double(corpus.val_size())) << " held out; batch " << o_.batch << " x " << o_.context
              << (o_.accum > 1 ? fmt(" x %lld micro-batches", (long long)o_.accum) : std::string())
              << " bytes per step\n";
    std::cout << "training: ";
    if (o_.steps != unlimited) std::cout << o_.steps << " steps";
    if (o_.minutes > 0) std::cout << (o_.steps != unlimited ? ", at most " : "") << o_.minutes << " minutes";
    std::cout << ", AdamW lr " << o_.lr << " (warm-up " << o_.warmup << ", cosine to " << o_.min_lr
              << "), weight decay " << o_.weight_decay << ", clip " << o_.clip << ", seed " << o_.seed;
#if defined(_OPENMP)
    std::cout << ", " << omp_get_max_threads() << " threads";
#endif
    std::cout << "\n";
  }

  void print_expert_usage(const StatsWindow& w) const {
    std::cout << "expert usage over the last " << w.forwards << " forwards:\n";
    for (std::size_t l = 0; l < w.sum.size(); ++l) {
      const smoe::RoutingStats s = w.merged(l);
      index_t lo = std::numeric_limits<index_t>::max(), hi = 0, used = 0;
      for (index_t c : s.tokens_per_expert) lo = std::min(lo, c), hi = std::max(hi, c), used += c > 0;
      const double E = double(s.tokens_per_expert.size()), a = double(std::max<index_t>(1, s.assignments));
      std::cout << fmt(
          "  layer %zu: %lld of %.0f experts used, share min %.2f%% max %.2f%% (uniform %.2f%%), load CV %.3f, "
          "routing entropy %.3f of %.3f nats",
          l, (long long)used, E, 100.0 * double(lo) / a, 100.0 * double(hi) / a, 100.0 / E, s.load_cv,
          s.routing_entropy, std::log(E));
      if (s.dropped > 0) std::cout << fmt(", dropped %.2f%%", 100.0 * s.fraction_dropped);
      std::cout << "\n";
    }
  }

  Options& o_;
  Ranks ranks_;
  std::unique_ptr<HostModel> host_;
  std::unique_ptr<Model> twin_;  // the model that trains when it is not host_ (see Run)
  Model* model_ = nullptr;         // the model that trains
  Sampler sampler_{};
  std::int64_t step_ = 0;
  std::uint64_t train_us_ = 0;
  double warmup_progress_ = 0;  // --minutes: the progress when the warm-up ended
};

template <template <class> class K, class B>
int run_kind(Options& o) {
  Run<K<smoe::cpu>, K<B>> run(o);
  if (o.sample > 0) return run.sample();
  const Corpus corpus = load_corpus(o);
  return run.train(corpus);
}

// The run of `o` on backend B.
template <class B>
int dispatch(Options& o) {
  if (o.ffn == "dense" || o.ffn == "topk") return run_kind<DenseKind, B>(o);
  if (o.ffn == "sigma-moe") return run_kind<SigmaKind, B>(o);
  if (o.ffn == "switch") return run_kind<SwitchKind, B>(o);
  if (o.ffn == "s-base") return run_kind<SBaseKind, B>(o);
  if (o.ffn == "samoe" && o.samoe_space == "weight") return run_kind<SaMoEKind, B>(o);
  if (o.ffn == "pkm") return run_kind<PkmKind, B>(o);
  // The kinds added for the experiments (docs/experiments.md) run on the CPU only (resolve refuses
  // them on cuda), so the CUDA build does not instantiate them.
  if constexpr (std::is_same_v<B, smoe::cpu>) {
    if (o.ffn == "samoe") return run_kind<SaMoEOutputKind, B>(o);
    if (o.ffn == "softmax-moe") return run_kind<SoftmaxMoEKind, B>(o);
    if (o.ffn == "tied") return run_kind<TiedKind, B>(o);
    if (o.ffn == "pr-moe") return run_kind<PrMoEKind, B>(o);
    if (o.ffn == "shared-experts") return run_kind<SharedExpertsKind, B>(o);
  }
  throw usage_error("--ffn " + o.ffn + " runs on the CPU only");
}

// dispatch<smoe::cuda>, where train_lm is built with the CUDA backend (train_lm_cuda.cpp, by nvcc
// or as the host-emulated device build); otherwise a usage error (train_lm_no_cuda.cpp).
int run_on_device(Options& o);

// --expert-parallel under mpirun, where train_lm is built with MPI (train_lm_expert_parallel.cpp);
// otherwise a usage error (train_lm_expert_parallel_no_mpi.cpp).
int run_expert_parallel(Options& o);

}  // namespace train_lm
