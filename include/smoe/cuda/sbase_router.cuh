#pragma once
// SBaseRouter<T, cuda>: S-BASE routing (routing/sbase_router.hpp) on the device; the weight
// "weight" [E, d], logits, balanced scores and gates are fp32 (fp64 for T = double).
//   forward:  SigmoidTopK<T, cuda> in eval (logits, top-k of the logits, sigmoid gates); in
//             training with sinkhorn_iters > 0: log P = Sinkhorn-balanced logits (cuda/sinkhorn.cuh,
//             the CPU's fixed iteration count and block order), then per token the top-k under the
//             CPU's order (SBaseRouter<G>::ranks_before: balanced score, raw logit, index) and the
//             sigmoid gates of the raw logits.
//   backward: SigmoidTopK's: no gradient through the balancing.
// No host synchronisation: the iteration count is fixed (the CPU has no tolerance to test).
#include <cstdint>
#include <string_view>

#include "smoe/cuda/sinkhorn.cuh"
#include "smoe/cuda/topk.cuh"
#include "smoe/cuda/topk_router.cuh"
#include "smoe/routing/sbase_router.hpp"
#include "smoe/routing/sigmoid_topk.hpp"

namespace smoe {

namespace cuda_kernels {

// Top-k of one token under SBaseRouter's training order, by insertion into a kept list (k <= max_topk).
template <class G>
struct SBaseSelect {
  const G *balanced, *logits;
  std::int32_t* ids;
  G* gates;
  index_t E, K;
  SMOE_HOST_DEVICE void operator()(index_t t) const {
    const G *p = balanced + t * E, *s = logits + t * E;
    std::int32_t kept[max_topk] = {};
    index_t filled = 0;
    for (index_t i = 0; i < E; ++i) {
      const auto c = static_cast<std::int32_t>(i);
      if (filled == K && !SBaseRouter<G>::ranks_before(p, s, c, kept[K - 1])) continue;
      index_t pos = filled < K ? filled++ : K - 1;
      while (pos > 0 && SBaseRouter<G>::ranks_before(p, s, c, kept[pos - 1])) {
        kept[pos] = kept[pos - 1];
        --pos;
      }
      kept[pos] = c;
    }
    std::int32_t* id = ids + t * K;
    for (index_t j = 0; j < K; ++j) id[j] = kept[j];
    SigmoidGate{}.forward(s, E, id, K, gates + t * K);
  }
};

}  // namespace cuda_kernels

template <class T>
class SBaseRouter<T, cuda> {
 public:
  using scalar_type = T;
  using gate_type = acc_t<T>;
  using backend = cuda;
  using G = gate_type;
  static constexpr const char* name = "SBaseRouter<cuda>";
  static constexpr bool token_choice = true;  // each token picks its K experts; capacity may apply

  explicit SBaseRouter(SBaseRouterConfig config, cuda_stream stream = {})
      : config_((config.validate(name), config)),
        linear_({.d_model = config.d_model, .experts = config.experts, .k = config.k}, {}, stream) {
    set_stream(stream);
  }

  index_t experts() const { return config_.experts; }
  index_t k() const { return config_.k; }
  index_t d_model() const { return config_.d_model; }
  const SBaseRouterConfig& config() const { return config_; }
  Parameter<G, cuda>& weight() { return linear_.weight(); }
  // log P of the last Mode::train forward ([T, E]; empty before one).
  const Tensor<G, cuda>& balanced_scores() const { return balanced_; }
  cuda_stream stream() const { return stream_; }
  void set_stream(cuda_stream s) {
    stream_ = s;
    linear_.set_stream(s);
    balanced_.set_stream(s);
    work_.set_stream(s);
  }

  template <class F>
  void for_each_parameter(F&& f) {
    linear_.for_each_parameter(f);
  }

  void forward(ConstMatrixView<T, cuda> x, Routing<G, cuda>& out, Mode mode) {
    expect_shape(name, "x", x, x.rows, d_model());
    linear_.forward(x, out, Mode::eval);
    if (mode != Mode::train || config_.sinkhorn_iters == 0) return;
    const index_t tokens = x.rows, E = experts(), K = k();
    balanced_.resize({tokens, E});
    sinkhorn_balance(stream_, std::as_const(out.logits).matrix(), config_.sinkhorn_iters, balanced_.matrix(), work_);
    cuda_kernels::for_each_index(stream_, tokens,
                                 cuda_kernels::SBaseSelect<G>{balanced_.data(), out.logits.data(), out.experts.data(),
                                                              out.gates.data(), E, K});
  }

  void backward(ConstMatrixView<T, cuda> x, const Routing<G, cuda>& r, ConstMatrixView<G, cuda> d_gates,
                MatrixView<G, cuda> d_logits, MatrixView<T, cuda> dx) {
    expect_shape(name, "x", x, x.rows, d_model());
    linear_.backward(x, r, d_gates, d_logits, dx);
  }

 private:
  SBaseRouterConfig config_;
  cuda_stream stream_{};
  SigmoidTopK<T, cuda> linear_;
  Tensor<G, cuda> balanced_;
  SinkhornWorkspace<G> work_;
};

}  // namespace smoe
