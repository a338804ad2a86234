#pragma once
// Token-by-token generation from a CPU Model with a KV cache: the prompt runs once (prefill), then
// each new token runs alone against the cache (one decode step per token):
//
//   smoe::Generation g = smoe::generate(model, prompt, {.max_new = 32});            // greedy
//   smoe::generate(model, prompt, {.max_new = 32, .sampling = {.temperature = 0.7, .top_p = 0.9, .seed = 1}});
//
// Sampling follows transformers' order: logits / temperature, softmax, then the top-p nucleus (the
// most probable tokens whose probabilities reach top_p, at least one), renormalized.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <span>
#include <vector>

#include "smoe/core/error.hpp"
#include "smoe/core/rng.hpp"
#include "smoe/layers/model.hpp"

namespace smoe {

struct SamplingConfig {
  double temperature = 0;  // 0: greedy (the most likely token; the lowest id on ties)
  double top_p = 1;        // nucleus mass in (0, 1]; 1 keeps every token
  std::uint64_t seed = 0;  // draw i uses uniform01(seed, i): runs repeat exactly

  void validate(const char* context) const {
    if (!(temperature >= 0) || !std::isfinite(temperature))
      fail(context, ": temperature must be finite and >= 0, got ", temperature);
    if (!(top_p > 0 && top_p <= 1)) fail(context, ": top_p must be in (0, 1], got ", top_p);
  }
};

// The next token of one row of logits; `draw` numbers the random draw of a sampled run.
template <class T>
std::int64_t next_token(std::span<const T> logits, const SamplingConfig& c, std::uint64_t draw) {
  constexpr const char* ctx = "next_token";
  c.validate(ctx);
  const std::size_t V = logits.size();
  if (V == 0) fail(ctx, ": logits must not be empty");
  for (std::size_t j = 0; j < V; ++j)
    if (!std::isfinite(double(logits[j]))) fail(ctx, ": logits[", j, "] must be finite, got ", double(logits[j]));
  if (c.temperature == 0) return std::int64_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
  // Most probable first (lower id first on ties), softmax of logits / temperature in double.
  std::vector<std::size_t> order(V);
  std::iota(order.begin(), order.end(), std::size_t(0));
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return logits[a] > logits[b]; });
  const double top = double(logits[order[0]]);
  std::vector<double> p(V);
  double sum = 0;
  for (std::size_t r = 0; r < V; ++r) sum += (p[r] = std::exp((double(logits[order[r]]) - top) / c.temperature));
  std::size_t kept = 0;
  double mass = 0;
  while (kept < V && (kept == 0 || mass < c.top_p)) mass += p[kept++] / sum;
  double u = uniform01(c.seed, draw) * mass * sum;
  for (std::size_t r = 0; r < kept; ++r) {
    u -= p[r];
    if (u < 0) return std::int64_t(order[r]);
  }
  return std::int64_t(order[kept - 1]);
}

struct GenerationConfig {
  index_t max_new = 16;                // tokens to generate (fewer when a stop id comes first)
  SamplingConfig sampling{};           // greedy by default
  std::vector<std::int64_t> stop_ids{};  // generation ends after one of these (it is kept), e.g. EOS
};

struct Generation {
  std::vector<std::int64_t> ids;  // the new tokens only
  index_t prompt_tokens = 0;
  double prefill_seconds = 0;  // the prompt's forward and the first token
  double decode_seconds = 0;   // every later token: one decode step each
  index_t decode_steps = 0;
  double prefill_tokens_per_second() const { return prefill_seconds > 0 ? prompt_tokens / prefill_seconds : 0; }
  double decode_tokens_per_second() const { return decode_seconds > 0 ? decode_steps / decode_seconds : 0; }
};

// Generates after `prompt` (one sequence) with a KV cache of prompt + max_new − 1 positions.
template <class M>
Generation generate(M& model, std::span<const std::int64_t> prompt, const GenerationConfig& c) {
  using T = typename M::scalar_type;
  using clock = std::chrono::steady_clock;
  constexpr const char* ctx = "generate";
  c.sampling.validate(ctx);
  if (prompt.empty()) fail(ctx, ": prompt must not be empty");
  if (c.max_new < 1) fail(ctx, ": max_new must be >= 1, got ", c.max_new);
  Generation g;
  g.prompt_tokens = index_t(prompt.size());
  KVCache<T> cache = model.make_kv_cache(1, g.prompt_tokens + c.max_new - 1);
  auto pick = [&](std::uint64_t draw) {
    const auto row = model.logits();
    return next_token(std::span<const T>(row.row(row.rows - 1), std::size_t(row.cols)), c.sampling, draw);
  };
  auto stops = [&](std::int64_t id) { return std::find(c.stop_ids.begin(), c.stop_ids.end(), id) != c.stop_ids.end(); };
  const auto t0 = clock::now();
  model.forward_cached(prompt, cache, CachedLogits::last);
  g.ids.push_back(pick(0));
  const auto t1 = clock::now();
  while (index_t(g.ids.size()) < c.max_new && !stops(g.ids.back())) {
    const std::int64_t last = g.ids.back();
    model.forward_cached(std::span<const std::int64_t>(&last, 1), cache, CachedLogits::last);
    g.ids.push_back(pick(g.ids.size()));
    ++g.decode_steps;
  }
  g.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();
  g.decode_seconds = std::chrono::duration<double>(clock::now() - t1).count();
  return g;
}

}  // namespace smoe
