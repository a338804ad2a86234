// Decode speed of a small OLMoE-shaped model loaded through smoe/hf/ (docs/hf.md): a random float32
// checkpoint in the Hugging Face layout is written to a temporary directory and loaded with
// hf::load_causal_lm, then
//
//   Prefill/S           the prompt of S tokens through the model once (KV cache filled), tokens/s
//   Decode/C            one decode step with the KV cache at context C (C tokens cached), tokens/s
//   DecodeRecompute/C   the baseline: the same next token by recomputing all C + 1 positions
//                       (forward_logits on the whole sequence), tokens/s
//
// Shape (OLMoE-1B-7B's proportions, scaled down): hidden 256, 4 layers, 8 heads (no GQA), whole q/k
// RMSNorm, 64 experts of width 128, top-8 softmax routing without renormalization, vocab 4096, one
// sequence, float32. After the run the binary prints decode tokens/s and the speed-up of the cache
// over recomputation per context (medians over repetitions when --benchmark_repetitions is given).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "smoe/hf/model.hpp"
#include "smoe/io/safetensors.hpp"
#include "smoe/layers/generation.hpp"

namespace {

using smoe::index_t;
constexpr index_t kHidden = 256, kLayers = 4, kHeads = 8, kExperts = 64, kExpertWidth = 128, kTopK = 8, kVocab = 4096;

smoe::Tensor<float> random_tensor(std::vector<index_t> shape, std::uint64_t seed, double std) {
  smoe::Tensor<float> t(std::move(shape));
  for (index_t i = 0; i < t.size(); ++i) t[i] = float(std * smoe::standard_normal(seed, std::uint64_t(i)));
  return t;
}

// A random OLMoE checkpoint (config.json + model.safetensors) in a fresh temporary directory.
std::filesystem::path write_olmoe_checkpoint() {
  const auto dir = std::filesystem::temp_directory_path() / "smoe_bench_hf_decode";
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "config.json") << nlohmann::json{{"model_type", "olmoe"},
                                                       {"hidden_size", kHidden},
                                                       {"num_hidden_layers", kLayers},
                                                       {"num_attention_heads", kHeads},
                                                       {"num_experts", kExperts},
                                                       {"num_experts_per_tok", kTopK},
                                                       {"intermediate_size", kExpertWidth},
                                                       {"vocab_size", kVocab}}
                                            .dump();
  smoe::io::SafetensorsWriter w;
  std::uint64_t seed = 1;
  const double s = 1.0 / std::sqrt(double(kHidden));
  auto add = [&](const std::string& name, std::vector<index_t> shape, double std, double mean = 0) {
    smoe::Tensor<float> t = random_tensor(std::move(shape), seed++, std);
    for (index_t i = 0; i < t.size(); ++i) t[i] += float(mean);
    w.add(name, t);
  };
  add("model.embed_tokens.weight", {kVocab, kHidden}, 1.0);
  add("model.norm.weight", {kHidden}, 0.0, 1.0);
  add("lm_head.weight", {kVocab, kHidden}, s);
  for (index_t l = 0; l < kLayers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {kHidden}, 0.0, 1.0);
    add(p + "post_attention_layernorm.weight", {kHidden}, 0.0, 1.0);
    for (const char* n : {"q", "k", "v", "o"}) add(p + "self_attn." + n + "_proj.weight", {kHidden, kHidden}, s);
    add(p + "self_attn.q_norm.weight", {kHidden}, 0.0, 1.0);
    add(p + "self_attn.k_norm.weight", {kHidden}, 0.0, 1.0);
    add(p + "mlp.gate.weight", {kExperts, kHidden}, s);
    for (index_t e = 0; e < kExperts; ++e) {
      const std::string q = p + "mlp.experts." + std::to_string(e) + ".";
      add(q + "gate_proj.weight", {kExpertWidth, kHidden}, s);
      add(q + "up_proj.weight", {kExpertWidth, kHidden}, s);
      add(q + "down_proj.weight", {kHidden, kExpertWidth}, 1.0 / std::sqrt(double(kExpertWidth)));
    }
  }
  w.save(dir / "model.safetensors");
  return dir;
}

smoe::hf::CausalLM& model() {
  static const std::unique_ptr<smoe::hf::CausalLM> lm = [] {
    const auto dir = write_olmoe_checkpoint();
    auto m = smoe::hf::load_causal_lm(dir);
    std::filesystem::remove_all(dir);
    m->set_validate_inputs(false);
    return m;
  }();
  return *lm;
}

std::vector<std::int64_t> tokens(index_t n) {
  std::vector<std::int64_t> ids(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) ids[i] = std::int64_t(smoe::uniform01(7, std::uint64_t(i)) * kVocab);
  return ids;
}

void Prefill(benchmark::State& state) {
  const index_t S = state.range(0);
  auto& lm = model();
  const std::vector<std::int64_t> prompt = tokens(S);
  smoe::KVCache<float> cache = lm.make_kv_cache(1, S);
  for (auto _ : state) {
    cache.clear();
    lm.forward_cached(std::span<const std::int64_t>(prompt), cache, smoe::CachedLogits::last);
    benchmark::DoNotOptimize(lm.logits().data);
  }
  state.SetItemsProcessed(state.iterations() * S);
}

// One decode step at context C: the cache holds C tokens; each iteration appends one and rewinds.
void Decode(benchmark::State& state) {
  const index_t C = state.range(0);
  auto& lm = model();
  const std::vector<std::int64_t> ids = tokens(C + 1);
  smoe::KVCache<float> cache = lm.make_kv_cache(1, C + 1);
  lm.forward_cached(std::span<const std::int64_t>(ids.data(), std::size_t(C)), cache, smoe::CachedLogits::last);
  for (auto _ : state) {
    lm.forward_cached(std::span<const std::int64_t>(ids.data() + C, 1), cache, smoe::CachedLogits::last);
    benchmark::DoNotOptimize(lm.logits().data);
    state.PauseTiming();
    cache = smoe::KVCache<float>(cache.config());  // rewind: refill the C cached positions
    lm.forward_cached(std::span<const std::int64_t>(ids.data(), std::size_t(C)), cache, smoe::CachedLogits::last);
    state.ResumeTiming();
  }
  state.SetItemsProcessed(state.iterations());
}

void DecodeRecompute(benchmark::State& state) {
  const index_t C = state.range(0);
  auto& lm = model();
  const std::vector<std::int64_t> ids = tokens(C + 1);
  for (auto _ : state) {
    lm.forward_logits(std::span<const std::int64_t>(ids), 1);
    benchmark::DoNotOptimize(lm.logits().data);
  }
  state.SetItemsProcessed(state.iterations());
}

BENCHMARK(Prefill)->Arg(128)->Arg(512)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(Decode)->Arg(128)->Arg(512)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(DecodeRecompute)->Arg(128)->Arg(512)->Unit(benchmark::kMillisecond)->UseRealTime();

// The console report, plus each benchmark's times per iteration (every benchmark here is in ms).
class Collector : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& r : runs)
      if (r.run_type == Run::RT_Iteration && !r.error_occurred)
        seconds_[r.run_name.function_name + "/" + r.run_name.args].push_back(r.GetAdjustedRealTime() * 1e-3);
    ConsoleReporter::ReportRuns(runs);
  }
  // The median seconds of `name`'s repetitions, 0 when it did not run.
  double median(const std::string& name) const {
    const auto it = seconds_.find(name);
    if (it == seconds_.end()) return 0;
    std::vector<double> v = it->second;
    std::sort(v.begin(), v.end());
    const std::size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  }

 private:
  std::map<std::string, std::vector<double>> seconds_;
};

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  Collector collector;
  benchmark::RunSpecifiedBenchmarks(&collector);
  std::printf("\n| context | decode tokens/s (KV cache) | recompute tokens/s | speed-up |\n|---:|---:|---:|---:|\n");
  for (const std::string c : {"128", "512"}) {
    const double cached = collector.median("Decode/" + c), recompute = collector.median("DecodeRecompute/" + c);
    if (cached > 0 && recompute > 0)
      std::printf("| %s | %.1f | %.1f | %.1fx |\n", c.c_str(), 1 / cached, 1 / recompute, recompute / cached);
  }
  benchmark::Shutdown();
  return 0;
}
