// One MoE layer per routing strategy, forward+backward in Mode::train, and the same router alone.
//
//   Layer:  MoE<Router, ReluExperts<float>({d, E, G}), WeightedSum<float>, aux losses of the method>,
//           forward(x, Mode::train) + backward(dy): everything a training step of the layer does
//           (routing, capacity, dispatch, experts, combiner, aux losses, routing stats).
//   Router: the layer's own router object, forward(x, Mode::train) + backward(d_gates, d_logits = 0)
//           with fixed random d_gates ~ N(0, 1): the routing share of the layer's time.
//
// d = 512, E = 64 experts of G = 128 hidden units (d_ff = E·G = 8192), K = 2 where the method has a
// K, T = 4096 tokens, float32, x, dy ~ N(0, 1). Initialization: sigma_moe_init (seed 1) for the
// routers with a weight [E, d] (noisy top-k's noise weight stays 0, as in Shazeer et al.); the hash
// layer gets the same expert weights, with token ids uniform in [0, 50257). The product-key memory
// rows are MoE<ProductKeyRouter, ValueExperts> with N = 64 sub-keys (N² = 4096 values of size d),
// 4 heads, ReLU gates, pkm_init (seed 1). validate_inputs is off; the layers are built once (with
// one untimed warm-up step, which also checks that the routing is not degenerate) and reused.
// Weights are not updated between steps: the routing of the initialization is timed throughout.
//
// Names are Layer_FwdBwd/<method> and Router_FwdBwd/<method>; the label describes the method and
// the counter "row" gives the table order (bench/report_routers.py). bench/run_routers.sh
// interleaves the repetitions at random so that slow drifts of the machine hit every row alike.
// Counters of the layer rows: items/s = tokens/s, A_per_token = assignments per token, load_cv =
// std/mean of the tokens per expert, dropped_frac (capacity), experts_used = fraction of experts
// with at least one token, no_expert_frac = tokens without any expert.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "smoe/experts/value_experts.hpp"
#include "smoe/routing/base_router.hpp"
#include "smoe/routing/expert_choice.hpp"
#include "smoe/routing/group_topk.hpp"
#include "smoe/routing/hash_router.hpp"
#include "smoe/routing/noisy_topk.hpp"
#include "smoe/routing/product_key_router.hpp"
#include "smoe/routing/sbase_router.hpp"
#include "smoe/smoe.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using F = float;
constexpr smoe::index_t kD = 512, kE = 64, kG = 128, kK = 2, kTokens = 4096;
constexpr smoe::index_t kPkmKeys = 64, kPkmHeads = 4;
constexpr std::int64_t kVocabulary = 50257;  // hash layer token ids

smoe::Tensor<F> normal_tensor(smoe::index_t rows, smoe::index_t cols, std::uint64_t seed) {
  smoe::Tensor<F> t({rows, cols});
  smoe::fill_normal(t, 1.0, seed, 7);
  return t;
}

const smoe::Tensor<F>& input_x() {
  static const smoe::Tensor<F> x = normal_tensor(kTokens, kD, 11);
  return x;
}
const smoe::Tensor<F>& input_dy() {
  static const smoe::Tensor<F> dy = normal_tensor(kTokens, kD, 12);
  return dy;
}

template <class R, class... Losses>
using FfnLayer = smoe::MoE<R, smoe::ReluExperts<F>, smoe::WeightedSum<F>, Losses...>;
using PkmLayer = smoe::MoE<smoe::ProductKeyRouter<F>, smoe::ValueExperts<F>, smoe::WeightedSum<F>>;

// A ReLU-expert layer around `router`: sigma_moe_init when the router has a weight, otherwise the
// same expert weights (sigma_moe_init's streams 1 and 2) and a parameter-free router.
template <class R, class... Losses>
std::unique_ptr<FfnLayer<R, Losses...>> ffn_layer(R router, Losses... losses) {
  auto layer = std::make_unique<FfnLayer<R, Losses...>>(std::move(router), smoe::ReluExperts<F>({kD, kE, kG}),
                                                        smoe::WeightedSum<F>{}, losses...);
  const smoe::InitOptions init{.scale = 1.0, .seed = 1};
  if constexpr (requires { layer->router().weight(); }) {
    smoe::sigma_moe_init(*layer, init);
  } else {
    auto& experts = layer->experts();
    smoe::fill_normal(experts.w1().value, init.scale / std::sqrt(double(kD)), init.seed, 1);
    smoe::fill_normal(experts.w2().value, init.scale / std::sqrt(double(kE * kG)), init.seed, 2);
  }
  layer->validate_inputs = false;
  return layer;
}

std::unique_ptr<PkmLayer> pkm_layer(smoe::index_t k_per_head) {
  auto layer = std::make_unique<PkmLayer>(
      smoe::ProductKeyRouter<F>({.d_model = kD, .n_keys = kPkmKeys, .heads = kPkmHeads, .k = k_per_head,
                                 .activation = smoe::PkmActivation::relu}),
      smoe::ValueExperts<F>({.d_model = kD, .values = kPkmKeys * kPkmKeys}));
  smoe::pkm_init(*layer, {.scale = 1.0, .seed = 1});
  layer->validate_inputs = false;
  return layer;
}

std::vector<std::int64_t> hash_token_ids() {
  std::vector<std::int64_t> ids(static_cast<std::size_t>(kTokens));
  for (std::size_t t = 0; t < ids.size(); ++t)
    ids[t] = static_cast<std::int64_t>(smoe::philox4x32(5, t)[0] % std::uint64_t(kVocabulary));
  return ids;
}

void set_common_counters(benchmark::State& state, int row, smoe::index_t k) {
  state.SetItemsProcessed(state.iterations() * kTokens);
  state.counters["row"] = row;
  state.counters["tokens"] = double(kTokens);
  state.counters["K"] = double(k);
#if defined(_OPENMP)
  state.counters["threads"] = double(omp_get_max_threads());
#else
  state.counters["threads"] = 1;
#endif
}

// A layer built on first use, with one warm-up step (allocates the caches) whose routing is checked.
template <class Layer>
struct Case {
  std::function<std::unique_ptr<Layer>()> make;
  std::unique_ptr<Layer> layer;
  smoe::RoutingStats warmup_stats;

  Layer& get() {
    if (!layer) {
      layer = make();
      smoe::Tensor<F> y({kTokens, kD}), dx({kTokens, kD});
      auto out = layer->forward(input_x().matrix(), y.matrix(), smoe::Mode::train);
      layer->backward(input_dy().matrix(), dx.matrix());
      warmup_stats = out.stats;
    }
    return *layer;
  }
  // Degenerate routing (a collapsed router, e.g. all-zero weights) would time a different workload.
  bool degenerate() const {
    const auto& n = warmup_stats.tokens_per_expert;
    const auto used = std::count_if(n.begin(), n.end(), [](smoe::index_t c) { return c > 0; });
    return warmup_stats.assignments == 0 || 4 * used < std::ptrdiff_t(n.size());
  }
};

template <class Layer>
void layer_fwd_bwd(benchmark::State& state, Case<Layer>& c, int row, const std::string& label) {
  Layer& moe = c.get();
  if (c.degenerate()) {
    state.SkipWithError("degenerate routing: fewer than a quarter of the experts receive tokens");
    return;
  }
  const auto &x = input_x(), &dy = input_dy();
  smoe::Tensor<F> y({kTokens, kD}), dx({kTokens, kD});
  for (auto _ : state) {
    auto out = moe.forward(x.matrix(), y.matrix(), smoe::Mode::train);
    moe.backward(dy.matrix(), dx.matrix());
    benchmark::DoNotOptimize(out.aux_loss);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  // Statistics of the last step (untimed).
  const smoe::RoutingStats s = smoe::compute_routing_stats(moe.routing(), moe.dispatch());
  const auto& n = s.tokens_per_expert;
  const auto used = std::count_if(n.begin(), n.end(), [](smoe::index_t v) { return v > 0; });
  set_common_counters(state, row, moe.k());
  state.counters["E"] = double(moe.n_experts());
  state.counters["A_per_token"] = double(s.assignments) / double(kTokens);
  state.counters["load_cv"] = s.load_cv;
  state.counters["dropped_frac"] = s.fraction_dropped;
  state.counters["experts_used"] = double(used) / double(n.size());
  state.counters["no_expert_frac"] = double(s.tokens_without_expert) / double(kTokens);
  state.SetLabel(label);
}

template <class Layer>
void router_fwd_bwd(benchmark::State& state, Case<Layer>& c, int row, const std::string& label) {
  auto& router = c.get().router();
  if (c.degenerate()) {
    state.SkipWithError("degenerate routing: fewer than a quarter of the experts receive tokens");
    return;
  }
  using R = std::remove_reference_t<decltype(router)>;
  const auto& x = input_x();
  const smoe::Tensor<F> d_gates = normal_tensor(kTokens, router.k(), 13);
  // d_logits as MoE<> passes it, [T, E] (zeroed every step, as there), except for the product-key
  // router: it has no logits, and [T, N²] would time a 64 MB memset that is not routing.
  constexpr bool no_logits = std::is_same_v<R, smoe::ProductKeyRouter<F>>;
  smoe::Tensor<F> d_logits(no_logits ? std::vector<smoe::index_t>{0, 0}
                                      : std::vector<smoe::index_t>{kTokens, router.experts()});
  smoe::Tensor<F> dx({kTokens, kD});
  dx.zero();
  smoe::Routing<F> routing;
  for (auto _ : state) {
    router.forward(x.matrix(), routing, smoe::Mode::train);
    d_logits.zero();
    router.backward(x.matrix(), std::as_const(routing), d_gates.matrix(), d_logits.matrix(), dx.matrix());
    benchmark::DoNotOptimize(routing.gates.data());
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  set_common_counters(state, row, router.k());
  state.SetLabel(label);
}

double min_of(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }

void configure(benchmark::internal::Benchmark* b) {
  // Wall time: the layers run on every OpenMP thread. CPU time is the whole process's.
  b->Unit(benchmark::kMillisecond)->UseRealTime()->MeasureProcessCPUTime();
  b->ComputeStatistics("min", min_of);
}

int rows = 0;

// Registers Layer_FwdBwd/<name> and Router_FwdBwd/<name> on one lazily built layer.
template <class Make>
void add(const std::string& name, const std::string& label, Make make) {
  using Layer = typename std::invoke_result_t<Make>::element_type;
  auto c = std::make_shared<Case<Layer>>();
  c->make = std::move(make);
  const int row = rows++;
  configure(benchmark::RegisterBenchmark(("Layer_FwdBwd/" + name).c_str(),
                                         [c, row, label](benchmark::State& s) { layer_fwd_bwd(s, *c, row, label); }));
  configure(benchmark::RegisterBenchmark(("Router_FwdBwd/" + name).c_str(),
                                         [c, row, label](benchmark::State& s) { router_fwd_bwd(s, *c, row, label); }));
}

const int registered = [] {
  using namespace smoe;
  const SoftmaxGate renorm{.renormalize = true}, full{.renormalize = false};
  // The reference of the ratios (bench/report_routers.py): softmax top-2, renormalized.
  add("softmax_top2", "SoftmaxTopK renormalized, K=2 + EntropyLoss(0.001)",
      [=] { return ffn_layer(SoftmaxTopK<F>({kD, kE, kK}, renorm), EntropyLoss<F>(0.001)); });
  add("softmax_top2_full", "SoftmaxTopK over all E (not renormalized), K=2 + EntropyLoss(0.001)",
      [=] { return ffn_layer(SoftmaxTopK<F>({kD, kE, kK}, full), EntropyLoss<F>(0.001)); });
  add("softmax_top2_cap125", "SoftmaxTopK renormalized, K=2 + EntropyLoss(0.001), capacity_factor 1.25", [=] {
    auto layer = ffn_layer(SoftmaxTopK<F>({kD, kE, kK}, renorm), EntropyLoss<F>(0.001));
    layer->capacity = CapacityPolicy{.capacity_factor = 1.25};
    return layer;
  });
  add("switch_top1", "Switch: SoftmaxTopK K=1 + SwitchBalanceLoss(0.01)",
      [=] { return ffn_layer(SoftmaxTopK<F>({kD, kE, 1}, full), SwitchBalanceLoss<F>(0.01)); });
  add("sigma_moe_top2", "sigma-MoE: SigmoidTopK K=2 + EntropyLoss(0.001)",
      [] { return ffn_layer(SigmoidTopK<F>({kD, kE, kK}), EntropyLoss<F>(0.001)); });
  add("noisy_top2", "NoisyTopK K=2, load loss 0.1 + ImportanceLoss(0.1)", [] {
    return ffn_layer(NoisyTopK<F>({.d_model = kD, .experts = kE, .k = kK, .load_coef = 0.1, .seed = 3}),
                     ImportanceLoss<F>(0.1));
  });
  add("sbase_top2", "S-BASE: SBaseRouter K=2, 3 Sinkhorn iterations + EntropyLoss(0.001)", [] {
    return ffn_layer(SBaseRouter<F>({.d_model = kD, .experts = kE, .k = kK, .sinkhorn_iters = 3}),
                     EntropyLoss<F>(0.001));
  });
  add("base_top1", "BASE: BaseRouter K=1, exact balanced assignment",
      [] { return ffn_layer(BaseRouter<F>({.d_model = kD, .experts = kE})); });
  add("expert_choice", "ExpertChoiceRouter, capacity factor 2 (2 experts per token on average)",
      [] { return ffn_layer(ExpertChoiceRouter<F>({.d_model = kD, .experts = kE, .capacity_factor = 2.0})); });
  add("hash_top1", "HashRouter K=1, token ids uniform in [0, 50257)", [] {
    HashRouter<F> router({.d_model = kD, .experts = kE, .seed = 4});
    router.set_token_ids(hash_token_ids());
    return ffn_layer(std::move(router));
  });
  add("group_top2", "GroupTopKRouter K=2, 8 groups, top-4 groups", [] {
    return ffn_layer(GroupTopKRouter<F>({.d_model = kD, .experts = kE, .k = kK, .n_groups = 8, .topk_groups = 4}));
  });
  add("pkm_h4_k8", "PKM: ProductKeyRouter N=64 (4096 values), 4 heads, K=8 per head, ReLU + ValueExperts",
      [] { return pkm_layer(8); });
  add("pkm_h4_k32", "PKM: ProductKeyRouter N=64 (4096 values), 4 heads, K=32 per head, ReLU + ValueExperts",
      [] { return pkm_layer(32); });
  return 0;
}();

}  // namespace

BENCHMARK_MAIN();
