// KV cache and generation: Model::forward_cached in chunks (prefill, single-token decode steps,
// multi-token steps, several sequences) against forward_logits on the whole sequences, for the
// attention options (GQA, q/k/v bias, per-head and whole q/k norms, clip_qkv, RoPE base) in float and
// double; greedy generate() against argmax by full recomputation; the cache's memory (fixed by its
// capacity) and a decode step's work (only the new tokens are routed); sampling (top-p, temperature
// frequencies, determinism); bad input that changes nothing.
#include <smoe/smoe.hpp>

#include <cmath>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "catch.hpp"
#include "helpers.hpp"

using namespace smoe;

namespace {

template <class T>
using Moe = MoE<SigmoidTopK<T>, ReluExperts<T>, WeightedSum<T>>;
template <class T>
using Block = TransformerBlock<CausalSelfAttention<T>, Moe<T>>;
template <class T>
using Lm = Model<Block<T>>;

constexpr index_t V = 13, d = 16, E = 4, K = 2;

template <class T>
std::unique_ptr<Lm<T>> make_model(const AttentionConfig& a, index_t layers = 2, std::uint64_t seed = 1) {
  auto m = std::make_unique<Lm<T>>(ModelConfig{.vocab = V, .d_model = d, .layers = layers}, [&](index_t) {
    return Block<T>(CausalSelfAttention<T>(a), Moe<T>(SigmoidTopK<T>({.d_model = d, .experts = E, .k = K}),
                                                      ReluExperts<T>({.d_model = d, .experts = E, .hidden = 5}),
                                                      WeightedSum<T>{}));
  });
  m->for_each_parameter([&](std::string_view name, auto& p) {
    const bool norm = name.find("norm") != std::string_view::npos;
    test::randomize(p.value, seed++, norm ? 0.2 : 0.5);
    if (norm)
      for (index_t i = 0; i < p.value.size(); ++i) p.value[i] += 1;
  });
  return m;
}

std::vector<std::int64_t> ids_of(index_t n, std::uint64_t seed) {
  std::vector<std::int64_t> ids(static_cast<std::size_t>(n));
  for (index_t t = 0; t < n; ++t) ids[t] = std::int64_t(uniform01(seed, std::uint64_t(t)) * double(V));
  return ids;
}

// Rows [first, first + n) of sequence b's logits in a [B·L, V] matrix.
template <class T>
std::vector<double> rows(ConstMatrixView<T> logits, index_t L, index_t b, index_t first, index_t n) {
  std::vector<double> out;
  for (index_t i = first; i < first + n; ++i)
    for (index_t c = 0; c < logits.cols; ++c) out.push_back(double(logits(b * L + i, c)));
  return out;
}

const AttentionConfig attention_variants[] = {
    {.d_model = d, .heads = 2},                                                      // MHA
    {.d_model = d, .heads = 4, .kv_heads = 2, .rope_base = 500.0, .block = 2},       // GQA, small blocks
    {.d_model = d, .heads = 4, .kv_heads = 1, .head_dim = 4, .qkv_bias = true},      // MQA, head_dim != d/H
    {.d_model = d, .heads = 2, .kv_heads = 1, .qk_norm = QKNorm::per_head},          // Qwen3-MoE style
    {.d_model = d, .heads = 2, .qk_norm = QKNorm::whole, .clip_qkv = 0.8},           // OLMoE style
};

}  // namespace

template <class T>
Tensor<T> copy_of(ConstMatrixView<T> m) {
  Tensor<T> t({m.rows, m.cols});
  for (index_t r = 0; r < m.rows; ++r) std::copy_n(m.row(r), m.cols, t.data() + r * m.cols);
  return t;
}

TEMPLATE_TEST_CASE("forward_cached in chunks equals forward_logits on the whole sequences", "[kv_cache]", float,
                   double) {
  using T = TestType;
  const double tol = test::tolerance<T>();
  const index_t B = 2, L = 9;
  const index_t chunks[] = {4, 1, 1, 2, 1};  // prefill, decode steps, a two-token step
  int variant = 0;
  for (const AttentionConfig& a : attention_variants) {
    INFO("attention variant " << variant++);
    auto model_owner = make_model<T>(a);
  Lm<T>& model = *model_owner;
    const std::vector<std::int64_t> ids = ids_of(B * L, 7);
    model.forward_logits(std::span<const std::int64_t>(ids), B);
    const Tensor<T> whole = copy_of<T>(model.logits());

    KVCache<T> cache = model.make_kv_cache(B, L);
    index_t pos = 0;
    for (const index_t n : chunks) {
      std::vector<std::int64_t> step;
      for (index_t b = 0; b < B; ++b)
        for (index_t i = 0; i < n; ++i) step.push_back(ids[b * L + pos + i]);
      model.forward_cached(std::span<const std::int64_t>(step), cache);
      REQUIRE(model.logits().rows == B * n);
      for (index_t b = 0; b < B; ++b)
        test::require_close(rows<T>(model.logits(), n, b, 0, n), rows<T>(whole.matrix(), L, b, pos, n), tol, tol);
      pos += n;
      CHECK(cache.length() == pos);
    }
    // CachedLogits::last: each sequence's last new token only, [B, V].
    cache.clear();
    std::vector<std::int64_t> prefix;
    for (index_t b = 0; b < B; ++b) prefix.insert(prefix.end(), ids.begin() + b * L, ids.begin() + b * L + 5);
    model.forward_cached(std::span<const std::int64_t>(prefix), cache, CachedLogits::last);
    REQUIRE(model.logits().rows == B);
    for (index_t b = 0; b < B; ++b)
      test::require_close(rows<T>(model.logits(), 1, b, 0, 1), rows<T>(whole.matrix(), L, b, 4, 1), tol, tol);
  }
}

TEST_CASE("greedy generate equals argmax by full recomputation at every step", "[kv_cache]") {
  for (const AttentionConfig& a : attention_variants) {
    auto model_owner = make_model<double>(a, 3, 11);
  Lm<double>& model = *model_owner;
    const std::vector<std::int64_t> prompt = ids_of(5, 3);
    const Generation g = generate(model, std::span<const std::int64_t>(prompt), {.max_new = 8});
    REQUIRE(g.ids.size() == 8);
    CHECK(g.prompt_tokens == 5);
    CHECK(g.decode_steps == 7);
    std::vector<std::int64_t> seq = prompt;
    for (std::size_t step = 0; step < 8; ++step) {
      model.forward_logits(std::span<const std::int64_t>(seq), 1);
      const auto logits = model.logits();
      const double* last = logits.row(logits.rows - 1);
      const std::int64_t best = std::int64_t(std::max_element(last, last + V) - last);
      INFO("step " << step);
      CHECK(g.ids[step] == best);
      seq.push_back(best);
    }
    // A stop id ends generation after it.
    const Generation stopped = generate(model, std::span<const std::int64_t>(prompt), {.max_new = 8, .stop_ids = {g.ids[2]}});
    const auto first = std::find(g.ids.begin(), g.ids.end(), g.ids[2]);
    CHECK(stopped.ids == std::vector<std::int64_t>(g.ids.begin(), first + 1));
  }
}

TEST_CASE("the KV cache's memory is fixed by its capacity and a decode step runs only the new tokens", "[kv_cache]") {
  const AttentionConfig a{.d_model = d, .heads = 4, .kv_heads = 2};
  auto model_owner = make_model<float>(a, 3);
  Lm<float>& model = *model_owner;
  const index_t B = 2, capacity = 12;
  KVCache<float> cache = model.make_kv_cache(B, capacity);
  const std::size_t expected = std::size_t(3 * B * capacity * 2 * 2 * (d / 4)) * sizeof(float);
  CHECK(cache.bytes() == expected);
  const std::vector<std::int64_t> prompt = ids_of(B * 6, 5);
  ModelOutput out = model.forward_cached(std::span<const std::int64_t>(prompt), cache);
  REQUIRE(out.routing.size() == 3);
  for (const LayerRoutingStats& r : out.routing) CHECK(r.stats.assignments == B * 6 * K);
  for (int step = 0; step < 6; ++step) {
    const std::vector<std::int64_t> next = ids_of(B, 100 + std::uint64_t(step));
    out = model.forward_cached(std::span<const std::int64_t>(next), cache, CachedLogits::last);
    CHECK(cache.bytes() == expected);
    for (const LayerRoutingStats& r : out.routing) CHECK(r.stats.assignments == B * K);  // the new tokens only
  }
  CHECK(cache.length() == capacity);
}

TEST_CASE("sampling: greedy, top-p, temperature frequencies, determinism", "[kv_cache]") {
  const std::vector<float> logits = {0.5f, 2.0f, -1.0f, 2.0f, 1.0f};
  const std::span<const float> l(logits);
  CHECK(next_token(l, {}, 0) == 1);  // greedy: the lowest id among the best
  // top_p below the best token's probability keeps it alone.
  for (std::uint64_t i = 0; i < 50; ++i) CHECK(next_token(l, {.temperature = 1, .top_p = 0.1, .seed = 3}, i) == 1);
  // The draw frequencies follow softmax(logits / temperature) restricted to the nucleus, renormalized.
  for (const double temperature : {1.0, 0.5}) {
    for (const double top_p : {1.0, 0.8}) {
      std::vector<double> p(logits.size());
      double z = 0;
      for (std::size_t j = 0; j < p.size(); ++j) z += (p[j] = std::exp(double(logits[j]) / temperature));
      for (double& v : p) v /= z;
      // The nucleus: tokens by decreasing probability (lower id first on ties) until the mass reaches top_p.
      std::vector<std::size_t> order = {1, 3, 4, 0, 2};
      std::vector<double> q(p.size(), 0.0);
      double mass = 0;
      for (std::size_t r = 0; r < order.size() && (r == 0 || mass < top_p); ++r) mass += (q[order[r]] = p[order[r]]);
      const int draws = 20000;
      std::vector<int> count(p.size(), 0);
      for (int i = 0; i < draws; ++i)
        ++count[std::size_t(next_token(l, {.temperature = temperature, .top_p = top_p, .seed = 9}, std::uint64_t(i)))];
      for (std::size_t j = 0; j < p.size(); ++j) {
        INFO("temperature " << temperature << ", top_p " << top_p << ", token " << j);
        const double expect = q[j] / mass, sd = std::sqrt(expect * (1 - expect) / draws);
        CHECK(std::abs(count[j] / double(draws) - expect) <= 5 * sd + 1e-12);
      }
    }
  }
  // The same seed and draw give the same token; generation repeats exactly.
  auto model_owner = make_model<float>(attention_variants[1]);
  Lm<float>& model = *model_owner;
  const std::vector<std::int64_t> prompt = ids_of(4, 1);
  const GenerationConfig c{.max_new = 10, .sampling = {.temperature = 1.0, .top_p = 0.9, .seed = 5}};
  CHECK(generate(model, std::span<const std::int64_t>(prompt), c).ids ==
        generate(model, std::span<const std::int64_t>(prompt), c).ids);
}

TEST_CASE("KV cache and generation: bad input is refused and changes nothing", "[kv_cache]") {
  auto model_owner = make_model<float>(attention_variants[1]);
  Lm<float>& model = *model_owner;
  KVCache<float> cache = model.make_kv_cache(2, 4);
  const std::vector<std::int64_t> three = {1, 2, 3, 4, 5, 6};
  model.forward_cached(std::span<const std::int64_t>(three), cache);
  const std::vector<std::int64_t> two = {1, 2, 3, 4};
  REQUIRE_THROWS_WITH(model.forward_cached(std::span<const std::int64_t>(two), cache),
                      Catch::Contains("a step of 2 positions after 3 cached ones would pass the capacity of 4"));
  CHECK(cache.length() == 3);
  const std::vector<std::int64_t> odd = {1, 2, 3};
  REQUIRE_THROWS_WITH(model.forward_cached(std::span<const std::int64_t>(odd), cache),
                      Catch::Contains("must be a multiple of sequences = 2, got 3"));
  const std::vector<std::int64_t> bad = {1, V};
  REQUIRE_THROWS_WITH(model.forward_cached(std::span<const std::int64_t>(bad), cache),
                      Catch::Contains("ids[1] must be in [0, 13), got 13"));
  CHECK(cache.length() == 3);
  REQUIRE_THROWS_WITH(model.backward(), Catch::Contains("backward needs a forward with targets"));
  REQUIRE_THROWS_WITH(model.block(0).backward(model.logits(), MatrixView<float>()),
                      Catch::Contains("backward called before forward"));
  auto deeper_owner = make_model<float>(attention_variants[1], 3);
  Lm<float>& deeper = *deeper_owner;
  REQUIRE_THROWS_WITH(deeper.forward_cached(std::span<const std::int64_t>(two), cache),
                      Catch::Contains("KV cache layers"));
  REQUIRE_THROWS_WITH(KVCache<float>({.layers = 1, .sequences = 1, .kv_heads = 1, .head_dim = 2, .capacity = 0}),
                      Catch::Contains("capacity must be >= 1, got 0"));
  const std::vector<std::int64_t> prompt = {1, 2};
  REQUIRE_THROWS_WITH(generate(model, std::span<const std::int64_t>(prompt), {.max_new = 0}),
                      Catch::Contains("max_new must be >= 1, got 0"));
  REQUIRE_THROWS_WITH(generate(model, std::span<const std::int64_t>(), {}), Catch::Contains("prompt must not be empty"));
  REQUIRE_THROWS_WITH(generate(model, std::span<const std::int64_t>(prompt), {.sampling = {.top_p = 0}}),
                      Catch::Contains("top_p must be in (0, 1], got 0"));
  REQUIRE_THROWS_WITH(generate(model, std::span<const std::int64_t>(prompt), {.sampling = {.temperature = -1}}),
                      Catch::Contains("temperature must be finite and >= 0, got -1"));
  const std::vector<float> nan_logits = {0.f, std::nanf("")};
  REQUIRE_THROWS_WITH(next_token(std::span<const float>(nan_logits), {}, 0), Catch::Contains("logits[1] must be finite"));
}
