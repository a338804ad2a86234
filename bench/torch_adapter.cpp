// The cost of smoe::TorchLayer (smoe/interop/torch.hpp) against calling the same smoe layer
// directly, in the same run: a sigma-MoE layer's forward, and forward + backward, float32.
//   OMP_NUM_THREADS=1 build/bench/bench_torch --benchmark_repetitions=10
//       --benchmark_enable_random_interleaving=true --benchmark_report_aggregates_only=true
// (one thread and interleaved repetitions: the 2-core machine is shared, and order effects are
// larger than the adapter's cost).
// The adapter's work is per call, not per token: argument checks, the autograd node, output
// allocation (torch::empty; smoe direct writes into preallocated tensors) and the gradient
// tensors of backward. docs/interop.md records the numbers.
#include <smoe/interop/torch.hpp>

#include <torch/csrc/autograd/autograd.h>

#include <benchmark/benchmark.h>

#include <smoe/smoe.hpp>

namespace {

using SigmaMoE = smoe::MoE<smoe::SigmoidTopK<float>, smoe::ReluExperts<float>, smoe::WeightedSum<float>,
                           smoe::EntropyLoss<float>>;

// Tokens from the benchmark's argument; d = 256, E = 16 experts of 64 hidden units, K = 4.
constexpr smoe::index_t d = 256, E = 16, G = 64, K = 4;

SigmaMoE make_layer() {
  SigmaMoE layer(smoe::SigmoidTopK<float>({.d_model = d, .experts = E, .k = K}),
                 smoe::ReluExperts<float>({.d_model = d, .experts = E, .hidden = G}), smoe::WeightedSum<float>{},
                 smoe::EntropyLoss<float>(0.001));
  smoe::sigma_moe_init(layer, {.seed = 1});
  return layer;
}

torch::Tensor input(smoe::index_t tokens, std::uint64_t seed) {
  torch::Tensor t = torch::empty({tokens, d}, torch::kFloat32);
  float* p = t.data_ptr<float>();
  for (smoe::index_t i = 0; i < t.numel(); ++i) p[i] = float(smoe::standard_normal(seed, std::uint64_t(i), 3));
  return t;
}

void smoe_forward(benchmark::State& state) {
  const smoe::index_t tokens = state.range(0);
  SigmaMoE layer = make_layer();
  const torch::Tensor x = input(tokens, 1);
  smoe::Tensor<float> y({tokens, d});
  const smoe::ConstMatrixView<float> xv(x.data_ptr<float>(), tokens, d);
  for (auto _ : state) benchmark::DoNotOptimize(layer.forward(xv, y.matrix(), smoe::Mode::train).aux_loss);
  state.SetItemsProcessed(state.iterations() * tokens);
}

void torch_forward_no_grad(benchmark::State& state) {
  const smoe::index_t tokens = state.range(0);
  auto module = smoe::make_torch_layer(make_layer());
  const torch::Tensor x = input(tokens, 1);
  torch::NoGradGuard no_grad;
  for (auto _ : state) benchmark::DoNotOptimize(module->forward(x).y.data_ptr());
  state.SetItemsProcessed(state.iterations() * tokens);
}

void smoe_forward_backward(benchmark::State& state) {
  const smoe::index_t tokens = state.range(0);
  SigmaMoE layer = make_layer();
  const torch::Tensor x = input(tokens, 1), dy = input(tokens, 2);
  smoe::Tensor<float> y({tokens, d}), dx({tokens, d});
  const smoe::ConstMatrixView<float> xv(x.data_ptr<float>(), tokens, d), dyv(dy.data_ptr<float>(), tokens, d);
  for (auto _ : state) {
    layer.forward(xv, y.matrix(), smoe::Mode::train);
    smoe::zero_grad(layer);
    layer.backward(dyv, dx.matrix());
    benchmark::DoNotOptimize(dx.data());
  }
  state.SetItemsProcessed(state.iterations() * tokens);
}

// The same objective, Σ y ⊙ dy + aux: autograd is seeded with dy and 1 (no extra torch ops).
void torch_forward_backward(benchmark::State& state) {
  const smoe::index_t tokens = state.range(0);
  auto module = smoe::make_torch_layer(make_layer());
  const torch::Tensor x = input(tokens, 1).requires_grad_(true), dy = input(tokens, 2);
  const torch::Tensor one = torch::ones({}, torch::kFloat32);
  for (auto _ : state) {
    module->zero_grad();
    torch::Tensor(x).mutable_grad().reset();  // x.grad takes backward's dx as is (no accumulation)
    const smoe::TorchLayerOutput o = module->forward(x);
    torch::autograd::backward({o.y, o.aux_loss}, {dy, one});
    benchmark::DoNotOptimize(x.grad().data_ptr());
  }
  state.SetItemsProcessed(state.iterations() * tokens);
}

}  // namespace

BENCHMARK(smoe_forward)->Arg(8)->Arg(64)->Arg(1024)->Unit(benchmark::kMicrosecond);
BENCHMARK(torch_forward_no_grad)->Arg(8)->Arg(64)->Arg(1024)->Unit(benchmark::kMicrosecond);
BENCHMARK(smoe_forward_backward)->Arg(8)->Arg(64)->Arg(1024)->Unit(benchmark::kMicrosecond);
BENCHMARK(torch_forward_backward)->Arg(8)->Arg(64)->Arg(1024)->Unit(benchmark::kMicrosecond);
BENCHMARK_MAIN();
