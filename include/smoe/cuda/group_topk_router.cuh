#pragma once
// GroupTopKRouter<T, cuda>: DeepSeek-V3's group-limited sigmoid routing with the aux-loss-free
// selection bias (routing/group_topk.hpp) on the device, with the CPU's gate math (shared
// __host__ __device__ code) and tie rules. Weight, logits, gates and bias in fp32 (fp64 for T =
// double). Device limits: n_groups <= 64, topk_groups <= 32, k <= 32.
//   forward:   s = x·Wᵀ; q = σ(s) + b; group score = sum of its two best q; keep topk_groups groups;
//              ids = top-k of q in the kept groups; gates = route_scale · σ(s_id) / Σ σ
//   backward:  through the normalized gates into W and x (selection and bias get none)
// The bias is a buffer ("bias", for_each_buffer); update_bias(u) applies b_e += u·sign(mean − load_e)
// with the last forward's per-expert load, on the device.
#include <cstdint>
#include <string_view>

#include "smoe/core/parameter.hpp"
#include "smoe/cuda/device_tensor.cuh"
#include "smoe/cuda/linear_scores.cuh"
#include "smoe/cuda/topk.cuh"
#include "smoe/routing/group_topk.hpp"
#include "smoe/cuda/routing.cuh"
#include "smoe/routing/routing.hpp"

namespace smoe {

namespace cuda_kernels {

inline constexpr index_t max_groups = 64;

template <class G>
struct GroupSelect {
  const G* logits;
  const G* bias;
  G* q;  // [T, E] scratch
  std::int32_t* ids;
  G* gates;
  index_t E, K, groups, keep;
  G route_scale;
  struct NotKept {
    std::uint64_t kept;
    index_t size;
    SMOE_HOST_DEVICE bool operator()(index_t e) const { return ((kept >> (e / size)) & 1u) == 0; }
  };
  SMOE_HOST_DEVICE void operator()(index_t t) const {
    using Router = GroupTopKRouter<G>;
    const G* s = logits + t * E;
    G* qt = q + t * E;
    for (index_t e = 0; e < E; ++e) qt[e] = Router::sigmoid(s[e]) + bias[e];
    std::int32_t* id = ids + t * K;
    const index_t size = E / groups;
    std::uint64_t kept = ~std::uint64_t{0};
    if (keep < groups) {
      G group_score[max_groups];
      for (index_t g = 0; g < groups; ++g) {
        const G* qg = qt + g * size;
        if (size == 1) {
          group_score[g] = qg[0];
        } else {
          std::int32_t two[2];
          topk_row(qg, size, 2, two, NotRemoved{});
          group_score[g] = qg[two[0]] + qg[two[1]];
        }
      }
      std::int32_t best[max_topk];
      topk_row(group_score, groups, keep, best, NotRemoved{});
      kept = 0;
      for (index_t j = 0; j < keep; ++j) kept |= std::uint64_t{1} << best[j];
    }
    topk_row(qt, E, K, id, NotKept{kept, size});
    Router::normalized_gates(s, id, K, gates + t * K, route_scale);
  }
};

template <class G>
struct GroupGateBackward {
  const G* logits;
  const std::int32_t* ids;
  const G* d_gates;
  index_t d_gates_stride;
  G* d_logits;
  index_t d_logits_stride, E, K;
  G route_scale;
  SMOE_HOST_DEVICE void operator()(index_t t) const {
    using Router = GroupTopKRouter<G>;
    const G* s = logits + t * E;
    const std::int32_t* id = ids + t * K;
    const G* dg = d_gates + t * d_gates_stride;
    G* dl = d_logits + t * d_logits_stride;
    G n[max_topk];
    Router::normalized_gates(s, id, K, n, G(1));
    G dot = 0;
    for (index_t j = 0; j < K; ++j)
      if (id[j] >= 0) dot += n[j] * route_scale * dg[j];
    for (index_t j = 0; j < K; ++j)
      if (id[j] >= 0) dl[id[j]] += n[j] * (route_scale * dg[j] - dot) * Router::sigmoid(-s[id[j]]);
  }
};

// load[e] = number of ids equal to e, then b_e += u·sign(Σ load − E·load_e).
struct ExpertLoad {
  const std::int32_t* ids;
  index_t n;
  std::int32_t* load;
  SMOE_HOST_DEVICE void operator()(index_t e) const {
    std::int32_t c = 0;
    for (index_t i = 0; i < n; ++i) c += ids[i] == e ? 1 : 0;
    load[e] = c;
  }
};
template <class G>
struct BiasUpdate {
  const std::int32_t* load;
  G* bias;
  index_t E;
  G u;
  SMOE_HOST_DEVICE void operator()(index_t e) const {
    index_t total = 0;
    for (index_t i = 0; i < E; ++i) total += load[i];
    const index_t diff = total - E * index_t(load[e]);
    if (diff > 0) bias[e] += u;
    if (diff < 0) bias[e] -= u;
  }
};

}  // namespace cuda_kernels

template <class T>
class GroupTopKRouter<T, cuda> {
 public:
  using scalar_type = T;
  using gate_type = acc_t<T>;
  using backend = cuda;
  using G = gate_type;
  static constexpr const char* name = "GroupTopKRouter<cuda>";

  explicit GroupTopKRouter(GroupTopKRouterConfig config, cuda_stream stream = {}) : config_((config.validate(name), config)) {
    if (config.k > cuda_kernels::max_topk || config.topk_groups > cuda_kernels::max_topk ||
        config.n_groups > cuda_kernels::max_groups)
      fail(name, ": the CUDA backend needs k <= ", cuda_kernels::max_topk, ", topk_groups <= ", cuda_kernels::max_topk,
           " and n_groups <= ", cuda_kernels::max_groups, "; got k = ", config.k, ", topk_groups = ", config.topk_groups,
           ", n_groups = ", config.n_groups);
    if (!config.normalize) fail(name, ": normalize = false (unnormalized gates) is CPU-only so far, got normalize = false");
    weight_ = Parameter<G, cuda>({config.experts, config.d_model});
    bias_ = Tensor<G, cuda>({config.experts});
    bias_.zero();
    set_stream(stream);
  }

  index_t experts() const { return config_.experts; }
  index_t k() const { return config_.k; }
  index_t d_model() const { return config_.d_model; }
  const GroupTopKRouterConfig& config() const { return config_; }
  Parameter<G, cuda>& weight() { return weight_; }
  Tensor<G, cuda>& bias() { return bias_; }
  // Selections per expert in the last forward [E] (device).
  const Tensor<std::int32_t, cuda>& load() const { return load_; }
  // b_e += u · sign(mean_load − load_e) from the last forward's load, on the device.
  void update_bias(double u) {
    if (!(u >= 0.0) || !std::isfinite(u)) fail(name, ": u (update speed) must be finite and >= 0, got ", u);
    if (load_.size() != experts()) fail(name, ": update_bias needs a forward first");
    cuda_kernels::for_each_index(stream_, experts(), cuda_kernels::BiasUpdate<G>{load_.data(), bias_.data(), experts(), G(u)});
  }
  cuda_stream stream() const { return stream_; }
  void set_stream(cuda_stream s) {
    stream_ = s;
    for (auto* t : {&weight_.value, &weight_.grad, &bias_, &q_}) t->set_stream(s);
    load_.set_stream(s);
  }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("weight"), weight_);
  }
  template <class F>
  void for_each_buffer(F&& f) {
    f(std::string_view("bias"), bias_);
  }

  void forward(ConstMatrixView<T, cuda> x, Routing<G, cuda>& out, Mode) {
    using namespace cuda_kernels;
    expect_shape(name, "x", x, x.rows, d_model());
    const index_t tokens = x.rows, E = experts(), K = k();
    prepare_routing(out, tokens, E, K, stream_);
    q_.resize({tokens, E});
    load_.resize({E});
    linear_scores_forward(stream_, x, weight_.value.data(), E, out.logits.data());
    for_each_index(stream_, tokens,
                   GroupSelect<G>{out.logits.data(), bias_.data(), q_.data(), out.experts.data(), out.gates.data(), E, K,
                                  config_.n_groups, config_.topk_groups, G(config_.route_scale)});
    for_each_index(stream_, E, ExpertLoad{out.experts.data(), tokens * K, load_.data()});
  }

  void backward(ConstMatrixView<T, cuda> x, const Routing<G, cuda>& r, ConstMatrixView<G, cuda> d_gates,
                MatrixView<G, cuda> d_logits, MatrixView<T, cuda> dx) {
    using namespace cuda_kernels;
    const index_t tokens = x.rows, E = experts(), K = k();
    expect_shape(name, "d_gates", d_gates, tokens, K);
    expect_shape(name, "d_logits", d_logits, tokens, E);
    expect_shape(name, "dx", dx, tokens, d_model());
    if (tokens == 0) return;
    for_each_index(stream_, tokens,
                   GroupGateBackward<G>{r.logits.data(), r.experts.data(), d_gates.data, d_gates.stride, d_logits.data,
                                        d_logits.stride, E, K, G(config_.route_scale)});
    linear_scores_backward(stream_, x, ConstMatrixView<G, cuda>(d_logits), weight_.value.data(), weight_.grad.data(), dx);
  }

 private:
  GroupTopKRouterConfig config_;
  cuda_stream stream_{};
  Parameter<G, cuda> weight_;
  Tensor<G, cuda> bias_, q_;
  Tensor<std::int32_t, cuda> load_;
};

}  // namespace smoe
