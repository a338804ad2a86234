#pragma once
// FeedForwardExperts: E two-layer experts of hidden size G,
//   y = act(x·W1[e] + b1[e])·W2[e] + b2[e],   W1 "w1" [E, d, fan·G], W2 "w2" [E, G, d],
//   optional biases "b1" [E, fan·G] and "b2" [E, d].
// CPU computation is the grouped GEMM of cpu/grouped_ffn.hpp: each expert gathers its tokens into
// a per-thread block that stays in L2, runs two GEMMs, and the combiner sums the per-slot outputs.
// Backward gathers the block again from x, so it must get the x of the forward, unchanged. For
// ReLU the forward keeps only h (h > 0 exactly where pre > 0); other activations also keep pre.
#include <string_view>
#include <type_traits>
#include <vector>

#include "smoe/combine/weighted_sum.hpp"
#include "smoe/core/parameter.hpp"
#include "smoe/cpu/grouped_ffn.hpp"
#include "smoe/experts/activation.hpp"
#include "smoe/experts/experts.hpp"

namespace smoe {

struct FeedForwardConfig {
  index_t d_model = 0;
  index_t experts = 1;
  index_t hidden = 0;  // G, the hidden units of one expert
  bool bias = false;

  void validate(const char* context) const {
    if (d_model < 1) fail(context, ": d_model must be >= 1, got ", d_model);
    if (experts < 1) fail(context, ": experts must be >= 1, got ", experts);
    if (hidden < 1) fail(context, ": hidden (expert size G) must be >= 1, got ", hidden);
  }
};

// FeedForwardExperts<T, Act, cuda> is the CUDA backend's (smoe/cuda/feed_forward_experts.cuh).
template <class T, Activation Act, class Backend = cpu>
class FeedForwardExperts {
  static_assert(std::is_same_v<Backend, cpu>, "FeedForwardExperts<T, Act, cuda> needs <smoe/cuda/feed_forward_experts.cuh>");

 public:
  using scalar_type = T;
  using backend = cpu;
  using activation = Act;
  static constexpr const char* name = "FeedForwardExperts";

  explicit FeedForwardExperts(FeedForwardConfig c)
      : config_((c.validate(name), c)),
        w1_({c.experts, c.d_model, Act::fan * c.hidden}),
        w2_({c.experts, c.hidden, c.d_model}) {
    if (c.bias) {
      b1_ = Parameter<T>({c.experts, Act::fan * c.hidden});
      b2_ = Parameter<T>({c.experts, c.d_model});
    }
  }

  index_t experts() const { return config_.experts; }
  index_t d_model() const { return config_.d_model; }
  index_t hidden() const { return config_.hidden; }
  bool has_bias() const { return config_.bias; }
  const FeedForwardConfig& config() const { return config_; }
  Parameter<T>& w1() { return w1_; }
  Parameter<T>& w2() { return w2_; }
  Parameter<T>& b1() { return b1_; }
  Parameter<T>& b2() { return b2_; }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("w1"), w1_);
    f(std::string_view("w2"), w2_);
    if (config_.bias) {
      f(std::string_view("b1"), b1_);
      f(std::string_view("b2"), b2_);
    }
  }

  void forward(ConstMatrixView<T> x, const Dispatch<T>& dispatch, MatrixView<T> ys) {
    check(x, dispatch);
    expect_shape(name, "ys", ys, dispatch.assignments(), d_model());
    cpu_kernels::grouped_ffn_forward<T, Act>(x, dispatch, weights(), shape(), ys, cache_);
  }

  void backward(ConstMatrixView<T> x, const Dispatch<T>& dispatch, ConstMatrixView<T> dys, MatrixView<T> dx) {
    check(x, dispatch);
    expect_shape(name, "dys", dys, dispatch.assignments(), d_model());
    expect_shape(name, "dx", dx, x.rows, d_model());
    if (cache_.assignments != dispatch.assignments()) fail(name, ": backward needs the forward of the same dispatch first");
    cpu_kernels::grouped_ffn_backward<T, Act>(x, dispatch, weights(), gradients(), shape(), dys, dx, cache_);
  }

  // The WeightedExperts pair (experts/experts.hpp): with the WeightedSum combiner, MoE<> calls
  // these. Forward is forward() plus the weighted sum; backward takes dy and computes the gate
  // gradients inside each expert's pass, so the per-slot output gradients [A, d] and the
  // combiner's pass over the per-slot outputs are never needed.
  void forward_weighted(ConstMatrixView<T> x, const Dispatch<T>& dispatch, MatrixView<T> y) {
    ys_.resize({dispatch.assignments(), d_model()});
    forward(x, dispatch, ys_.matrix());
    WeightedSum<T>{}.forward(dispatch, std::as_const(ys_).matrix(), y);
  }
  void backward_weighted(ConstMatrixView<T> x, const Dispatch<T>& dispatch, ConstMatrixView<T> dy,
                         MatrixView<T> d_gates, MatrixView<T> dx) {
    check(x, dispatch);
    expect_shape(name, "dy", dy, dispatch.tokens, d_model());
    expect_shape(name, "d_gates", d_gates, dispatch.tokens, dispatch.k);
    expect_shape(name, "dx", dx, x.rows, d_model());
    if (cache_.assignments != dispatch.assignments()) fail(name, ": backward needs the forward of the same dispatch first");
    cpu_kernels::grouped_ffn_backward_weighted<T, Act>(x, dispatch, weights(), gradients(), shape(), dy, d_gates, dx,
                                                       cache_);
  }

 private:
  void check(ConstMatrixView<T> x, const Dispatch<T>& dispatch) const {
    expect_shape(name, "x", x, dispatch.tokens, d_model());
    expect_equal(name, "dispatch.experts", experts(), dispatch.experts);
  }
  cpu_kernels::ExpertWeights<T> weights() const {
    return {w1_.value.data(), w2_.value.data(), config_.bias ? b1_.value.data() : nullptr,
            config_.bias ? b2_.value.data() : nullptr};
  }
  cpu_kernels::ExpertGradients<T> gradients() {
    return {w1_.grad.data(), w2_.grad.data(), config_.bias ? b1_.grad.data() : nullptr,
            config_.bias ? b2_.grad.data() : nullptr};
  }
  cpu_kernels::GroupedFFNShape shape() const { return {config_.d_model, config_.hidden}; }

  FeedForwardConfig config_;
  Parameter<T> w1_, w2_, b1_, b2_;
  cpu_kernels::GroupedFFNCache<T> cache_;  // forward cache and per-thread scratch
  Tensor<T> ys_;                           // forward_weighted: the per-slot outputs [A, d]
};

template <class T, class Backend = cpu>
using ReluExperts = FeedForwardExperts<T, Relu, Backend>;
template <class T, class Backend = cpu>
using GeluExperts = FeedForwardExperts<T, Gelu, Backend>;
template <class T, class Backend = cpu>
using SwiGluExperts = FeedForwardExperts<T, SwiGlu, Backend>;

}  // namespace smoe
