#pragma once
// SoftmaxCrossEntropy: the language-model loss over logits [N, V] and int targets [N], in nats,
//   loss = (1/n) Σ_{t counted} (lse_t − z_{t, y_t}),   lse_t = m_t + log Σ_j exp(z_tj − m_t),  m_t = max_j z_tj
//   ∂loss/∂z_tj = (softmax(z_t)_j − [j = y_t]) / n
// where a token counts unless its target equals ignore_index (PyTorch's default −100), and n is
// the number of counted tokens (the loss is 0, with a zero gradient, when no token counts).
// Row-parallel; the per-row losses are summed in row order (in double), so the loss is the same
// for any thread count. The forward keeps m and the log-sum [N] and the targets, not the logits: backward takes
// the logits again, and may write the gradient over them in place (dlogits = logits), which
// saves the [N, V] buffer a copy would cost.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "smoe/core/tensor.hpp"
#include "smoe/core/validate.hpp"
#include "smoe/cpu/parallel.hpp"

namespace smoe {

struct CrossEntropyConfig {
  std::int64_t ignore_index = -100;  // targets equal to it do not count

  void validate(const char*) const {}
};

template <class T, class Backend = cpu>
class SoftmaxCrossEntropy {
  static_assert(std::is_same_v<Backend, cpu>, "SoftmaxCrossEntropy<T, smoe::cuda> needs <smoe/cuda/cross_entropy.cuh>");

 public:
  using scalar_type = T;
  using backend = cpu;
  static constexpr const char* name = "SoftmaxCrossEntropy";
  bool validate_inputs = validate_by_default;

  explicit SoftmaxCrossEntropy(CrossEntropyConfig c = {}) : config_((c.validate(name), c)) {}

  const CrossEntropyConfig& config() const { return config_; }
  // Tokens that counted in the last forward (targets other than ignore_index).
  index_t counted() const { return counted_; }
  // −log softmax(z_t)[y_t] per row of the last forward, 0 for ignored rows.
  std::span<const T> token_losses() const { return losses_.span(); }

  template <class F>
  void for_each_parameter(F&&) {}
  index_t total_parameters() const { return 0; }
  double active_parameters_per_token() const { return 0.0; }
  double flops_per_token() const { return 0.0; }  // elementwise only (FLOPs count matrix products)

  // logits [N, V] (N >= 1), targets [N] in [0, V) or ignore_index. Returns the mean loss.
  T forward(ConstMatrixView<T> logits, std::span<const std::int32_t> targets) { return forward_impl(logits, targets); }
  T forward(ConstMatrixView<T> logits, std::span<const std::int64_t> targets) { return forward_impl(logits, targets); }

  // Writes dlogits = scale · ∂loss/∂logits for the logits of the last forward (passed again);
  // dlogits may be the logits' own memory.
  void backward(ConstMatrixView<T> logits, MatrixView<T> dlogits, T scale = T(1)) {
    if (max_.size() == 0) fail(name, ": backward called before forward");
    const index_t N = max_.size(), V = vocab_;
    expect_shape(name, "logits", logits, N, V);
    expect_shape(name, "dlogits", dlogits, N, V);
    const T factor = counted_ > 0 ? T(double(scale) / double(counted_)) : T(0);
    cpu_kernels::parallel_for_blocks(N, row_block, [&](index_t first, index_t last) {
      for (index_t t = first; t < last; ++t) {
        const T* z = logits.row(t);
        T* g = dlogits.row(t);
        const std::int64_t y = targets_[static_cast<std::size_t>(t)];
        if (y == config_.ignore_index) {
          std::fill_n(g, V, T(0));
          continue;
        }
        const T m = max_[t], log_sum = log_sum_[t];
        for (index_t j = 0; j < V; ++j) g[j] = factor * std::exp((z[j] - m) - log_sum);
        g[y] -= factor;
      }
    });
  }

 private:
  static constexpr index_t row_block = 16;

  template <class Id>
  T forward_impl(ConstMatrixView<T> logits, std::span<const Id> targets) {
    const index_t N = logits.rows, V = logits.cols;
    if (N < 1) fail(name, ": logits must have at least one row, got [", N, ", ", V, "]");
    if (V < 1) fail(name, ": logits must have at least one column (the vocabulary), got [", N, ", ", V, "]");
    if (static_cast<index_t>(targets.size()) != N)
      fail(name, ": targets must have ", N, " entries (the rows of logits), got ", targets.size());
    index_t counted = 0;
    for (index_t t = 0; t < N; ++t) {
      const std::int64_t y = targets[static_cast<std::size_t>(t)];
      if (y == config_.ignore_index) continue;
      if (y < 0 || y >= V)
        fail(name, ": targets[", t, "] must be in [0, ", V, ") or ignore_index = ", config_.ignore_index, ", got ", y);
      ++counted;
    }
    if (validate_inputs) check_finite(name, "logits", logits);
    vocab_ = V;
    counted_ = counted;
    targets_.assign(targets.begin(), targets.end());
    max_.resize({N});
    log_sum_.resize({N});
    losses_.resize({N});
    cpu_kernels::parallel_for_blocks(N, row_block, [&](index_t first, index_t last) {
      for (index_t t = first; t < last; ++t) {
        const T* z = logits.row(t);
        T m = z[0];
        for (index_t j = 1; j < V; ++j) m = std::max(m, z[j]);
        double sum = 0;
        for (index_t j = 0; j < V; ++j) sum += double(std::exp(z[j] - m));
        max_[t] = m;
        log_sum_[t] = T(std::log(sum));
        // (m − z_y) + log Σ: no cancellation of two large lse-sized terms
        const std::int64_t y = targets_[static_cast<std::size_t>(t)];
        losses_[t] = y == config_.ignore_index ? T(0) : T(double(m) - double(z[y]) + std::log(sum));
      }
    });
    if (counted == 0) return T(0);
    double total = 0;
    for (index_t t = 0; t < N; ++t) total += double(losses_[t]);
    return T(total / double(counted));
  }

  CrossEntropyConfig config_;
  index_t vocab_ = 0, counted_ = 0;
  std::vector<std::int64_t> targets_;  // forward cache
  Tensor<T> max_, log_sum_, losses_;  // lse_t = max_t + log_sum_t; per-row losses
};

}  // namespace smoe
