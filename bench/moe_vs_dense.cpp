// sigma-MoE layer vs the parameter-equal dense MLP, forward and forward+backward, in one binary.
//
//   MoE:   SigmoidTopK({d, E, K}) + ReluExperts({d, E, G}) + WeightedSum + EntropyLoss(0.001),
//          sigma_moe_init; forward in Mode::eval, forward+backward in Mode::train (no expert
//          dropout, so both modes route identically).
//   Dense: DenseMLP<float, Relu>({d, d_ff = E·G}), dense_init.
//   TopK:  the Top-K-activation MLP of sigma-MoE Sec. 3.1, DenseMLP with topk = K·G (optional row).
//
// d = 512, G = 128, K = 4, E ∈ {8, 16, 32, 64}, T = 2048 tokens, float32, x ~ N(0, 1).
// Benchmark names: <Layer><Pass>/E:<E>, e.g. MoE_Fwd/E:64, Dense_FwdBwd/E:16 (bench/report.py
// parses them). items/s counts tokens; the FLOP/s counter counts the layer's useful multiply-adds
// ×2 (active parameters only for the MoE, router included).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "smoe/smoe.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

constexpr smoe::index_t kD = 512, kG = 128, kK = 4, kTokens = 2048;

using MoELayer = smoe::MoE<smoe::SigmoidTopK<float>, smoe::ReluExperts<float>, smoe::WeightedSum<float>,
                           smoe::EntropyLoss<float>>;

smoe::Tensor<float> normal_tensor(smoe::index_t rows, smoe::index_t cols, std::uint64_t seed) {
  smoe::Tensor<float> t({rows, cols});
  smoe::fill_normal(t, 1.0, seed, 7);
  return t;
}

MoELayer make_moe(smoe::index_t E) {
  MoELayer moe(smoe::SigmoidTopK<float>({kD, E, kK}), smoe::ReluExperts<float>({kD, E, kG}),
               smoe::WeightedSum<float>{}, smoe::EntropyLoss<float>(0.001));
  smoe::sigma_moe_init(moe, {.scale = 1.0, .seed = 1});
  moe.validate_inputs = false;
  return moe;
}

smoe::DenseMLP<float, smoe::Relu> make_dense(smoe::index_t E, smoe::index_t topk) {
  smoe::DenseMLP<float, smoe::Relu> mlp({.d_model = kD, .hidden = E * kG, .bias = false, .topk = topk});
  smoe::dense_init(mlp, {.scale = 1.0, .seed = 1});
  mlp.validate_inputs = false;
  return mlp;
}

// FLOPs of one forward: 2 per multiply-add; backward costs twice the forward GEMMs.
double moe_forward_flops(smoe::index_t E) {
  return 2.0 * kTokens * (double(kD) * E + 2.0 * kK * kG * kD);
}
double dense_forward_flops(smoe::index_t E) { return 2.0 * kTokens * 2.0 * kD * E * kG; }

void set_counters(benchmark::State& state, double flops_per_iter, smoe::index_t E) {
  state.SetItemsProcessed(state.iterations() * kTokens);
  state.counters["FLOP/s"] = benchmark::Counter(flops_per_iter * double(state.iterations()),
                                                benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
  state.counters["E"] = double(E);
  state.counters["d_ff"] = double(E * kG);
  state.counters["K"] = double(kK);
  state.counters["G"] = double(kG);
#if defined(_OPENMP)
  state.counters["threads"] = double(omp_get_max_threads());
#else
  state.counters["threads"] = 1;
#endif
}

void MoE_Fwd(benchmark::State& state) {
  const smoe::index_t E = state.range(0);
  MoELayer moe = make_moe(E);
  auto x = normal_tensor(kTokens, kD, 11);
  smoe::Tensor<float> y({kTokens, kD});
  for (auto _ : state) {
    auto out = moe.forward(x.matrix(), y.matrix(), smoe::Mode::eval);
    benchmark::DoNotOptimize(out.aux_loss);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, moe_forward_flops(E), E);
}

void MoE_FwdBwd(benchmark::State& state) {
  const smoe::index_t E = state.range(0);
  MoELayer moe = make_moe(E);
  auto x = normal_tensor(kTokens, kD, 11);
  auto dy = normal_tensor(kTokens, kD, 12);
  smoe::Tensor<float> y({kTokens, kD}), dx({kTokens, kD});
  for (auto _ : state) {
    auto out = moe.forward(x.matrix(), y.matrix(), smoe::Mode::train);
    moe.backward(dy.matrix(), dx.matrix());
    benchmark::DoNotOptimize(out.aux_loss);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, 3.0 * moe_forward_flops(E), E);
}

void dense_fwd(benchmark::State& state, smoe::index_t topk) {
  const smoe::index_t E = state.range(0);
  auto mlp = make_dense(E, topk);
  auto x = normal_tensor(kTokens, kD, 11);
  smoe::Tensor<float> y({kTokens, kD});
  for (auto _ : state) {
    mlp.forward(x.matrix(), y.matrix());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, dense_forward_flops(E), E);
}

void dense_fwd_bwd(benchmark::State& state, smoe::index_t topk) {
  const smoe::index_t E = state.range(0);
  auto mlp = make_dense(E, topk);
  auto x = normal_tensor(kTokens, kD, 11);
  auto dy = normal_tensor(kTokens, kD, 12);
  smoe::Tensor<float> y({kTokens, kD}), dx({kTokens, kD});
  for (auto _ : state) {
    mlp.forward(x.matrix(), y.matrix());
    mlp.backward(dy.matrix(), dx.matrix());
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, 3.0 * dense_forward_flops(E), E);
}

void Dense_Fwd(benchmark::State& state) { dense_fwd(state, 0); }
void Dense_FwdBwd(benchmark::State& state) { dense_fwd_bwd(state, 0); }
void TopKMLP_Fwd(benchmark::State& state) { dense_fwd(state, kK * kG); }
void TopKMLP_FwdBwd(benchmark::State& state) { dense_fwd_bwd(state, kK * kG); }

void experts_axis(benchmark::internal::Benchmark* b) {
  b->ArgName("E");
  for (int E : {8, 16, 32, 64}) b->Arg(E);
  // Wall time (the layers run on every OpenMP thread); CPU time is the whole process's.
  b->Unit(benchmark::kMillisecond)->UseRealTime()->MeasureProcessCPUTime();
  b->ComputeStatistics("min", [](const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); });
}

BENCHMARK(Dense_Fwd)->Apply(experts_axis);
BENCHMARK(MoE_Fwd)->Apply(experts_axis);
BENCHMARK(TopKMLP_Fwd)->Apply(experts_axis);
BENCHMARK(Dense_FwdBwd)->Apply(experts_axis);
BENCHMARK(MoE_FwdBwd)->Apply(experts_axis);
BENCHMARK(TopKMLP_FwdBwd)->Apply(experts_axis);

}  // namespace

BENCHMARK_MAIN();
