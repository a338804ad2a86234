#pragma once
// OutputProjection: the language-model head, logits = x · Wᵀ with "weight" W [V, d] (the
// embedding's layout, so the two can share one matrix).
//   backward: dx = dlogits · W,   dW += dlogitsᵀ · x
//
// Weight tying (Press & Wolf 2017; Inan et al. 2017): a tied head owns no parameter. It holds a
// reference to another Parameter [V, d] (usually Embedding::weight()), reads its value and adds
// its gradient into that parameter's grad, and its for_each_parameter visits nothing, so a model
// that visits "embed." and "head." sees the shared matrix once, as "embed.weight". A composite
// that owns both the embedding and a tied head must call tie() again after it is copied or
// moved (the reference follows the object it was given, not the copy).
// The forward keeps a copy of x [N, d].
#include <algorithm>
#include <string_view>
#include <type_traits>
#include <utility>

#include "smoe/core/parameter.hpp"
#include "smoe/core/validate.hpp"
#include "smoe/cpu/parallel.hpp"
#include "smoe/layers/detail/blocked_gemm.hpp"
#include "smoe/layers/embedding.hpp"

namespace smoe {

struct OutputProjectionConfig {
  index_t vocab = 0;  // V
  index_t d_model = 0;

  void validate(const char* context) const {
    if (vocab < 1) fail(context, ": vocab must be >= 1, got ", vocab);
    if (d_model < 1) fail(context, ": d_model must be >= 1, got ", d_model);
  }
};

template <class T, class Backend = cpu>
class OutputProjection {
  static_assert(std::is_same_v<Backend, cpu>, "OutputProjection<T, smoe::cuda> needs <smoe/cuda/output_projection.cuh>");

 public:
  using scalar_type = T;
  using backend = cpu;
  static constexpr const char* name = "OutputProjection";
  bool validate_inputs = validate_by_default;

  // A head with its own weight [V, d].
  explicit OutputProjection(OutputProjectionConfig c) : config_((c.validate(name), c)), own_({c.vocab, c.d_model}) {}
  // A head tied to `shared`, which must be [V, d] and outlive the head.
  OutputProjection(OutputProjectionConfig c, Parameter<T>& shared) : config_((c.validate(name), c)) { tie(shared); }
  // A head tied to the embedding's weight.
  static OutputProjection tied_to(Embedding<T>& embedding) {
    return OutputProjection({.vocab = embedding.vocab(), .d_model = embedding.d_model()}, embedding.weight());
  }

  // Shares `shared` from now on (also how a composite re-ties after a copy or move).
  void tie(Parameter<T>& shared) {
    if (shared.value.rank() != 2 || shared.value.dim(0) != vocab() || shared.value.dim(1) != d_model() ||
        shared.grad.size() != shared.value.size())
      fail(name, ": the tied weight must be [", vocab(), ", ", d_model(), "] with a gradient of the same size");
    shared_ = &shared;
  }
  bool tied() const { return shared_ != nullptr; }

  index_t vocab() const { return config_.vocab; }
  index_t d_model() const { return config_.d_model; }
  const OutputProjectionConfig& config() const { return config_; }
  // The weight in use: the head's own, or the tied one.
  Parameter<T>& weight() { return shared_ ? *shared_ : own_; }
  const Parameter<T>& weight() const { return shared_ ? *shared_ : own_; }

  // Visits "weight" only when the head owns it.
  template <class F>
  void for_each_parameter(F&& f) {
    if (!tied()) f(std::string_view("weight"), own_);
  }

  // Accounting: a tied head owns no parameter but still uses all V·d weights for every token.
  index_t total_parameters() const { return tied() ? 0 : vocab() * d_model(); }
  double active_parameters_per_token() const { return double(vocab() * d_model()); }
  double flops_per_token() const { return 2.0 * double(vocab() * d_model()); }

  // x [N, d], logits [N, V].
  void forward(ConstMatrixView<T> x, MatrixView<T> logits) {
    const index_t tokens = x.rows, d = d_model();
    expect_shape(name, "x", x, tokens, d);
    expect_shape(name, "logits", logits, tokens, vocab());
    if (validate_inputs) check_finite(name, "x", x);
    x_.resize({tokens, d});
    cpu_kernels::parallel_for_blocks(tokens, row_block, [&](index_t first, index_t last) {
      for (index_t t = first; t < last; ++t) std::copy_n(x.row(t), d, x_.data() + t * d);
    });
    if (tokens == 0) return;
    detail::blocked_gemm_nt<T>(x_.matrix(), std::as_const(weight().value).matrix(), logits, weight_t_);
  }

  // dlogits [N, V]; writes dx [N, d] and accumulates the weight's gradient (the tied one's if tied).
  void backward(ConstMatrixView<T> dlogits, MatrixView<T> dx) {
    if (x_.rank() != 2) fail(name, ": backward called before forward");
    const index_t tokens = x_.dim(0);
    expect_shape(name, "dlogits", dlogits, tokens, vocab());
    expect_shape(name, "dx", dx, tokens, d_model());
    if (validate_inputs) check_finite(name, "dlogits", dlogits);
    if (tokens == 0) return;
    Parameter<T>& w = weight();
    detail::blocked_gemm_nn<T>(dlogits, std::as_const(w.value).matrix(), dx);
    detail::blocked_gemm_tn_add<T>(dlogits, std::as_const(x_).matrix(), w.grad.matrix());
  }

 private:
  static constexpr index_t row_block = 64;

  OutputProjectionConfig config_;
  Parameter<T> own_;
  Parameter<T>* shared_ = nullptr;
  Tensor<T> x_;        // forward cache
  Tensor<T> weight_t_;  // forward scratch: Wᵀ [d, V]
};

}  // namespace smoe
