#pragma once
// GroupTopKRouter: DeepSeek-V3's group-limited sigmoid routing with an aux-loss-free selection
// bias (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", Sec. 2.1.2).
//   logits s = x Wᵀ (W: "weight" [E, d]),  σ = sigmoid(s),  selection score q = σ + b
//   (b: SelectionBias [E], zero unless the user updates it; not trained by gradient),
//   experts split into n_groups consecutive groups of E / n_groups,
//   group score = sum of the group's two largest q (a one-expert group: its single q),
//   keep the topk_groups best groups, ids = top-k of q among the kept groups' experts,
//   gate_j = route_scale · σ[e_j] / Σ_i σ[e_i]   (the bias never enters a gate),
//   or, with normalize = false (HF's norm_topk_prob = false), gate_j = route_scale · σ[e_j].
// Ties go to the smaller group index, then to the smaller expert id; NaN ranks below every number.
// Gradient: through the normalized sigmoid gates into W and x; selection is piecewise constant
// and the bias gets none. routing.logits = s. With n_groups = 1 (or topk_groups = n_groups) this
// is plain sigmoid top-k with gates normalized to sum route_scale.
// Gates are computed as route_scale · softmax over the K selected of log σ(s), the same value as
// σ / Σσ, but free of 0/0 when every selected σ underflows.
// HF transformers divides by (Σσ + 1e-20); the epsilon only matters when every selected σ
// underflows, where the softmax of log σ stays finite instead of 0/0 (difference below float
// resolution otherwise).
// DeepSeek-V3: E = 256, n_groups = 8, topk_groups = 4, k = 8, route_scale = 2.5. The released
// inference code scores a group by its max when the gate has no bias; here the top-2 sum is used
// always (as HF transformers' DeepseekV3, whose gate always has the bias). A one-expert group,
// which the reference's topk(2) rejects, scores by its single q.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

#include "smoe/core/parameter.hpp"
#include "smoe/cpu/parallel.hpp"
#include "smoe/routing/linear_scores.hpp"
#include "smoe/routing/routing.hpp"
#include "smoe/routing/selection_bias.hpp"
#include "smoe/routing/topk_select.hpp"

namespace smoe {

struct GroupTopKRouterConfig {
  index_t d_model = 0;
  index_t experts = 0;
  index_t k = 1;
  index_t n_groups = 1;     // experts % n_groups == 0
  index_t topk_groups = 1;  // groups kept per token, in [1, n_groups]
  double route_scale = 1.0;  // gates of a token sum to route_scale (when normalize)
  bool normalize = true;     // false: gate = route_scale · σ, unnormalized (HF norm_topk_prob = false)

  void validate(const char* context) const {
    if (d_model < 1) fail(context, ": d_model must be >= 1, got ", d_model);
    if (experts < 1) fail(context, ": experts must be >= 1, got ", experts);
    if (n_groups < 1 || n_groups > experts)
      fail(context, ": n_groups must be in [1, experts = ", experts, "], got ", n_groups);
    if (experts % n_groups != 0)
      fail(context, ": n_groups must divide experts = ", experts, " (equal groups), got ", n_groups);
    if (topk_groups < 1 || topk_groups > n_groups)
      fail(context, ": topk_groups must be in [1, n_groups = ", n_groups, "], got ", topk_groups);
    const index_t reachable = topk_groups * (experts / n_groups);
    if (k < 1 || k > reachable)
      fail(context, ": k must be in [1, topk_groups · experts / n_groups = ", reachable, "], got ", k);
    if (!(route_scale > 0.0) || !std::isfinite(route_scale))
      fail(context, ": route_scale must be finite and > 0, got ", route_scale);
  }
};

// GroupTopKRouter<T, cuda> is the CUDA backend's (smoe/cuda/group_topk_router.cuh).
template <class T, class Backend = cpu>
class GroupTopKRouter {
  static_assert(std::is_same_v<Backend, cpu>, "GroupTopKRouter<T, cuda> needs <smoe/cuda/group_topk_router.cuh>");

 public:
  using scalar_type = T;
  using backend = cpu;
  static constexpr const char* name = "GroupTopKRouter";

  explicit GroupTopKRouter(GroupTopKRouterConfig config)
      : config_((config.validate(name), config)),
        weight_({config.experts, config.d_model}),
        bias_(config.experts),
        load_(static_cast<std::size_t>(config.experts), 0) {}

  index_t experts() const { return config_.experts; }
  index_t k() const { return config_.k; }
  index_t d_model() const { return config_.d_model; }
  const GroupTopKRouterConfig& config() const { return config_; }
  Parameter<T>& weight() { return weight_; }
  // The selection bias: update it after a step with bias().update(load(), u).
  SelectionBias<T>& bias() { return bias_; }
  const SelectionBias<T>& bias() const { return bias_; }
  // Selections per expert in the last forward (before any capacity limit of the MoE layer).
  std::span<const index_t> load() const { return load_; }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("weight"), weight_);
  }
  // Non-trained state a checkpoint saves: f(name, Tensor<T>&). Optimizers never see it.
  template <class F>
  void for_each_buffer(F&& f) {
    f(std::string_view("bias"), bias_.values);
  }

  void forward(ConstMatrixView<T> x, Routing<T>& out, Mode) {
    using namespace cpu_kernels;
    expect_shape(name, "x", x, x.rows, d_model());
    const index_t tokens = x.rows, E = experts(), K = k();
    out.logits.resize({tokens, E});
    out.experts.resize({tokens, K});
    out.gates.resize({tokens, K});
    const index_t groups = config_.n_groups, keep = config_.topk_groups, size = E / groups;
    const bool limit_groups = keep < groups;  // all groups kept: the filter is a no-op
    const T* b = bias_.values.data();
    scores_.prepare(std::as_const(weight_.value).matrix());
    parallel_for_blocks(tokens, token_block, [&](index_t first, index_t last) {
      scores_.forward_block(x.rows_range(first, last), out.logits.matrix().rows_range(first, last));
      std::vector<T> q(static_cast<std::size_t>(E)), group_score(static_cast<std::size_t>(limit_groups ? groups : 0));
      std::vector<std::int32_t> kept(static_cast<std::size_t>(limit_groups ? keep : 0));
      std::vector<std::uint8_t> removed(static_cast<std::size_t>(limit_groups ? E : 0));
      for (index_t t = first; t < last; ++t) {
        const T* s = out.logits.data() + t * E;
        std::int32_t* ids = out.experts.data() + t * K;
        for (index_t e = 0; e < E; ++e) q[e] = sigmoid(s[e]) + b[e];
        if (limit_groups) {
          for (index_t g = 0; g < groups; ++g) {
            const T* qg = q.data() + g * size;
            if (size == 1) {
              group_score[g] = qg[0];
            } else {
              std::int32_t two[2];
              select_topk(qg, size, 2, two);
              group_score[g] = qg[two[0]] + qg[two[1]];
            }
          }
          select_topk(group_score.data(), groups, keep, kept.data());
          std::fill(removed.begin(), removed.end(), std::uint8_t(1));
          for (std::int32_t g : kept) std::fill_n(removed.begin() + g * size, size, std::uint8_t(0));
        }
        // k <= keep · size alive candidates, so every selected expert is in a kept group.
        select_topk(q.data(), E, K, ids, limit_groups ? removed.data() : nullptr);
        if (config_.normalize)
          normalized_gates(s, ids, K, out.gates.data() + t * K);
        else
          for (index_t j = 0; j < K; ++j) out.gates[t * K + j] = T(config_.route_scale) * sigmoid(s[ids[j]]);
      }
    });
    std::fill(load_.begin(), load_.end(), index_t(0));
    for (index_t i = 0; i < tokens * K; ++i) ++load_[out.experts[i]];
  }

  void backward(ConstMatrixView<T> x, const Routing<T>& r, ConstMatrixView<T> d_gates, MatrixView<T> d_logits,
                MatrixView<T> dx) {
    using namespace cpu_kernels;
    const index_t tokens = x.rows, E = experts(), K = k();
    expect_shape(name, "d_gates", d_gates, tokens, K);
    expect_shape(name, "d_logits", d_logits, tokens, E);
    expect_shape(name, "dx", dx, tokens, d_model());
    if (tokens == 0) return;
    // gate_j = c · n_j, n = softmax_j(log σ(s_{e_j})):
    //   ∂/∂s_{e_j} = n_j · (c·dg_j − Σ_i n_i c·dg_i) · (1 − σ(s_{e_j})),  1 − σ(s) = σ(−s).
    const T c = T(config_.route_scale);
    parallel_for_blocks(tokens, token_block, [&](index_t first, index_t last) {
      std::vector<T> n(static_cast<std::size_t>(K));
      for (index_t t = first; t < last; ++t) {
        const T* s = r.logits.data() + t * E;
        const std::int32_t* ids = r.experts.data() + t * K;
        const T* dg = d_gates.row(t);
        T* dl = d_logits.row(t);
        if (!config_.normalize) {  // gate_j = c·σ(s_{e_j}): ∂/∂s = c·σ(s)·σ(−s)
          for (index_t j = 0; j < K; ++j)
            if (ids[j] >= 0) dl[ids[j]] += c * dg[j] * sigmoid(s[ids[j]]) * sigmoid(-s[ids[j]]);
          continue;
        }
        normalized_gates(s, ids, K, n.data(), T(1));
        T dot = 0;
        for (index_t j = 0; j < K; ++j)
          if (ids[j] >= 0) dot += n[j] * c * dg[j];
        for (index_t j = 0; j < K; ++j)
          if (ids[j] >= 0) dl[ids[j]] += n[j] * (c * dg[j] - dot) * sigmoid(-s[ids[j]]);
      }
    });
    LinearScores<T>::backward(x, ConstMatrixView<T>(d_logits), std::as_const(weight_.value).matrix(),
                              weight_.grad.matrix(), dx);
  }

  // The gate math, shared with the CUDA backend (host and device).
  SMOE_HOST_DEVICE static T sigmoid(T v) {
    using std::exp;
    return T(1) / (T(1) + exp(-v));
  }
  // log σ(v) = −softplus(−v), without overflow for large |v|.
  SMOE_HOST_DEVICE static T log_sigmoid(T v) {
    using std::exp, std::log1p, std::abs;
    return -((-v > T(0) ? -v : T(0)) + log1p(exp(-abs(v))));
  }
  // gates[j] = scale · σ(s[ids_j]) / Σ_i σ(s[ids_i]), as a softmax of log σ. Ids −1 (never
  // produced here) get gate 0.
  SMOE_HOST_DEVICE static void normalized_gates(const T* s, const std::int32_t* ids, index_t K, T* gates, T scale) {
    using std::exp;
    T m = -std::numeric_limits<T>::infinity();
    for (index_t j = 0; j < K; ++j)
      if (ids[j] >= 0) m = m < log_sigmoid(s[ids[j]]) ? log_sigmoid(s[ids[j]]) : m;
    T z = 0;
    for (index_t j = 0; j < K; ++j) z += (gates[j] = ids[j] >= 0 ? exp(log_sigmoid(s[ids[j]]) - m) : T(0));
    for (index_t j = 0; j < K; ++j) gates[j] = gates[j] / z * scale;
  }

 private:
  static constexpr index_t token_block = 128;

  void normalized_gates(const T* s, const std::int32_t* ids, index_t K, T* gates) const {
    normalized_gates(s, ids, K, gates, T(config_.route_scale));
  }

  GroupTopKRouterConfig config_;
  Parameter<T> weight_;
  LinearScores<T> scores_;
  SelectionBias<T> bias_;
  std::vector<index_t> load_;
};

}  // namespace smoe
