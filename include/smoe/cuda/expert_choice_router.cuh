#pragma once
// ExpertChoiceRouter<T, cuda>: expert-choice routing (routing/expert_choice.hpp) on the device; the
// weight "weight" [E, d], logits and gates are fp32 (fp64 for T = double).
//   forward:  s = x·Wᵀ (cuda/linear_scores.cuh); S = softmax(s) per token (the CPU class's own
//             __host__ __device__ softmax); every expert's top-C tokens by one sort of the E·T
//             (expert, token) pairs under a total order: expert, then the CPU's top-k order (numbers
//             before NaN, larger S first, then the smaller token): the same picks and ties as the
//             CPU, a unique result whatever the sort algorithm; rank[e, t] < C marks a pick.
//             Then per token: the experts that picked it in increasing id, padded with −1 (gate 0),
//             the CPU's Routing layout (k() = E).
//   backward: the CPU's per-token softmax gradient (S recomputed from the logits), then
//             W.grad += d_logitsᵀ·x and dx += d_logits·W.
// No host synchronisation: C depends on the token count only.
#include <cstdint>
#include <string_view>

#include <thrust/sort.h>

#include "smoe/core/parameter.hpp"
#include "smoe/cuda/device_tensor.cuh"
#include "smoe/cuda/linear_scores.cuh"
#include "smoe/cuda/routing.cuh"
#include "smoe/routing/expert_choice.hpp"
#include "smoe/routing/routing.hpp"

namespace smoe {

namespace cuda_kernels {

template <class G>
struct RowSoftmax {
  const G* logits;
  G* probs;
  index_t E;
  SMOE_HOST_DEVICE void operator()(index_t t) const { ExpertChoiceRouter<G>::softmax(logits + t * E, E, probs + t * E); }
};

// Pair i = e·T + t (expert-major) before pair j: smaller expert, then expert e's top-k order of
// S[:, e] (routing/topk_select.hpp): numbers before NaN, larger first, then the smaller token.
template <class G>
struct ExpertChoiceOrder {
  const G* probs;
  index_t tokens, E;
  SMOE_HOST_DEVICE bool operator()(std::int32_t i, std::int32_t j) const {
    const index_t ei = i / tokens, ej = j / tokens;
    if (ei != ej) return ei < ej;
    const index_t ti = i % tokens, tj = j % tokens;
    const G a = probs[ti * E + ei], b = probs[tj * E + ej];
    const bool na = a == a, nb = b == b;
    if (na != nb) return na;
    if (na && a != b) return a > b;
    return ti < tj;
  }
};

// rank[pair] = its position within its expert's segment of the sorted pairs.
struct PairRank {
  const std::int32_t* sorted;
  std::int32_t* rank;
  index_t tokens;
  SMOE_HOST_DEVICE void operator()(index_t p) const { rank[sorted[p]] = static_cast<std::int32_t>(p % tokens); }
};

template <class G>
struct ExpertChoiceRows {
  const std::int32_t* rank;
  const G* probs;
  std::int32_t* ids;
  G* gates;
  index_t tokens, E, C;
  SMOE_HOST_DEVICE void operator()(index_t t) const {
    index_t filled = 0;
    for (index_t e = 0; e < E; ++e)
      if (rank[e * tokens + t] < C) {
        ids[t * E + filled] = static_cast<std::int32_t>(e);
        gates[t * E + filled] = probs[t * E + e];
        ++filled;
      }
    for (; filled < E; ++filled) {
      ids[t * E + filled] = -1;
      gates[t * E + filled] = G(0);
    }
  }
};

// gate_j = S_{e_j}:  ∂/∂s_e = S_e · (dg(e) − Σ_j S_{e_j} dg_j), in the CPU's order; S is scratch [T, E].
template <class G>
struct ExpertChoiceBackward {
  const G* logits;
  const std::int32_t* ids;
  const G* d_gates;
  index_t d_gates_stride;
  G* d_logits;
  index_t d_logits_stride;
  G* probs;
  index_t E;
  SMOE_HOST_DEVICE void operator()(index_t t) const {
    G* S = probs + t * E;
    ExpertChoiceRouter<G>::softmax(logits + t * E, E, S);
    const std::int32_t* id = ids + t * E;
    const G* dg = d_gates + t * d_gates_stride;
    G* dl = d_logits + t * d_logits_stride;
    G dot = 0;
    for (index_t j = 0; j < E; ++j)
      if (id[j] >= 0) dot += S[id[j]] * dg[j];
    for (index_t e = 0; e < E; ++e) dl[e] -= S[e] * dot;
    for (index_t j = 0; j < E; ++j)
      if (id[j] >= 0) dl[id[j]] += S[id[j]] * dg[j];
  }
};

}  // namespace cuda_kernels

template <class T>
class ExpertChoiceRouter<T, cuda> {
 public:
  using scalar_type = T;
  using gate_type = acc_t<T>;
  using backend = cuda;
  using G = gate_type;
  static constexpr const char* name = "ExpertChoiceRouter<cuda>";
  // The experts choose the tokens: MoE<> refuses a CapacityPolicy with this router.
  static constexpr bool token_choice = false;

  explicit ExpertChoiceRouter(ExpertChoiceRouterConfig config, cuda_stream stream = {})
      : config_((config.validate(name), config)) {
    weight_ = Parameter<G, cuda>({config.experts, config.d_model});
    set_stream(stream);
  }

  index_t experts() const { return config_.experts; }
  index_t k() const { return config_.experts; }  // row width of the routing: at most E experts per token
  index_t d_model() const { return config_.d_model; }
  index_t capacity(index_t tokens) const { return config_.capacity(tokens); }
  const ExpertChoiceRouterConfig& config() const { return config_; }
  Parameter<G, cuda>& weight() { return weight_; }
  cuda_stream stream() const { return stream_; }
  void set_stream(cuda_stream s) {
    stream_ = s;
    weight_.value.set_stream(s);
    weight_.grad.set_stream(s);
    probs_.set_stream(s);
    pairs_.set_stream(s);
    rank_.set_stream(s);
  }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("weight"), weight_);
  }

  void forward(ConstMatrixView<T, cuda> x, Routing<G, cuda>& out, Mode) {
    using namespace cuda_kernels;
    expect_shape(name, "x", x, x.rows, d_model());
    const index_t tokens = x.rows, E = experts(), C = capacity(tokens);
    if (tokens * E > index_t(INT32_MAX))
      fail(name, ": tokens · experts must be <= ", INT32_MAX, " on the CUDA backend, got ", tokens * E);
    prepare_routing(out, tokens, E, E, stream_);
    probs_.resize({tokens, E});
    pairs_.resize({E * tokens});
    rank_.resize({E * tokens});
    linear_scores_forward(stream_, x, weight_.value.data(), E, out.logits.data());
    for_each_index(stream_, tokens, RowSoftmax<G>{out.logits.data(), probs_.data(), E});
    if (tokens > 0) {
      for_each_index(stream_, E * tokens, Iota{pairs_.data()});
      thrust::sort(policy(stream_), pairs_.data(), pairs_.data() + E * tokens,
                   ExpertChoiceOrder<G>{probs_.data(), tokens, E});
      for_each_index(stream_, E * tokens, PairRank{pairs_.data(), rank_.data(), tokens});
    }
    for_each_index(stream_, tokens,
                   ExpertChoiceRows<G>{rank_.data(), probs_.data(), out.experts.data(), out.gates.data(), tokens, E, C});
  }

  void backward(ConstMatrixView<T, cuda> x, const Routing<G, cuda>& r, ConstMatrixView<G, cuda> d_gates,
                MatrixView<G, cuda> d_logits, MatrixView<T, cuda> dx) {
    using namespace cuda_kernels;
    const index_t tokens = x.rows, E = experts();
    expect_shape(name, "d_gates", d_gates, tokens, E);
    expect_shape(name, "d_logits", d_logits, tokens, E);
    expect_shape(name, "dx", dx, tokens, d_model());
    if (tokens == 0) return;
    probs_.resize({tokens, E});
    for_each_index(stream_, tokens,
                   ExpertChoiceBackward<G>{r.logits.data(), r.experts.data(), d_gates.data, d_gates.stride, d_logits.data,
                                           d_logits.stride, probs_.data(), E});
    linear_scores_backward(stream_, x, ConstMatrixView<G, cuda>(d_logits), weight_.value.data(), weight_.grad.data(), dx);
  }

 private:
  ExpertChoiceRouterConfig config_;
  cuda_stream stream_{};
  Parameter<G, cuda> weight_;
  Tensor<G, cuda> probs_;                // S [T, E]
  Tensor<std::int32_t, cuda> pairs_;     // the E·T (expert, token) pairs, sorted
  Tensor<std::int32_t, cuda> rank_;      // each pair's position within its expert's order
};

}  // namespace smoe
