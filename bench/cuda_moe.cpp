// The CUDA MoE layer at the anchor shapes of ../shared/anchors/torch_moe_baselines.py (OLMoE-,
// Mixtral- and DeepSeek-V3-like prefill and decode, sigma-MoE WT103-like and e8), bf16 experts
// and activations, fp32 routing: softmax top-k renormalized (the anchor's router), SwiGLU or ReLU
// experts without biases, no aux loss (the anchor has none).
//   MoE_Fwd/<shape>     forward (Mode::eval)
//   MoE_FwdBwd/<shape>  forward + backward (Mode::train: weight gradients included)
//   Dense_Fwd/<shape>, Dense_FwdBwd/<shape>  (sigma-MoE shapes) the parameter-equal dense MLP,
//                       d → E·G → d with the experts' activation, cuBLAS GEMMs (cuda/dense_gemm.cuh)
// Timed with CUDA events on the layer's stream (manual time); counters: TFLOP/s of the experts'
// useful FLOPs (2·K·d·(fan+1)·G per token forward, 3× that for forward+backward, as the anchor).
// Built by nvcc (bench_cuda_moe) and in the host-emulated build (bench_cuda_moe_emulated), which
// runs the same code on scaled-down shapes (SMOE_BENCH_SMOKE=1 selects those on a GPU too).
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>

#include <smoe/cuda.cuh>

namespace {

using dev = smoe::cuda;
using smoe::bf16;
using smoe::index_t;

struct Shape {
  const char* name;
  index_t tokens, d, G, E, K;
  bool glu;
};

constexpr Shape kShapes[] = {
    {"olmoe-prefill", 16384, 2048, 1024, 64, 8, true},   {"mixtral-prefill", 8192, 4096, 14336, 8, 2, true},
    {"dsv3-prefill", 8192, 7168, 2048, 256, 8, true},    {"sigma-moe-wt103", 16384, 1024, 128, 128, 4, false},
    {"sigma-moe-e8", 16384, 512, 128, 16, 4, false},     {"olmoe-decode-16", 16, 2048, 1024, 64, 8, true},
    {"mixtral-decode-1", 1, 4096, 14336, 8, 2, true},    {"dsv3-decode-64", 64, 7168, 2048, 256, 8, true},
};

bool smoke() {
  const char* s = std::getenv("SMOE_BENCH_SMOKE");
  return smoe::cuda_emulated || (s != nullptr && std::string(s) == "1");
}

// Smoke shapes keep the structure (E, K, gating) at sizes the emulated build runs in milliseconds.
Shape scaled(Shape s) {
  if (!smoke()) return s;
  s.tokens = std::max<index_t>(1, s.tokens / 256);
  s.d = 32;
  s.G = 16;
  s.E = std::min<index_t>(s.E, 16);
  s.K = std::min(s.K, s.E);
  return s;
}

// Elapsed time of work queued on a stream: CUDA events on a GPU, a host clock in the emulated build.
class StreamTimer {
 public:
  explicit StreamTimer(smoe::cuda_stream s) : stream_(s) {
#if !defined(SMOE_CUDA_EMULATION)
    cudaEventCreate(&start_);
    cudaEventCreate(&stop_);
#endif
  }
  ~StreamTimer() {
#if !defined(SMOE_CUDA_EMULATION)
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
#endif
  }
  void start() {
#if defined(SMOE_CUDA_EMULATION)
    t0_ = std::chrono::steady_clock::now();
#else
    cudaEventRecord(start_, stream_);
#endif
  }
  double stop_seconds() {
#if defined(SMOE_CUDA_EMULATION)
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
#else
    cudaEventRecord(stop_, stream_);
    cudaEventSynchronize(stop_);
    float ms = 0;
    cudaEventElapsedTime(&ms, start_, stop_);
    return ms * 1e-3;
#endif
  }

 private:
  smoe::cuda_stream stream_;
#if defined(SMOE_CUDA_EMULATION)
  std::chrono::steady_clock::time_point t0_;
#else
  cudaEvent_t start_, stop_;
#endif
};

template <class Act>
void run(benchmark::State& state, Shape shape, bool backward) {
  const Shape s = scaled(shape);
  std::string why;
  if (!smoe::cuda_device_available(&why)) {
    state.SkipWithError(("no usable CUDA device: " + why).c_str());
    return;
  }
  const smoe::cuda_stream stream{};
  smoe::TopKRouterConfig rc{.d_model = s.d, .experts = s.E, .k = s.K};
  smoe::MoE layer(smoe::TopKRouter<bf16, smoe::SoftmaxGate, dev>(rc, {true}),
                  smoe::FeedForwardExperts<bf16, Act, dev>({s.d, s.E, s.G}), smoe::WeightedSum<bf16, dev>{});
  std::uint64_t seed = 1;
  layer.for_each_parameter([&](std::string_view, auto& p) {
    smoe::fill_normal(p.value, 0.02, ++seed);
    p.grad.zero();
  });
  smoe::Tensor<bf16, dev> x({s.tokens, s.d}), y({s.tokens, s.d}), dy({s.tokens, s.d}), dx({s.tokens, s.d});
  smoe::fill_normal(x, 1.0, 101);
  smoe::fill_normal(dy, 1.0, 102);
  const smoe::Mode mode = backward ? smoe::Mode::train : smoe::Mode::eval;
  auto step = [&] {
    layer.forward(std::as_const(x).matrix(), y.matrix(), mode);
    if (backward) layer.backward(std::as_const(dy).matrix(), dx.matrix());
  };
  step();  // warm-up: allocations and first-touch
  smoe::synchronize(stream);
  StreamTimer timer(stream);
  for (auto _ : state) {
    timer.start();
    step();
    state.SetIterationTime(timer.stop_seconds());
  }
  const double flops = 2.0 * double(s.tokens * s.K) * double(s.d) * double((Act::fan + 1) * s.G) * (backward ? 3 : 1);
  state.counters["TFLOP/s"] = benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tokens"] = double(s.tokens);
}

// y = act(x·W1)·W2, W1 [d, D], W2 [D, d], D = E·G (fan 1: the sigma-MoE shapes' ReLU).
struct ReluForward {
  const bf16* pre;
  bf16* h;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    const float v = smoe::to_acc(pre[i]);
    h[i] = smoe::from_acc<bf16>(v > 0 ? v : 0.0f);
  }
};
struct ReluBackward {
  const bf16* pre;
  bf16* dh;  // in place: dh → dpre
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    if (!(smoe::to_acc(pre[i]) > 0)) dh[i] = smoe::from_acc<bf16>(0.0f);
  }
};

void run_dense(benchmark::State& state, Shape shape, bool backward) {
  using smoe::cuda_kernels::dense_gemm;
  const Shape s = scaled(shape);
  std::string why;
  if (!smoe::cuda_device_available(&why)) {
    state.SkipWithError(("no usable CUDA device: " + why).c_str());
    return;
  }
  const smoe::cuda_stream stream{};
  const index_t T = s.tokens, d = s.d, D = s.E * s.G;
  smoe::Tensor<bf16, dev> w1({d, D}), w2({D, d}), g1({d, D}), g2({D, d}), pre({T, D}), h({T, D}), x({T, d}), y({T, d}),
      dy({T, d}), dx({T, d});
  smoe::fill_normal(w1, 0.02, 1);
  smoe::fill_normal(w2, 0.02, 2);
  smoe::fill_normal(x, 1.0, 101);
  smoe::fill_normal(dy, 1.0, 102);
  g1.zero();
  g2.zero();
  auto step = [&] {
    dense_gemm(stream, T, D, d, x.data(), d, false, w1.data(), D, false, pre.data(), D, false);
    smoe::cuda_kernels::for_each_index(stream, T * D, ReluForward{pre.data(), h.data()});
    dense_gemm(stream, T, d, D, h.data(), D, false, w2.data(), d, false, y.data(), d, false);
    if (!backward) return;
    dense_gemm(stream, D, d, T, h.data(), D, true, dy.data(), d, false, g2.data(), d, true);  // dW2 = hᵀ·dy
    // h is not needed any more: it holds dh = dy·W2ᵀ, then dpre = dh ⊙ [pre > 0].
    dense_gemm(stream, T, D, d, dy.data(), d, false, w2.data(), d, true, h.data(), D, false);
    smoe::cuda_kernels::for_each_index(stream, T * D, ReluBackward{pre.data(), h.data()});
    dense_gemm(stream, d, D, T, x.data(), d, true, h.data(), D, false, g1.data(), D, true);   // dW1 = xᵀ·dpre
    dense_gemm(stream, T, d, D, h.data(), D, false, w1.data(), D, true, dx.data(), d, false);  // dx = dpre·W1ᵀ
  };
  step();
  smoe::synchronize(stream);
  StreamTimer timer(stream);
  for (auto _ : state) {
    timer.start();
    step();
    state.SetIterationTime(timer.stop_seconds());
  }
  const double flops = 2.0 * double(T) * double(d) * double(2 * D) * (backward ? 3 : 1);
  state.counters["TFLOP/s"] = benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tokens"] = double(T);
}

const bool registered = [] {
  for (const Shape& shape : kShapes)
    for (const bool backward : {false, true}) {
      const std::string name = std::string(backward ? "MoE_FwdBwd/" : "MoE_Fwd/") + shape.name;
      auto* b = shape.glu ? benchmark::RegisterBenchmark(name.c_str(), run<smoe::SwiGlu>, shape, backward)
                          : benchmark::RegisterBenchmark(name.c_str(), run<smoe::Relu>, shape, backward);
      b->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(smoke() ? 0.01 : 0.5);
      if (std::string(shape.name).rfind("sigma-moe", 0) == 0) {
        const std::string dense = std::string(backward ? "Dense_FwdBwd/" : "Dense_Fwd/") + shape.name;
        benchmark::RegisterBenchmark(dense.c_str(), run_dense, shape, backward)
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond)
            ->MinTime(smoke() ? 0.01 : 0.5);
      }
    }
  return true;
}();

}  // namespace

BENCHMARK_MAIN();
