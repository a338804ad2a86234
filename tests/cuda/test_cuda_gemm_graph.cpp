// The dense GEMM (cuda/dense_gemm.cuh: cuBLAS on a GPU, the portable twins otherwise) against a
// naive double-precision reference, every transpose case and dtype; the dense MLP (and its Top-K
// activation variant) against the CPU layer; and, on a GPU only, CUDA-graph capture and replay of
// a layer's forward and backward against the eager run.
#include "device_test_support.hpp"

namespace gemm_graph_test {

// C = op(A)·op(B) (+ C0) in double on the host, row-major, from the stored A, B.
Tensor<double> reference_gemm(const Tensor<float>& a, bool trans_a, const Tensor<float>& b, bool trans_b, index_t M,
                              index_t N, index_t K, const Tensor<float>* c0) {
  Tensor<double> c({M, N});
  for (index_t i = 0; i < M; ++i)
    for (index_t j = 0; j < N; ++j) {
      double sum = c0 ? double((*c0)[i * N + j]) : 0.0;
      for (index_t k = 0; k < K; ++k)
        sum += double(trans_a ? a[k * M + i] : a[i * K + k]) * double(trans_b ? b[j * K + k] : b[k * N + j]);
      c[i * N + j] = sum;
    }
  return c;
}

template <class T>
void check_dense_gemm(index_t M, index_t N, index_t K, bool trans_a, bool trans_b, bool accumulate, std::uint64_t seed) {
  INFO(dtype_name<T>() << " M " << M << " N " << N << " K " << K << " trans_a " << trans_a << " trans_b " << trans_b
                       << " accumulate " << accumulate);
  const Tensor<float> a = rounded<T>(trans_a ? random_matrix<float>(K, M, seed) : random_matrix<float>(M, K, seed));
  const Tensor<float> b = rounded<T>(trans_b ? random_matrix<float>(N, K, seed + 1) : random_matrix<float>(K, N, seed + 1));
  const Tensor<float> c0 = rounded<T>(random_matrix<float>(M, N, seed + 2));
  const Tensor<double> want = reference_gemm(a, trans_a, b, trans_b, M, N, K, accumulate ? &c0 : nullptr);
  const auto ad = to_device<T>(a), bd = to_device<T>(b);
  for (const auto path : {cuda_kernels::GemmPath::fastest, cuda_kernels::GemmPath::portable}) {
    if (trans_a && trans_b && path == cuda_kernels::GemmPath::portable) continue;  // not a portable case
    INFO("path " << (path == cuda_kernels::GemmPath::fastest ? "fastest" : "portable"));
    auto c = accumulate ? to_device<T>(c0) : device_nan<T>({M, N});
    cuda_kernels::dense_gemm(cuda_stream{}, M, N, K, ad.data(), trans_a ? M : K, trans_a, bd.data(), trans_b ? K : N,
                             trans_b, c.data(), N, accumulate, path);
    // 16-bit C rounds the result; fp32 sums of K products in any order stay within 1e-5 of the scale.
    require_close_scaled(to_host<float>(c), want, sizeof(T) == 2 ? 1e-2 : 1e-5, "C");
  }
}

template <class T, class Act>
void check_dense_mlp(index_t tokens, index_t d, index_t G, bool bias, index_t topk, std::uint64_t seed) {
  INFO(dtype_name<T>() << " " << Act::name << " tokens " << tokens << " d " << d << " G " << G << " bias " << bias
                       << " topk " << topk);
  const DenseMLPConfig c{.d_model = d, .hidden = G, .bias = bias, .topk = topk};
  DenseMLP<float, Act> host(c);
  DenseMLP<T, Act, dev> device(c);
  std::uint64_t s = seed;
  host.for_each_parameter([&](std::string_view, Parameter<float>& p) {
    smoe::test::randomize(p.value, ++s, 0.3);
    p.value = rounded<T>(p.value);
  });
  copy_parameters_to_device(host, device);
  const Tensor<float> x = rounded<T>(random_matrix<float>(tokens, d, seed + 10));
  const Tensor<float> dy = rounded<T>(random_matrix<float>(tokens, d, seed + 11));
  Tensor<float> y({tokens, d}), dx({tokens, d});
  host.forward(x.matrix(), y.matrix());
  host.backward(dy.matrix(), dx.matrix());
  const auto xd = to_device<T>(x);
  auto yd = device_nan<T>({tokens, d}), dxd = device_nan<T>({tokens, d});
  device.forward(xd.matrix(), yd.matrix());
  device.backward(to_device<T>(dy).matrix(), dxd.matrix());
  const double tol = device_tolerance<T>();
  require_close_scaled(to_host<float>(yd), y, tol, "y");
  require_close_scaled(to_host<float>(dxd), dx, tol, "dx");
  for_each_parameter_pair(host, device, [&](std::string_view name, auto& hp, auto& dp) {
    require_close_scaled(to_host<float>(dp.grad), hp.grad, tol, std::string(name) + ".grad");
  });
  CHECK(device.total_parameters() == host.total_parameters());
}

}  // namespace gemm_graph_test

TEST_CASE("cuda dense_gemm: every transpose case against a double reference", "[cuda][gemm]") {
  using gemm_graph_test::check_dense_gemm;
  for (const bool accumulate : {false, true}) {
    check_dense_gemm<float>(37, 29, 50, false, false, accumulate, 1);
    check_dense_gemm<float>(37, 29, 50, false, true, accumulate, 2);
    check_dense_gemm<float>(37, 29, 50, true, false, accumulate, 3);
    check_dense_gemm<bf16>(64, 40, 128, false, true, accumulate, 4);
    check_dense_gemm<fp16>(16, 72, 33, true, false, accumulate, 5);
    check_dense_gemm<double>(9, 11, 13, false, false, accumulate, 6);
  }
  check_dense_gemm<float>(1, 1, 1, false, false, false, 7);
  check_dense_gemm<float>(5, 3, 0, false, false, false, 8);  // K = 0: C = 0
  CHECK_THROWS_WITH((cuda_kernels::dense_gemm<float, float>(cuda_stream{}, 2, 2, 2, nullptr, 2, true, nullptr, 2, true,
                                                            nullptr, 2, false, cuda_kernels::GemmPath::portable)),
                    Catch::Contains("the portable Aᵀ·B needs B untransposed"));
}

TEST_CASE("cuda DenseMLP: dense and Top-K activation MLPs equal the CPU layer", "[cuda][dense]") {
  using gemm_graph_test::check_dense_mlp;
  for (const index_t tokens : {index_t(45), index_t(1), index_t(0)}) {
    check_dense_mlp<float, Relu>(tokens, 16, 24, false, 0, 1);
    check_dense_mlp<float, Relu>(tokens, 16, 24, true, 5, 2);
    check_dense_mlp<float, Gelu>(tokens, 12, 20, true, 0, 3);
    check_dense_mlp<float, SwiGlu>(tokens, 12, 20, false, 3, 4);
  }
  check_dense_mlp<bf16, SwiGlu>(33, 32, 48, true, 0, 5);
  check_dense_mlp<double, Relu>(20, 8, 12, true, 4, 6);
  CHECK_THROWS_WITH((DenseMLP<float, Relu, dev>({.d_model = 8, .hidden = 64, .topk = 33})),
                    Catch::Contains("topk must be <= 32 on the device, got 33"));
  DenseMLP<float, Relu, dev> mlp({.d_model = 8, .hidden = 16});
  Tensor<float, dev> x({3, 8}), y({3, 8}), bad({3, 9});
  CHECK_THROWS_WITH(mlp.forward(std::as_const(x).matrix(), bad.matrix()), Catch::Contains("y must be [3, 8], got [3, 9]"));
  CHECK_THROWS_WITH(mlp.backward(std::as_const(x).matrix(), y.matrix()), Catch::Contains("backward called before forward"));
}

#if !defined(SMOE_CUDA_EMULATION)
TEST_CASE("cuda MoE layer: a CUDA graph of forward + backward replays the eager run (GPU only)", "[cuda][gpu]") {
  const index_t d = 64, E = 8, G = 32, tokens = 200;
  cudaStream_t stream = nullptr;
  REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess);
  // No expert dropout: a graph replays the mask of the step it captured (docs/cuda.md).
  TopKRouterConfig rc{.d_model = d, .experts = E, .k = 2};
  MoE host(SigmoidTopK<float>(rc), ReluExperts<float>({d, E, G, true}));
  sigma_moe_init(host, {.seed = 3});
  MoE layer(SigmoidTopK<bf16, dev>(rc), ReluExperts<bf16, dev>({d, E, G, true}), WeightedSum<bf16, dev>{},
            EntropyLoss<float, dev>(0.01));
  layer.set_stream(stream);
  copy_parameters_to_device(host, layer);
  const auto x = to_device<bf16>(random_matrix<float>(tokens, d, 1), stream);
  const auto dy = to_device<bf16>(random_matrix<float>(tokens, d, 2), stream);
  Tensor<bf16, dev> y({tokens, d}, stream), dx({tokens, d}, stream);
  auto step = [&] {
    zero_grad(layer);
    layer.forward(x.matrix(), y.matrix(), Mode::train);
    layer.backward(dy.matrix(), dx.matrix());
  };
  auto snapshot = [&] {
    std::vector<float> all;
    for (const auto& t : {to_host<float>(y), to_host<float>(dx), to_host<float>(layer.experts().w1().grad),
                          to_host<float>(layer.router().weight().grad)})
      all.insert(all.end(), t.data(), t.data() + t.size());
    return all;
  };
  step();  // eager; also sizes every buffer, so the captured work allocates nothing new
  const auto eager = snapshot();
  cudaGraph_t graph = nullptr;
  REQUIRE(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) == cudaSuccess);
  step();
  REQUIRE(cudaStreamEndCapture(stream, &graph) == cudaSuccess);
  cudaGraphExec_t exec = nullptr;
  REQUIRE(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess);
  y.fill(from_acc<bf16>(0.0f));
  dx.fill(from_acc<bf16>(0.0f));
  REQUIRE(cudaGraphLaunch(exec, stream) == cudaSuccess);
  const auto replayed = snapshot();
  REQUIRE(replayed.size() == eager.size());
  CHECK(std::memcmp(replayed.data(), eager.data(), eager.size() * sizeof(float)) == 0);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}
#endif
