#pragma once
// ProductKeyRouter<T, cuda>: routing/product_key_router.hpp's product-key memory addressing on the
// device, same parameters and names ("keys_a", "keys_b" [H, N, d/2]), kept in the gate type (fp32;
// fp64 for T = double) whatever T is, like every device router.
//   forward:  u_a = x_a·keys_aᵀ, u_b = x_b·keys_bᵀ   [T, H·N] (cuda/linear_scores.cuh's GEMM on the
//             halves of x), then per token and head: the K best sub-keys of each half, the K best
//             of the pairs (p+1)(q+1) <= K of those (the CPU's candidate set and total order, so the
//             same ids), and the gates (the CPU's own __host__ __device__ activation).
//   backward: d_score per token (the CPU's gradient of the activation), scattered onto du_a, du_b
//             per token in slot order; keys.grad += duᵀ·x_half (per-element reductions over tokens
//             in order), dx_half += du·keys.
// K is at most max_topk (32) on the device: the kept lists live in registers.
#include <cstdint>
#include <string_view>

#include "smoe/core/parameter.hpp"
#include "smoe/cuda/device_tensor.cuh"
#include "smoe/cuda/linear_scores.cuh"
#include "smoe/cuda/routing.cuh"
#include "smoe/cuda/topk.cuh"
#include "smoe/routing/product_key_router.hpp"

namespace smoe {

namespace cuda_kernels {

// One token: per head, the top-K sub-keys of each half, the top-K candidate pairs, then the gates.
template <class G>
struct ProductKeySelect {
  const G* ua;
  const G* ub;
  index_t H, N, K;
  PkmActivation activation;
  std::int32_t* ids;
  G* gates;
  SMOE_HOST_DEVICE void operator()(index_t t) const {
    std::int32_t* id = ids + t * H * K;
    G* g = gates + t * H * K;
    for (index_t h = 0; h < H; ++h) {
      const G* a = ua + (t * H + h) * N;
      const G* b = ub + (t * H + h) * N;
      std::int32_t ia[max_topk], jb[max_topk];
      topk_row(a, N, K, ia, NotRemoved{});
      topk_row(b, N, K, jb, NotRemoved{});
      TopKList<G> best;
      best.k = K;
      for (index_t p = 0; p < K; ++p)  // the pair (p, q) is beaten by (p+1)(q+1) − 1 others
        for (index_t q = 0; (p + 1) * (q + 1) <= K; ++q)
          best.offer(a[ia[p]] + b[jb[q]], static_cast<std::int32_t>(ia[p] * N + jb[q]));
      for (index_t r = 0; r < K; ++r) {
        id[h * K + r] = best.kept[r].index;
        g[h * K + r] = best.kept[r].score;
      }
    }
    detail::pkm_activate(activation, H, K, g);
  }
};

// One token: d_score from the gates, added onto the sub-key scores each selected pair sums.
template <class G>
struct ProductKeyScoreGradient {
  const std::int32_t* ids;
  const G* gates;
  const G* d_gates;
  index_t d_gates_stride, H, N, K;
  PkmActivation activation;
  G* du_a;
  G* du_b;
  SMOE_HOST_DEVICE void operator()(index_t t) const {
    const index_t HK = H * K;
    const std::int32_t* id = ids + t * HK;
    G d_score[max_topk * max_topk];
    G* dua = du_a + t * H * N;
    G* dub = du_b + t * H * N;
    for (index_t i = 0; i < H * N; ++i) dua[i] = dub[i] = G(0);
    // H·K can exceed the scratch: the gradient is taken head by head where the activation allows.
    const index_t chunk = activation == PkmActivation::softmax_across_heads ? HK : K;
    for (index_t begin = 0; begin < HK; begin += chunk) {
      const index_t heads = chunk / K;
      detail::pkm_score_gradient(activation, heads, K, id + begin, gates + t * HK + begin,
                                 d_gates + t * d_gates_stride + begin, d_score);
      for (index_t q = 0; q < chunk; ++q) {
        const std::int32_t v = id[begin + q];
        if (v < 0 || v >= N * N) continue;  // dropped by capacity (or invalid: the dispatch flags it)
        const index_t h = (begin + q) / K;
        dua[h * N + v / N] += d_score[q];
        dub[h * N + v % N] += d_score[q];
      }
    }
  }
};

}  // namespace cuda_kernels

template <class T>
class ProductKeyRouter<T, cuda> {
 public:
  using scalar_type = T;
  using gate_type = acc_t<T>;
  using backend = cuda;
  using G = gate_type;
  static constexpr const char* name = "ProductKeyRouter<cuda>";
  // The heads of softmax_across_heads share one softmax: H·K scores of a token in one scratch.
  static constexpr index_t max_scores_across_heads = cuda_kernels::max_topk * cuda_kernels::max_topk;

  explicit ProductKeyRouter(ProductKeyRouterConfig config, cuda_stream stream = {})
      : config_((config.validate(name), config)) {
    if (config.k > cuda_kernels::max_topk)
      fail(name, ": k must be <= ", cuda_kernels::max_topk, " on the CUDA backend, got ", config.k);
    if (config.activation == PkmActivation::softmax_across_heads && config.heads * config.k > max_scores_across_heads)
      fail(name, ": heads·k must be <= ", max_scores_across_heads, " with softmax_across_heads on the CUDA backend, got ",
           config.heads * config.k);
    keys_a_ = Parameter<G, cuda>({config.heads, config.n_keys, config.d_model / 2});
    keys_b_ = Parameter<G, cuda>({config.heads, config.n_keys, config.d_model / 2});
    set_stream(stream);
  }

  index_t experts() const { return config_.n_keys * config_.n_keys; }
  index_t k() const { return config_.heads * config_.k; }
  index_t d_model() const { return config_.d_model; }
  index_t n_keys() const { return config_.n_keys; }
  index_t heads() const { return config_.heads; }
  index_t k_per_head() const { return config_.k; }
  const ProductKeyRouterConfig& config() const { return config_; }
  Parameter<G, cuda>& keys_a() { return keys_a_; }
  Parameter<G, cuda>& keys_b() { return keys_b_; }
  cuda_stream stream() const { return stream_; }
  void set_stream(cuda_stream s) {
    stream_ = s;
    for (auto* p : {&keys_a_, &keys_b_}) {
      p->value.set_stream(s);
      p->grad.set_stream(s);
    }
    for (auto* t : {&ua_, &ub_}) t->set_stream(s);
  }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("keys_a"), keys_a_);
    f(std::string_view("keys_b"), keys_b_);
  }

  void forward(ConstMatrixView<T, cuda> x, Routing<G, cuda>& out, Mode) {
    using namespace cuda_kernels;
    expect_shape(name, "x", x, x.rows, d_model());
    const index_t tokens = x.rows, H = heads(), N = n_keys(), K = k_per_head(), half = d_model() / 2;
    prepare_routing(out, tokens, 0, H * K, stream_);
    if (tokens == 0) return;
    ua_.resize({tokens, H * N});
    ub_.resize({tokens, H * N});
    linear_scores_forward(stream_, ConstMatrixView<T, cuda>(x.data, tokens, half, x.stride), keys_a_.value.data(), H * N,
                          ua_.data());
    linear_scores_forward(stream_, ConstMatrixView<T, cuda>(x.data + half, tokens, half, x.stride), keys_b_.value.data(),
                          H * N, ub_.data());
    for_each_index(stream_, tokens,
                   ProductKeySelect<G>{ua_.data(), ub_.data(), H, N, K, config_.activation, out.experts.data(),
                                       out.gates.data()});
  }

  // d_logits is [T, E] (as MoE<> passes it) or empty: nothing flows through it (no logits).
  void backward(ConstMatrixView<T, cuda> x, const Routing<G, cuda>& r, ConstMatrixView<G, cuda> d_gates,
                MatrixView<G, cuda> d_logits, MatrixView<T, cuda> dx) {
    using namespace cuda_kernels;
    const index_t tokens = x.rows, H = heads(), N = n_keys(), K = k_per_head(), half = d_model() / 2;
    expect_shape(name, "x", x, tokens, d_model());
    expect_shape(name, "routing.experts", r.experts.matrix(), tokens, H * K);
    expect_shape(name, "routing.gates", r.gates.matrix(), tokens, H * K);
    expect_shape(name, "d_gates", d_gates, tokens, H * K);
    if (!d_logits.empty()) expect_equal(name, "d_logits rows", tokens, d_logits.rows);
    expect_shape(name, "dx", dx, tokens, d_model());
    if (tokens == 0) return;
    ua_.resize({tokens, H * N});  // reused as du_a, du_b
    ub_.resize({tokens, H * N});
    for_each_index(stream_, tokens,
                   ProductKeyScoreGradient<G>{r.experts.data(), r.gates.data(), d_gates.data, d_gates.stride, H, N, K,
                                              config_.activation, ua_.data(), ub_.data()});
    const ConstMatrixView<T, cuda> xa(x.data, tokens, half, x.stride), xb(x.data + half, tokens, half, x.stride);
    const ConstMatrixView<G, cuda> dua(ua_.data(), tokens, H * N, H * N), dub(ub_.data(), tokens, H * N, H * N);
    // Key gradients read x before dx is written, so dx may alias x.
    linear_scores_weight_grad(stream_, xa, dua, keys_a_.grad.data());
    linear_scores_weight_grad(stream_, xb, dub, keys_b_.grad.data());
    linear_scores_input_grad(stream_, dua, keys_a_.value.data(), MatrixView<T, cuda>(dx.data, tokens, half, dx.stride));
    linear_scores_input_grad(stream_, dub, keys_b_.value.data(),
                             MatrixView<T, cuda>(dx.data + half, tokens, half, dx.stride));
  }

 private:
  ProductKeyRouterConfig config_;
  cuda_stream stream_{};
  Parameter<G, cuda> keys_a_, keys_b_;
  Tensor<G, cuda> ua_, ub_;  // sub-key scores in forward, their gradients in backward
};

}  // namespace smoe
