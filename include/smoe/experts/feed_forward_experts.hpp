#pragma once
// FeedForwardExperts: E two-layer experts of hidden size G,
//   y = act(x·W1[e] + b1[e])·W2[e] + b2[e],   W1 "w1" [E, d, fan·G], W2 "w2" [E, G, d],
//   optional biases "b1" [E, fan·G] and "b2" [E, d].
// CPU computation is a grouped GEMM over the dispatch: each expert gathers its tokens into a
// contiguous block, runs two Eigen GEMMs, and the combiner scatters the results. Experts run in
// parallel; the token-side reductions run per token, so results do not depend on thread count.
//
// Memory: the gathered block lives in a per-thread scratch buffer that stays in L2 (n_e·d
// values), not in an [A, d] cache; backward gathers it again from x, so backward must get the x
// of the forward (the MoE layer passes its own copy). For ReLU the forward keeps only h
// (h > 0 exactly where pre > 0), computed in place; other activations also keep pre.
#include <string_view>
#include <type_traits>
#include <vector>

#include "smoe/core/parameter.hpp"
#include "smoe/cpu/eigen.hpp"
#include "smoe/cpu/parallel.hpp"
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

template <class T, Activation Act>
class FeedForwardExperts {
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
    using namespace cpu_kernels;
    const index_t A = dispatch.assignments(), d = d_model(), G = hidden(), H = Act::fan * G;
    check(x, dispatch);
    expect_shape(name, "ys", ys, A, d);
    h_.resize({A, G});
    if constexpr (!relu) pre_.resize({A, H});
    scratch_.resize(static_cast<std::size_t>(max_threads()));
    parallel_for_indexed(experts(), [&](index_t e, int thread) {
      const index_t begin = dispatch.expert_begin(e), end = dispatch.expert_end(e);
      if (begin == end) return;
      const ConstMatrixView<T> xs = gather(x, dispatch, begin, end, scratch_[static_cast<std::size_t>(thread)].xs);
      auto h = h_.matrix().rows_range(begin, end);
      // ReLU: the pre-activations go into h and are rectified in place.
      auto pre = relu ? h : pre_.matrix().rows_range(begin, end);
      eigen(pre).noalias() = eigen(xs) * eigen(w1_.value.slice(e));
      if (config_.bias) eigen(pre).rowwise() += eigen(b1_.value.matrix()).row(e);
      for (index_t i = 0; i < end - begin; ++i) Act::forward(pre.row(i), h.row(i), G);
      auto y = ys.rows_range(begin, end);
      eigen(y).noalias() = eigen(ConstMatrixView<T>(h)) * eigen(w2_.value.slice(e));
      if (config_.bias) eigen(y).rowwise() += eigen(b2_.value.matrix()).row(e);
    });
  }

  void backward(ConstMatrixView<T> x, const Dispatch<T>& dispatch, ConstMatrixView<T> dys, MatrixView<T> dx) {
    using namespace cpu_kernels;
    const index_t A = dispatch.assignments(), d = d_model(), G = hidden(), H = Act::fan * G;
    check(x, dispatch);
    expect_shape(name, "dys", dys, A, d);
    expect_shape(name, "dx", dx, x.rows, d);
    if (h_.rank() != 2 || h_.dim(0) != A) fail(name, ": backward needs the forward of the same dispatch first");
    dxs_.resize({A, d});
    scratch_.resize(static_cast<std::size_t>(max_threads()));
    parallel_for_indexed(experts(), [&](index_t e, int thread) {
      const index_t begin = dispatch.expert_begin(e), end = dispatch.expert_end(e), n = end - begin;
      if (begin == end) return;
      Scratch& scratch = scratch_[static_cast<std::size_t>(thread)];
      const auto dy = dys.rows_range(begin, end);
      scratch.dh.resize({n, G});
      const auto dh = scratch.dh.matrix();
      const ConstMatrixView<T> h = h_.matrix().rows_range(begin, end);
      eigen(dh).noalias() = eigen(dy) * eigen(w2_.value.slice(e)).transpose();
      eigen(w2_.grad.slice(e)).noalias() += eigen(h).transpose() * eigen(dy);
      if (config_.bias) eigen(b2_.grad.matrix()).row(e) += eigen(dy).colwise().sum();
      MatrixView<T> dpre = dh;  // ReLU: masked in place (h > 0 exactly where pre > 0)
      if constexpr (relu) {
        for (index_t i = 0; i < n; ++i) Act::backward(h.row(i), dh.row(i), dpre.row(i), G);
      } else {
        scratch.dpre.resize({n, H});
        dpre = scratch.dpre.matrix();
        const ConstMatrixView<T> pre = pre_.matrix().rows_range(begin, end);
        for (index_t i = 0; i < n; ++i) Act::backward(pre.row(i), dh.row(i), dpre.row(i), G);
      }
      const ConstMatrixView<T> xs = gather(x, dispatch, begin, end, scratch.xs);
      eigen(w1_.grad.slice(e)).noalias() += eigen(xs).transpose() * eigen(ConstMatrixView<T>(dpre));
      if (config_.bias) eigen(b1_.grad.matrix()).row(e) += eigen(ConstMatrixView<T>(dpre)).colwise().sum();
      eigen(dxs_.matrix().rows_range(begin, end)).noalias() =
          eigen(ConstMatrixView<T>(dpre)) * eigen(w1_.value.slice(e)).transpose();
    });
    const index_t K = dispatch.k;
    parallel_for_blocks(x.rows, token_block, [&](index_t first, index_t last) {
      for (index_t t = first; t < last; ++t) {
        T* out = dx.row(t);
        std::fill_n(out, d, T(0));
        for (index_t j = 0; j < K; ++j)
          if (const index_t s = dispatch.slot(t, j); s >= 0) {
            const T* g = dxs_.data() + s * d;
            for (index_t c = 0; c < d; ++c) out[c] += g[c];
          }
      }
    });
  }

 private:
  static constexpr bool relu = std::is_same_v<Act, Relu>;
  static constexpr index_t token_block = 32;

  struct Scratch {
    Tensor<T> xs, dh, dpre;  // one expert's gathered inputs, hidden gradient, pre-activation gradient
  };

  void check(ConstMatrixView<T> x, const Dispatch<T>& dispatch) const {
    expect_shape(name, "x", x, dispatch.tokens, d_model());
    expect_equal(name, "dispatch.experts", experts(), dispatch.experts);
  }

  // Copies the rows of x of slots [begin, end) into buffer; returns them as [end - begin, d].
  ConstMatrixView<T> gather(ConstMatrixView<T> x, const Dispatch<T>& dispatch, index_t begin, index_t end,
                            Tensor<T>& buffer) const {
    const index_t d = d_model();
    buffer.resize({end - begin, d});
    for (index_t s = begin; s < end; ++s)
      std::copy_n(x.row(dispatch.slot_token[static_cast<std::size_t>(s)]), d, buffer.data() + (s - begin) * d);
    return buffer.matrix();
  }

  FeedForwardConfig config_;
  Parameter<T> w1_, w2_, b1_, b2_;
  Tensor<T> pre_, h_;         // forward cache: pre-activations (not for ReLU), hidden units [A, ·]
  Tensor<T> dxs_;             // backward: per-slot input gradients [A, d]
  std::vector<Scratch> scratch_;  // per thread
};

template <class T>
using ReluExperts = FeedForwardExperts<T, Relu>;
template <class T>
using GeluExperts = FeedForwardExperts<T, Gelu>;
template <class T>
using SwiGluExperts = FeedForwardExperts<T, SwiGlu>;

}  // namespace smoe
