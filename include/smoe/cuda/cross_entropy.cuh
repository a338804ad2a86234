#pragma once
// SoftmaxCrossEntropy<T, smoe::cuda>: layers/cross_entropy.hpp on the device, same config
// (ignore_index) and formulas: the mean over counted tokens of lse_t − z_{t, y_t}, 0 with a zero
// gradient when no token counts.
//   forward:   one work item per row (max, Σ exp in acc_t<T>: fp32, fp64 for double); the per-row
//              losses and counted flags are summed in fixed blocks of 256 rows, then over blocks
//              in order (losses.cuh's column_sums), and the mean is formed on the device: the loss
//              is a device scalar (acc_t<T>), read with read_loss(), which waits for the stream.
//   backward:  one work item per logit: (softmax − [j = y]) · scale / counted, the count read on
//              the device; dlogits may be the logits' own memory, as on the CPU.
// Targets: shapes are checked on the host, values cannot be without a copy and a wait. So the
// CPU's range check (and the NaN/Inf check of the logits) is opt-in (`validate_inputs`); without
// it a target outside [0, V) that is not ignore_index is treated as ignored (it does not count)
// and raises a device flag that had_invalid_targets() reads.
#include <cmath>
#include <cstdint>
#include <vector>

#include "smoe/cuda/device_tensor.cuh"
#include "smoe/cuda/losses.cuh"
#include "smoe/cuda/validate.cuh"
#include "smoe/layers/cross_entropy.hpp"

namespace smoe {
namespace cuda_kernels {

// Row t: max, log Σ exp(z − max), the token's loss and its kept target (−1: does not count).
template <class T, class Id>
struct CrossEntropyRow {
  using A = acc_t<T>;
  const T* logits;
  index_t ld, V;
  const Id* targets;
  std::int64_t ignore_index;
  A *max, *log_sum, *loss;
  std::int32_t* kept;
  std::int32_t* invalid;
  SMOE_HOST_DEVICE void operator()(index_t t) const {
    using std::exp, std::log;
    const T* z = logits + t * ld;
    A m = to_acc(z[0]);
    for (index_t j = 1; j < V; ++j) m = m < to_acc(z[j]) ? to_acc(z[j]) : m;
    A sum = 0;
    for (index_t j = 0; j < V; ++j) sum += exp(to_acc(z[j]) - m);
    const A ls = log(sum);
    max[t] = m;
    log_sum[t] = ls;
    const std::int64_t y = static_cast<std::int64_t>(targets[t]);
    const bool counts = y != ignore_index && y >= 0 && y < V;
    if (y != ignore_index && !counts) *invalid = 1;  // every writer stores the same value
    kept[t] = counts ? static_cast<std::int32_t>(y) : -1;
    // (m − z_y) + log Σ: no cancellation of two large lse-sized terms
    loss[t] = counts ? (m - to_acc(z[y])) + ls : A(0);
  }
};

// Column 0: the token's loss; column 1: whether it counts.
template <class A>
struct LossAndCount {
  const A* loss;
  const std::int32_t* kept;
  SMOE_HOST_DEVICE A operator()(index_t t, index_t column) const {
    return column == 0 ? loss[t] : A(kept[t] >= 0 ? 1 : 0);
  }
};

// mean = Σ loss / counted (0 when nothing counts), from the two column sums.
template <class A>
struct MeanLoss {
  const A* totals;
  A* mean;
  SMOE_HOST_DEVICE void operator()() const { *mean = totals[1] > 0 ? totals[0] / totals[1] : A(0); }
};

// dlogits[t, j] = factor · softmax(z_t)_j − factor · [j = y_t], factor = scale / counted; 0 for rows that do not count.
template <class T>
struct CrossEntropyGrad {
  using A = acc_t<T>;
  const T* logits;
  index_t ld;
  const A *max, *log_sum, *totals;
  const std::int32_t* kept;
  T* dlogits;
  index_t ldd, V;
  A scale;
  SMOE_HOST_DEVICE void operator()(index_t idx) const {
    using std::exp;
    const index_t t = idx / V, j = idx % V;
    const std::int32_t y = kept[t];
    const A factor = totals[1] > 0 ? scale / totals[1] : A(0);
    A g = 0;
    if (y >= 0) {
      g = factor * exp((to_acc(logits[t * ld + j]) - max[t]) - log_sum[t]);
      if (j == y) g -= factor;
    }
    dlogits[t * ldd + j] = from_acc<T>(g);
  }
};

}  // namespace cuda_kernels

template <class T>
class SoftmaxCrossEntropy<T, cuda> {
  static_assert(is_device_scalar_v<T>, "SoftmaxCrossEntropy<T, smoe::cuda>: T must be float, double, bf16 or fp16");

 public:
  using scalar_type = T;
  using backend = cuda;
  using A = acc_t<T>;
  static constexpr const char* name = "SoftmaxCrossEntropy<cuda>";
  // The CPU's target range check and NaN/Inf check of the logits: both copy to the host and wait,
  // so they are opt-in on the device.
  bool validate_inputs = false;

  explicit SoftmaxCrossEntropy(CrossEntropyConfig c = {}, cuda_stream stream = {}) : config_((c.validate(name), c)) {
    set_stream(stream);
  }

  const CrossEntropyConfig& config() const { return config_; }
  cuda_stream stream() const { return stream_; }
  void set_stream(cuda_stream s) {
    stream_ = s;
    for (auto* t : {&max_, &log_sum_, &losses_, &partial_, &totals_, &loss_}) t->set_stream(s);
    for (auto* t : {&kept_, &invalid_}) t->set_stream(s);
  }

  template <class F>
  void for_each_parameter(F&&) {}
  index_t total_parameters() const { return 0; }
  double active_parameters_per_token() const { return 0.0; }
  double flops_per_token() const { return 0.0; }

  // logits [N, V] (N >= 1), targets: a device tensor of N ids in [0, V) or ignore_index. Returns
  // the mean loss as a device scalar (acc_t<T>), valid until the next forward; nothing waits.
  const A* forward(ConstMatrixView<T, cuda> logits, const Tensor<std::int32_t, cuda>& targets) {
    return forward_impl(logits, targets);
  }
  const A* forward(ConstMatrixView<T, cuda> logits, const Tensor<std::int64_t, cuda>& targets) {
    return forward_impl(logits, targets);
  }

  // The last forward's mean loss (waits for the stream).
  A read_loss() const { return to_host(loss_)[0]; }
  // Tokens that counted in the last forward (waits for the stream).
  index_t read_counted() const { return index_t(to_host(totals_)[1]); }
  // −log softmax(z_t)[y_t] per row of the last forward, 0 for rows that do not count (device [N]).
  const Tensor<A, cuda>& token_losses() const { return losses_; }
  // Whether the last forward saw a target outside [0, V) other than ignore_index (waits).
  bool had_invalid_targets() const { return invalid_.size() == 1 && to_host(invalid_)[0] != 0; }

  // Writes dlogits = scale · ∂loss/∂logits for the logits of the last forward (passed again);
  // dlogits may be the logits' own memory.
  void backward(ConstMatrixView<T, cuda> logits, MatrixView<T, cuda> dlogits, A scale = A(1)) {
    if (max_.size() == 0) fail(name, ": backward called before forward");
    const index_t N = max_.size(), V = vocab_;
    expect_shape(name, "logits", logits, N, V);
    expect_shape(name, "dlogits", dlogits, N, V);
    cuda_kernels::for_each_index(stream_, N * V,
                                 cuda_kernels::CrossEntropyGrad<T>{logits.data, logits.stride, max_.data(),
                                                                   log_sum_.data(), totals_.data(), kept_.data(),
                                                                   dlogits.data, dlogits.stride, V, scale});
  }

 private:
  template <class Id>
  const A* forward_impl(ConstMatrixView<T, cuda> logits, const Tensor<Id, cuda>& targets) {
    using namespace cuda_kernels;
    const index_t N = logits.rows, V = logits.cols;
    if (N < 1) fail(name, ": logits must have at least one row, got [", N, ", ", V, "]");
    if (V < 1) fail(name, ": logits must have at least one column (the vocabulary), got [", N, ", ", V, "]");
    if (targets.size() != N) fail(name, ": targets must have ", N, " entries (the rows of logits), got ", targets.size());
    if (validate_inputs) {
      std::vector<Id> host(static_cast<std::size_t>(N));
      copy_bytes(host.data(), targets.data(), sizeof(Id) * host.size(), stream_);
      synchronize(stream_);
      for (index_t t = 0; t < N; ++t) {
        const std::int64_t y = host[static_cast<std::size_t>(t)];
        if (y != config_.ignore_index && (y < 0 || y >= V))
          fail(name, ": targets[", t, "] must be in [0, ", V, ") or ignore_index = ", config_.ignore_index, ", got ", y);
      }
      check_finite(name, "logits", logits, stream_);
    }
    vocab_ = V;
    for (auto* t : {&max_, &log_sum_, &losses_}) t->resize({N});
    kept_.resize({N});
    invalid_.resize({1});
    invalid_.zero();
    loss_.resize({1});
    for_each_index(stream_, N,
                   CrossEntropyRow<T, Id>{logits.data, logits.stride, V, targets.data(), config_.ignore_index, max_.data(),
                                          log_sum_.data(), losses_.data(), kept_.data(), invalid_.data()});
    column_sums(stream_, LossAndCount<A>{losses_.data(), kept_.data()}, N, 2, partial_, totals_);
    run_once(stream_, MeanLoss<A>{totals_.data(), loss_.data()});
    return loss_.data();
  }

  CrossEntropyConfig config_;
  cuda_stream stream_{};
  index_t vocab_ = 0;
  Tensor<A, cuda> max_, log_sum_, losses_;  // forward cache: lse_t = max_t + log_sum_t; per-row losses
  Tensor<std::int32_t, cuda> kept_;         // target of each row, −1 where it does not count
  Tensor<A, cuda> partial_, totals_;        // [blocks, 2] and [2]: Σ loss, counted
  Tensor<A, cuda> loss_;                    // the mean (device scalar)
  Tensor<std::int32_t, cuda> invalid_;      // device flag: a target out of range
};

}  // namespace smoe
