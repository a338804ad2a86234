// Expert pools on a 4-layer stack (x ← x + MoE_l(x)), one training step = forward + backward,
// and forward alone (inference), in one binary:
//
//   PerLayer         standard MoE: each layer its own E experts (FeedForwardExperts)
//   Tied             WideNet: one set of E experts shared by the 4 layers (TiedExperts)
//   SaMoEWeight      SaMoE, weight space, W_l materialized in every forward (the per-step cost)
//   SaMoEWeightFrozen  the same with W_l frozen (materialization not timed; backward still
//                    scatters dW_l into the pool and computes the combination gradient)
//   SaMoEOutput      SaMoE, output space, all M members combined: M times the expert work
//   SaMoEOutputTop1  SaMoE, output space, only the top-1 member per layer
//
// Shape: T = 2048 tokens, d = 512, E = 16, G = 128, K = 2, M = 4 pool members, 4 layers, float32,
// ReLU experts without biases, SoftmaxTopK router (renormalized over the top 2), no aux loss.
// Every configuration does the same routed work per token (K·G hidden units per layer) except
// SaMoEOutput (M·K·G). Routers and experts are initialized like sigma-MoE from the same seeds, so
// the first layer routes identically everywhere. Gradients accumulate across iterations (no
// zero_grad in the timed loop). validate_inputs is off. Each stack runs one untimed step when it
// is built, so the timed iterations do not allocate.
//
// Names are <Config>_<Pass> (Pass ∈ {Fwd, FwdBwd}). After the run the binary prints each
// configuration's overhead against PerLayer of the same pass, (t − t_PerLayer) / t_PerLayer, from
// the median of the repetitions (use --benchmark_repetitions=5 on a quiet machine).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "smoe/smoe.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using smoe::index_t;
using T = float;
using Act = smoe::Relu;
constexpr index_t kTokens = 2048, kD = 512, kE = 16, kG = 128, kK = 2, kM = 4, kLayers = 4;

using Router = smoe::SoftmaxTopK<T>;
template <class X>
using Layer = smoe::MoE<Router, X>;
using Pool = smoe::ExpertPool<T, Act>;
using Set = smoe::FeedForwardExperts<T, Act>;
using PerLayerStack = smoe::MoEStack<Layer<Set>>;
using TiedStack = smoe::MoEStack<Layer<smoe::TiedExperts<T, Act>>, Set>;
template <class Space>
using SaMoEStack = smoe::MoEStack<Layer<smoe::SaMoEExperts<T, Act, Space>>, Pool>;

const smoe::Tensor<T>& input(std::uint64_t seed) {
  static std::map<std::uint64_t, smoe::Tensor<T>> cache;
  auto& t = cache[seed];
  if (t.size() == 0) {
    t.resize({kTokens, kD});
    smoe::fill_normal(t, 1.0, seed, 7);
  }
  return t;
}

Router make_router(index_t l) {
  Router r({.d_model = kD, .experts = kE, .k = kK}, smoe::SoftmaxGate{.renormalize = true});
  smoe::fill_normal(r.weight().value, 1.0 / std::sqrt(double(kD)), 1, std::uint64_t(10 + l));
  return r;
}
template <class Stack>
void finish(Stack& stack) {
  for (index_t l = 0; l < stack.layers(); ++l) stack.layer(l).validate_inputs = false;
}
void init_set(Set& set, std::uint64_t stream) {
  smoe::fill_normal(set.w1().value, 1.0 / std::sqrt(double(kD)), 1, stream);
  smoe::fill_normal(set.w2().value, 1.0 / std::sqrt(double(kE * kG)), 1, stream + 1000);
}

// One step (forward + backward) or a forward of a stack.
struct Runner {
  virtual ~Runner() = default;
  virtual void forward(smoe::Mode mode) = 0;
  virtual void backward() = 0;
};
template <class Stack>
struct StackRunner final : Runner {
  explicit StackRunner(Stack s) : stack(std::move(s)), y({kTokens, kD}), dx({kTokens, kD}) { finish(stack); }
  void forward(smoe::Mode mode) override {
    auto out = stack.forward(input(11).matrix(), y.matrix(), mode);
    benchmark::DoNotOptimize(out.aux_loss);
  }
  void backward() override { stack.backward(input(12).matrix(), dx.matrix()); }
  Stack stack;
  smoe::Tensor<T> y, dx;
};

template <class Space>
SaMoEStack<Space> samoe_stack(index_t top) {
  Pool pool({.d_model = kD, .experts = kE, .hidden = kG, .members = kM});
  smoe::init_expert_pool(pool, {.seed = 1});
  return SaMoEStack<Space>(std::move(pool), kLayers, [&](Pool& p, index_t l) {
    return Layer<smoe::SaMoEExperts<T, Act, Space>>(
        make_router(l), smoe::SaMoEExperts<T, Act, Space>(p, {.layer = l, .top_members = top, .init = smoe::CombineInit::member,
                                                              .init_scale = 1.0}));
  });
}

std::unique_ptr<Runner> build(const std::string& config) {
  if (config == "PerLayer")
    return std::make_unique<StackRunner<PerLayerStack>>(PerLayerStack(kLayers, [](index_t l) {
      Set set({kD, kE, kG});
      init_set(set, std::uint64_t(100 + 2 * l));
      return Layer<Set>(make_router(l), std::move(set));
    }));
  if (config == "Tied") {
    Set set({kD, kE, kG});
    init_set(set, 100);
    return std::make_unique<StackRunner<TiedStack>>(TiedStack(std::move(set), kLayers, [](Set& s, index_t l) {
      return Layer<smoe::TiedExperts<T, Act>>(make_router(l), smoe::TiedExperts<T, Act>(s));
    }));
  }
  if (config == "SaMoEWeight" || config == "SaMoEWeightFrozen") {
    auto runner = std::make_unique<StackRunner<SaMoEStack<smoe::WeightSpace>>>(samoe_stack<smoe::WeightSpace>(0));
    if (config == "SaMoEWeightFrozen")
      for (index_t l = 0; l < kLayers; ++l) runner->stack.layer(l).experts().freeze();
    return runner;
  }
  if (config == "SaMoEOutput") return std::make_unique<StackRunner<SaMoEStack<smoe::OutputSpace>>>(samoe_stack<smoe::OutputSpace>(0));
  if (config == "SaMoEOutputTop1")
    return std::make_unique<StackRunner<SaMoEStack<smoe::OutputSpace>>>(samoe_stack<smoe::OutputSpace>(1));
  return nullptr;
}

Runner& runner(const std::string& config) {
  static std::map<std::string, std::unique_ptr<Runner>> cache;
  auto& slot = cache[config];
  if (!slot) {
    slot = build(config);
    slot->forward(smoe::Mode::train);  // warm-up: every cache reaches its steady-state size untimed
    slot->backward();
  }
  return *slot;
}

void set_counters(benchmark::State& state) {
  state.SetItemsProcessed(state.iterations() * kTokens);
  state.counters["layers"] = double(kLayers);
  state.counters["M"] = double(kM);
#if defined(_OPENMP)
  state.counters["threads"] = double(omp_get_max_threads());
#else
  state.counters["threads"] = 1;
#endif
}

void fwd(benchmark::State& state, std::string config) {
  Runner& r = runner(config);
  for (auto _ : state) {
    r.forward(smoe::Mode::eval);
    benchmark::ClobberMemory();
  }
  set_counters(state);
}

void fwd_bwd(benchmark::State& state, std::string config) {
  Runner& r = runner(config);
  for (auto _ : state) {
    r.forward(smoe::Mode::train);
    r.backward();
    benchmark::ClobberMemory();
  }
  set_counters(state);
}

double min_of(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }

const char* const kConfigs[] = {"PerLayer", "Tied", "SaMoEWeight", "SaMoEWeightFrozen", "SaMoEOutput", "SaMoEOutputTop1"};

const int registered = [] {
  for (const char* c : kConfigs)
    for (int pass = 0; pass < 2; ++pass) {
      const std::string name = std::string(c) + (pass == 0 ? "_Fwd" : "_FwdBwd");
      auto* b = pass == 0 ? benchmark::RegisterBenchmark(name.c_str(), fwd, std::string(c))
                          : benchmark::RegisterBenchmark(name.c_str(), fwd_bwd, std::string(c));
      b->Unit(benchmark::kMillisecond)->UseRealTime()->MeasureProcessCPUTime();
      b->ComputeStatistics("min", min_of);
    }
  return 0;
}();

// The console report, plus the times it saw, for the overhead summary.
class CollectingReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& r : runs)
      if (r.run_type == Run::RT_Iteration && !r.error_occurred) ms_[r.run_name.function_name].push_back(to_ms(r));
    ConsoleReporter::ReportRuns(runs);
  }
  void summary() const {
    std::printf("\nOverhead against PerLayer (median of the repetitions; %lld layers, T = %lld, d = %lld, E = %lld, "
                "G = %lld, K = %lld, M = %lld):\n\n| config | pass | ms | overhead |\n|---|---|---:|---:|\n",
                static_cast<long long>(kLayers), static_cast<long long>(kTokens), static_cast<long long>(kD),
                static_cast<long long>(kE), static_cast<long long>(kG), static_cast<long long>(kK),
                static_cast<long long>(kM));
    for (const char* pass : {"_Fwd", "_FwdBwd"}) {
      const auto base = ms_.find(std::string("PerLayer") + pass);
      for (const char* c : kConfigs) {
        const auto it = ms_.find(std::string(c) + pass);
        if (it == ms_.end()) continue;
        const double t = median(it->second);
        if (base == ms_.end())
          std::printf("| %s | %s | %.3f | (no PerLayer run) |\n", c, pass + 1, t);
        else
          std::printf("| %s | %s | %.3f | %+.1f %% |\n", c, pass + 1, t, 100.0 * (t / median(base->second) - 1.0));
      }
    }
  }

 private:
  static double to_ms(const Run& r) {
    const double t = r.GetAdjustedRealTime();
    switch (r.time_unit) {
      case benchmark::kNanosecond: return t * 1e-6;
      case benchmark::kMicrosecond: return t * 1e-3;
      case benchmark::kMillisecond: return t;
      case benchmark::kSecond: return t * 1e3;
    }
    return t;
  }
  static double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const std::size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  }
  std::map<std::string, std::vector<double>> ms_;
};

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  CollectingReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  reporter.summary();
  benchmark::Shutdown();
  return registered == 0 ? 0 : 1;
}
