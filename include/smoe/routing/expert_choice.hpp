#pragma once
// ExpertChoiceRouter (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing"): the
// experts choose their tokens instead of the tokens choosing experts.
//   logits s = x Wᵀ (W: "weight" [E, d]),  S = softmax(s) over the experts of each token,
//   expert e takes the C tokens with the largest S[:, e],  gate(t, e) = S[t, e],
//   C = min(T, max(1, floor(T · capacity_factor / E))),
// capacity_factor = the average number of experts per token (paper's c; default 2). Every expert
// processes exactly C tokens (perfect load balance, no aux loss needed); a token gets 0..E experts.
// Ties go to the smaller token index; NaN scores rank below every number.
//
// Routing layout (the Router contract is per token): k() = E; row t of ids lists the experts that
// picked token t in increasing expert id, padded with −1 (gate 0). routing.logits = s.
// Gradient: through gate = S[t, e], i.e. the softmax over all E experts, into W and x; the choice
// itself is piecewise constant.
//
// Not a token-choice router (token_choice = false): MoE<>'s CapacityPolicy must stay disabled,
// the capacity is this router's own. Selection is over the whole batch, so in a causal language
// model a token's routing depends on later tokens of the batch (future leakage); the paper's
// decoder experiments share that property. No selection bias: a per-expert constant added to
// S[:, e] does not change expert e's order of tokens. Deterministic; the mode is ignored.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <type_traits>
#include <vector>

#include "smoe/core/parameter.hpp"
#include "smoe/cpu/parallel.hpp"
#include "smoe/routing/linear_scores.hpp"
#include "smoe/routing/routing.hpp"
#include "smoe/routing/topk_select.hpp"

namespace smoe {

struct ExpertChoiceRouterConfig {
  index_t d_model = 0;
  index_t experts = 0;
  double capacity_factor = 2.0;  // average experts per token (paper's c)

  void validate(const char* context) const {
    if (d_model < 1) fail(context, ": d_model must be >= 1, got ", d_model);
    if (experts < 1) fail(context, ": experts must be >= 1, got ", experts);
    if (!(capacity_factor > 0.0) || !std::isfinite(capacity_factor))
      fail(context, ": capacity_factor must be finite and > 0 (average experts per token), got ", capacity_factor);
  }
  // Tokens each expert takes from a batch of `tokens`: min(T, max(1, floor(T · c / E))); 0 when T = 0.
  index_t capacity(index_t tokens) const {
    if (tokens == 0) return 0;
    const double c = std::floor(double(tokens) * capacity_factor / double(experts));
    if (c >= double(tokens)) return tokens;  // also keeps a huge factor from overflowing the cast
    return std::max<index_t>(1, static_cast<index_t>(c));
  }
};

// ExpertChoiceRouter<T, cuda> is the CUDA backend's (smoe/cuda/expert_choice_router.cuh).
template <class T, class Backend = cpu>
class ExpertChoiceRouter {
  static_assert(std::is_same_v<Backend, cpu>, "ExpertChoiceRouter<T, cuda> needs <smoe/cuda/expert_choice_router.cuh>");

 public:
  using scalar_type = T;
  using backend = cpu;
  static constexpr const char* name = "ExpertChoiceRouter";
  // The experts choose the tokens: MoE<> refuses a CapacityPolicy with this router.
  static constexpr bool token_choice = false;

  explicit ExpertChoiceRouter(ExpertChoiceRouterConfig config)
      : config_((config.validate(name), config)), weight_({config.experts, config.d_model}) {}

  index_t experts() const { return config_.experts; }
  index_t k() const { return config_.experts; }  // row width of the routing: at most E experts per token
  index_t d_model() const { return config_.d_model; }
  index_t capacity(index_t tokens) const { return config_.capacity(tokens); }
  const ExpertChoiceRouterConfig& config() const { return config_; }
  Parameter<T>& weight() { return weight_; }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("weight"), weight_);
  }

  // p = softmax(s[0..n)), max-shifted; a NaN anywhere makes the row NaN (ranked lowest). Shared
  // with the CUDA backend.
  SMOE_HOST_DEVICE static void softmax(const T* s, index_t n, T* p) {
    using std::exp;
    T m = s[0];
    for (index_t e = 1; e < n; ++e) m = s[e] > m ? s[e] : m;
    T z = 0;
    for (index_t e = 0; e < n; ++e) z += (p[e] = exp(s[e] - m));
    for (index_t e = 0; e < n; ++e) p[e] /= z;
  }

  void forward(ConstMatrixView<T> x, Routing<T>& out, Mode) {
    using namespace cpu_kernels;
    expect_shape(name, "x", x, x.rows, d_model());
    const index_t tokens = x.rows, E = experts();
    out.logits.resize({tokens, E});
    out.experts.resize({tokens, E});
    out.gates.resize({tokens, E});
    probs_.resize({tokens, E});
    // Logits GEMM per token block (single-threaded each: rounding independent of the thread
    // count), then the per-token softmax while the block is in cache.
    scores_.prepare(std::as_const(weight_.value).matrix());
    parallel_for_blocks(tokens, token_block, [&](index_t first, index_t last) {
      scores_.forward_block(x.rows_range(first, last), out.logits.matrix().rows_range(first, last));
      for (index_t t = first; t < last; ++t) softmax(out.logits.data() + t * E, E, probs_.data() + t * E);
    });

    // Each expert's top-C column of S.
    const index_t C = capacity(tokens);
    picks_.resize({E, C});
    if (C > 0) {
      auto choose = [&](index_t e) {
        std::vector<T> column(static_cast<std::size_t>(tokens));
        for (index_t t = 0; t < tokens; ++t) column[t] = probs_[t * E + e];
        select_topk(column.data(), tokens, C, picks_.data() + e * C);
      };
      if (tokens * E >= parallel_threshold)
        parallel_for(E, choose);
      else
        for (index_t e = 0; e < E; ++e) choose(e);
    }

    // Per-token rows in increasing expert id: experts are visited in order.
    out.experts.fill(-1);
    out.gates.zero();
    filled_.assign(static_cast<std::size_t>(tokens), 0);
    for (index_t e = 0; e < E; ++e)
      for (index_t j = 0; j < C; ++j) {
        const index_t t = picks_[e * C + j];
        const index_t slot = t * E + filled_[t]++;
        out.experts[slot] = static_cast<std::int32_t>(e);
        out.gates[slot] = probs_[t * E + e];
      }
  }

  void backward(ConstMatrixView<T> x, const Routing<T>& r, ConstMatrixView<T> d_gates, MatrixView<T> d_logits,
                MatrixView<T> dx) {
    using namespace cpu_kernels;
    const index_t tokens = x.rows, E = experts();
    expect_shape(name, "d_gates", d_gates, tokens, E);
    expect_shape(name, "d_logits", d_logits, tokens, E);
    expect_shape(name, "dx", dx, tokens, d_model());
    if (tokens == 0) return;
    // gate_j = S_{e_j}:  ∂/∂s_e = S_e · (dg(e) − Σ_j S_{e_j} dg_j),  dg(e) = d_gate of e's slot or 0.
    parallel_for_blocks(tokens, token_block, [&](index_t first, index_t last) {
      std::vector<T> S(static_cast<std::size_t>(E));
      for (index_t t = first; t < last; ++t) {
        softmax(r.logits.data() + t * E, E, S.data());
        const std::int32_t* ids = r.experts.data() + t * E;
        const T* dg = d_gates.row(t);
        T* dl = d_logits.row(t);
        T dot = 0;
        for (index_t j = 0; j < E; ++j)
          if (ids[j] >= 0) dot += S[ids[j]] * dg[j];
        for (index_t e = 0; e < E; ++e) dl[e] -= S[e] * dot;
        for (index_t j = 0; j < E; ++j)
          if (ids[j] >= 0) dl[ids[j]] += S[ids[j]] * dg[j];
      }
    });
    LinearScores<T>::backward(x, ConstMatrixView<T>(d_logits), std::as_const(weight_.value).matrix(),
                              weight_.grad.matrix(), dx);
  }

 private:
  static constexpr index_t token_block = 128, parallel_threshold = index_t(1) << 15;

  ExpertChoiceRouterConfig config_;
  Parameter<T> weight_;
  LinearScores<T> scores_;
  Tensor<T> probs_;                    // S [T, E] of the last forward
  Tensor<std::int32_t> picks_;         // [E, C] tokens chosen by each expert, best first
  std::vector<index_t> filled_;        // experts written so far per token
};

}  // namespace smoe
