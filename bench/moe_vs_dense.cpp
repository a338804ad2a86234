// sigma-MoE layer vs the parameter-equal dense MLP, forward and forward+backward, in one binary.
//
//   MoE:   SigmoidTopK({d, E, K}) + ReluExperts({d, E, G}) + WeightedSum + EntropyLoss(0.001),
//          sigma_moe_init. Forward: Mode::eval. Forward+backward: Mode::train (no expert dropout,
//          so both modes route the same tokens), the aux loss included.
//   Dense: DenseMLP<float, Relu>({d, d_ff = E·G}), dense_init: the same parameter count.
//   TopK:  sigma-MoE's Top-K-activation MLP (Sec. 3.1): DenseMLP with topk = K·G.
//   EigenDense: the Dense rows' MLP through Eigen's multithreaded GEMM (a second baseline).
//
// d = 512, G = 128, K = 4, E ∈ {8, 16, 32, 64}, T = 2048 tokens, float32, x, dy ~ N(0, 1).
// validate_inputs is off on every layer. All layers use the same OpenMP threads (OMP_NUM_THREADS):
// the dense GEMMs are multithreaded by Eigen, the MoE runs experts / token blocks in parallel.
//
// Names are <Layer>_<Pass>/E:<E> (Layer ∈ {Dense, MoE, TopKMLP, EigenDense}, Pass ∈ {Fwd, FwdBwd}), as
// bench/report.py expects; they are registered E by E, and bench/run_moe_vs_dense.sh interleaves
// the repetitions at random so that slow drifts of the machine hit every layer alike. Layers are
// built once per (layer, E) and reused across repetitions (initialization is not timed).
// Counters: items/s = tokens/s; FLOP/s = useful FLOPs (2 per multiply-add; for the MoE only the
// active experts plus the router GEMM; backward counted as twice the forward).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "smoe/smoe.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

constexpr smoe::index_t kD = 512, kG = 128, kK = 4, kTokens = 2048;
constexpr int kExperts[] = {8, 16, 32, 64};

using MoELayer = smoe::MoE<smoe::SigmoidTopK<float>, smoe::ReluExperts<float>, smoe::WeightedSum<float>,
                           smoe::EntropyLoss<float>>;
using DenseLayer = smoe::DenseMLP<float, smoe::Relu>;

smoe::Tensor<float> normal_tensor(smoe::index_t rows, smoe::index_t cols, std::uint64_t seed) {
  smoe::Tensor<float> t({rows, cols});
  smoe::fill_normal(t, 1.0, seed, 7);
  return t;
}

const smoe::Tensor<float>& input_x() {
  static const smoe::Tensor<float> x = normal_tensor(kTokens, kD, 11);
  return x;
}
const smoe::Tensor<float>& input_dy() {
  static const smoe::Tensor<float> dy = normal_tensor(kTokens, kD, 12);
  return dy;
}

MoELayer& moe_layer(smoe::index_t E) {
  static std::map<smoe::index_t, std::unique_ptr<MoELayer>> cache;
  auto& slot = cache[E];
  if (!slot) {
    slot = std::make_unique<MoELayer>(smoe::SigmoidTopK<float>({kD, E, kK}), smoe::ReluExperts<float>({kD, E, kG}),
                                      smoe::WeightedSum<float>{}, smoe::EntropyLoss<float>(0.001));
    smoe::sigma_moe_init(*slot, {.scale = 1.0, .seed = 1});
    slot->validate_inputs = false;
  }
  return *slot;
}

DenseLayer& dense_layer(smoe::index_t E, smoe::index_t topk) {
  static std::map<std::pair<smoe::index_t, smoe::index_t>, std::unique_ptr<DenseLayer>> cache;
  auto& slot = cache[{E, topk}];
  if (!slot) {
    slot = std::make_unique<DenseLayer>(smoe::DenseMLPConfig{.d_model = kD, .hidden = E * kG, .bias = false, .topk = topk});
    smoe::dense_init(*slot, {.scale = 1.0, .seed = 1});
    slot->validate_inputs = false;
  }
  return *slot;
}

double moe_forward_flops(smoe::index_t E) { return 2.0 * kTokens * (double(kD) * E + 2.0 * kK * kG * kD); }
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

void moe_fwd(benchmark::State& state, smoe::index_t E) {
  MoELayer& moe = moe_layer(E);
  const auto& x = input_x();
  smoe::Tensor<float> y({kTokens, kD});
  for (auto _ : state) {
    auto out = moe.forward(x.matrix(), y.matrix(), smoe::Mode::eval);
    benchmark::DoNotOptimize(out.aux_loss);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, moe_forward_flops(E), E);
}

void moe_fwd_bwd(benchmark::State& state, smoe::index_t E) {
  MoELayer& moe = moe_layer(E);
  const auto &x = input_x(), &dy = input_dy();
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

void dense_fwd(benchmark::State& state, smoe::index_t E, smoe::index_t topk) {
  DenseLayer& mlp = dense_layer(E, topk);
  const auto& x = input_x();
  smoe::Tensor<float> y({kTokens, kD});
  for (auto _ : state) {
    mlp.forward(x.matrix(), y.matrix());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, dense_forward_flops(E), E);
}

void dense_fwd_bwd(benchmark::State& state, smoe::index_t E, smoe::index_t topk) {
  DenseLayer& mlp = dense_layer(E, topk);
  const auto &x = input_x(), &dy = input_dy();
  smoe::Tensor<float> y({kTokens, kD}), dx({kTokens, kD});
  for (auto _ : state) {
    mlp.forward(x.matrix(), y.matrix());
    mlp.backward(dy.matrix(), dx.matrix());
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, 3.0 * dense_forward_flops(E), E);
}

// The same dense MLP through Eigen's own multithreaded GEMM (outside any parallel region, Eigen
// splits each product over the OpenMP threads; its rounding then depends on the thread count,
// which is why DenseMLP does not do this). A second baseline, for scale.
struct EigenDense {
  using M = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  M w1, w2, h, dh, gw1, gw2;
  explicit EigenDense(smoe::index_t E) {
    DenseLayer& twin = dense_layer(E, 0);  // the same weights as the Dense rows
    w1 = smoe::cpu_kernels::eigen(std::as_const(twin.w1().value).matrix());
    w2 = smoe::cpu_kernels::eigen(std::as_const(twin.w2().value).matrix());
    gw1 = M::Zero(w1.rows(), w1.cols());
    gw2 = M::Zero(w2.rows(), w2.cols());
  }
  template <class X, class Y>
  void forward(const X& x, Y& y) {
    h.noalias() = x * w1;
    h = h.cwiseMax(0.0f);
    y.noalias() = h * w2;
  }
  template <class X, class Y>
  void backward(const X& x, const X& dy, Y& dx) {
    dh.noalias() = dy * w2.transpose();
    gw2.noalias() += h.transpose() * dy;
    dh = (h.array() > 0.0f).select(dh, 0.0f);
    gw1.noalias() += x.transpose() * dh;
    dx.noalias() = dh * w1.transpose();
  }
};

EigenDense& eigen_dense(smoe::index_t E) {
  static std::map<smoe::index_t, std::unique_ptr<EigenDense>> cache;
  auto& slot = cache[E];
  if (!slot) slot = std::make_unique<EigenDense>(E);
  return *slot;
}

void eigen_dense_fwd(benchmark::State& state, smoe::index_t E) {
  EigenDense& mlp = eigen_dense(E);
  const auto x = smoe::cpu_kernels::eigen(input_x().matrix());
  EigenDense::M y(kTokens, kD);
  for (auto _ : state) {
    mlp.forward(x, y);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, dense_forward_flops(E), E);
}

void eigen_dense_fwd_bwd(benchmark::State& state, smoe::index_t E) {
  EigenDense& mlp = eigen_dense(E);
  const auto x = smoe::cpu_kernels::eigen(input_x().matrix());
  const auto dy = smoe::cpu_kernels::eigen(input_dy().matrix());
  EigenDense::M y(kTokens, kD), dx(kTokens, kD);
  for (auto _ : state) {
    mlp.forward(x, y);
    mlp.backward(x, dy, dx);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, 3.0 * dense_forward_flops(E), E);
}

double min_of(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }

void configure(benchmark::internal::Benchmark* b) {
  // Wall time: the layers run on every OpenMP thread. CPU time is the whole process's.
  b->Unit(benchmark::kMillisecond)->UseRealTime()->MeasureProcessCPUTime();
  b->ComputeStatistics("min", min_of);
}

const int registered = [] {
  for (int E : kExperts) {
    const std::string e = "/E:" + std::to_string(E);
    configure(benchmark::RegisterBenchmark(("Dense_Fwd" + e).c_str(), dense_fwd, E, 0));
    configure(benchmark::RegisterBenchmark(("MoE_Fwd" + e).c_str(), moe_fwd, E));
    configure(benchmark::RegisterBenchmark(("TopKMLP_Fwd" + e).c_str(), dense_fwd, E, kK * kG));
    configure(benchmark::RegisterBenchmark(("Dense_FwdBwd" + e).c_str(), dense_fwd_bwd, E, 0));
    configure(benchmark::RegisterBenchmark(("MoE_FwdBwd" + e).c_str(), moe_fwd_bwd, E));
    configure(benchmark::RegisterBenchmark(("TopKMLP_FwdBwd" + e).c_str(), dense_fwd_bwd, E, kK * kG));
    configure(benchmark::RegisterBenchmark(("EigenDense_Fwd" + e).c_str(), eigen_dense_fwd, E));
    configure(benchmark::RegisterBenchmark(("EigenDense_FwdBwd" + e).c_str(), eigen_dense_fwd_bwd, E));
  }
  return 0;
}();

}  // namespace

BENCHMARK_MAIN();
