#pragma once
// S-BASE router (Clark et al. 2022, "Unified Scaling Laws for Routed Language Models"; the
// "sinkmoid" selection of the sigma-MoE reference code, Csordás et al. 2023):
//   logits s = x Wᵀ (W: "weight" [E, d])
//   Mode::train: ids = top-k of log P, P = Sinkhorn-balanced s (`sinkhorn_iters` iterations,
//                rows sum to 1, columns to T/E over the T tokens of one forward; see sinkhorn.hpp)
//   Mode::eval:  ids = top-k of s
//   gates = sigmoid(s[e]) of the RAW logit of each selected expert, in both modes.
// The balancing only chooses experts: no gradient flows through it, only through the gates'
// sigmoid (and the balance losses, which read the raw logits).
// Tie rule in training: larger balanced score, then larger raw logit, then the smaller expert id
// (NaN ranks lowest in both scores). With T = 1 every balanced score equals log(1/E) exactly, so a
// single token is routed by its raw logits.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "smoe/core/parameter.hpp"
#include "smoe/cpu/parallel.hpp"
#include "smoe/routing/routing.hpp"
#include "smoe/routing/sigmoid_topk.hpp"
#include "smoe/routing/sinkhorn.hpp"

namespace smoe {

struct SBaseRouterConfig {
  index_t d_model = 0;
  index_t experts = 0;
  index_t k = 1;
  int sinkhorn_iters = 3;  // the sigma-MoE reference code's default

  void validate(const char* context) const {
    if (d_model < 1) fail(context, ": d_model must be >= 1, got ", d_model);
    if (experts < 1) fail(context, ": experts must be >= 1, got ", experts);
    if (k < 1 || k > experts) fail(context, ": k must be in [1, experts = ", experts, "], got ", k);
    if (sinkhorn_iters < 0) fail(context, ": sinkhorn_iters must be >= 0, got ", sinkhorn_iters);
  }
};

// SBaseRouter<T, cuda> is the CUDA backend's (smoe/cuda/sbase_router.cuh).
template <class T, class Backend = cpu>
class SBaseRouter {
  static_assert(std::is_same_v<Backend, cpu>, "SBaseRouter<T, cuda> needs <smoe/cuda/sbase_router.cuh>");

 public:
  using scalar_type = T;
  using backend = cpu;
  static constexpr const char* name = "SBaseRouter";
  static constexpr bool token_choice = true;  // each token picks its K experts; capacity may apply

  explicit SBaseRouter(SBaseRouterConfig config)
      : config_((config.validate(name), config)),
        linear_({.d_model = config.d_model, .experts = config.experts, .k = config.k}) {}

  index_t experts() const { return config_.experts; }
  index_t k() const { return config_.k; }
  index_t d_model() const { return config_.d_model; }
  const SBaseRouterConfig& config() const { return config_; }
  Parameter<T>& weight() { return linear_.weight(); }
  // log P of the last Mode::train forward ([T, E]; empty before one).
  const Tensor<T>& balanced_scores() const { return balanced_; }

  template <class F>
  void for_each_parameter(F&& f) {
    linear_.for_each_parameter(f);
  }

  void forward(ConstMatrixView<T> x, Routing<T>& out, Mode mode) {
    expect_shape(name, "x", x, x.rows, d_model());
    // The projection, eval selection and sigmoid gates are exactly SigmoidTopK's.
    linear_.forward(x, out, Mode::eval);
    if (mode != Mode::train || config_.sinkhorn_iters == 0) return;
    const index_t tokens = x.rows, E = experts(), K = k();
    balanced_.resize({tokens, E});
    sinkhorn_balance(std::as_const(out.logits).matrix(), config_.sinkhorn_iters, balanced_.matrix());
    cpu_kernels::parallel_for_blocks(tokens, 256, [&](index_t first, index_t last) {
      std::vector<std::int32_t> order(static_cast<std::size_t>(E));
      for (index_t t = first; t < last; ++t) {
        const T* p = balanced_.data() + t * E;
        const T* s = out.logits.data() + t * E;
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + K, order.end(),
                          [&](std::int32_t i, std::int32_t j) { return ranks_before(p, s, i, j); });
        std::int32_t* ids = out.experts.data() + t * K;
        std::copy_n(order.begin(), K, ids);
        SigmoidGate{}.forward(s, E, ids, K, out.gates.data() + t * K);
      }
    });
  }

  void backward(ConstMatrixView<T> x, const Routing<T>& r, ConstMatrixView<T> d_gates, MatrixView<T> d_logits,
                MatrixView<T> dx) {
    const index_t tokens = x.rows;
    expect_shape(name, "x", x, tokens, d_model());
    expect_shape(name, "d_gates", d_gates, tokens, k());
    expect_shape(name, "d_logits", d_logits, tokens, experts());
    expect_shape(name, "dx", dx, tokens, d_model());
    linear_.backward(x, r, d_gates, d_logits, dx);
  }

  // The training order: balanced score, then raw logit, then index; NaN below every number.
  // Shared with the CUDA backend.
  SMOE_HOST_DEVICE static bool ranks_before(const T* p, const T* s, std::int32_t i, std::int32_t j) {
    if (const int c = compare(p[i], p[j]); c != 0) return c > 0;
    if (const int c = compare(s[i], s[j]); c != 0) return c > 0;
    return i < j;
  }

 private:
  SMOE_HOST_DEVICE static int compare(T a, T b) {
    const bool na = a != a, nb = b != b;  // NaN
    if (na || nb) return na == nb ? 0 : (na ? -1 : 1);
    return a > b ? 1 : (a < b ? -1 : 0);
  }

  SBaseRouterConfig config_;
  SigmoidTopK<T> linear_;
  Tensor<T> balanced_;
};

}  // namespace smoe
