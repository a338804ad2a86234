#pragma once
// Embedding<T, smoe::cuda>: layers/embedding.hpp on the device, same config, parameter ("weight"
// [V, d]) and contract (ids [N] → y [N, d]; backward(dy) accumulates weight.grad).
//   forward:   one work item per element of y gathers W[id_t, c]; keeps the ids as int32 [N, 1].
//   backward:  the ids are stably sorted into a Dispatch (cuda/dispatch.cuh's build_dispatch, with
//              the vocabulary as the "experts"), so each vocabulary row's tokens are contiguous in
//              token order; one work item per element of dW sums its row's tokens in that order:
//              no atomics, bitwise-equal reruns.
// Out-of-range ids: the CPU throws before writing y. Checking ids on the host would copy them and
// wait for the stream, so on the device that check is opt-in (`check_ids`: the CPU's check and
// message, before anything is written). Without it, an id outside [0, V) gives a zero row of y,
// adds nothing to dW, and raises a device flag that had_invalid_ids() reads (and waits for).
#include <cstdint>
#include <string_view>
#include <vector>

#include "smoe/core/parameter.hpp"
#include "smoe/cuda/device_tensor.cuh"
#include "smoe/cuda/dispatch.cuh"
#include "smoe/cuda/validate.cuh"
#include "smoe/layers/embedding.hpp"

namespace smoe {
namespace cuda_kernels {

// y[t, c] = W[id_t, c]; element (t, 0) also stores id_t (−1 when out of range) and raises the flag.
template <class T, class Id>
struct EmbeddingGather {
  const Id* ids;
  const T* weight;  // [V, d]
  index_t vocab, d;
  std::int32_t* kept_ids;
  std::int32_t* invalid;
  T* y;
  index_t ldy;
  SMOE_HOST_DEVICE void operator()(index_t idx) const {
    const index_t t = idx / d, c = idx % d;
    const Id id = ids[t];
    const bool valid = id >= 0 && id < Id(vocab);
    if (c == 0) {
      kept_ids[t] = valid ? static_cast<std::int32_t>(id) : -1;
      if (!valid) *invalid = 1;  // every writer stores the same value: no race on the result
    }
    y[t * ldy + c] = valid ? weight[index_t(id) * d + c] : from_acc<T>(0);
  }
};

// dW[v, c] += Σ over v's tokens in token order of dy[t, c] (tokens of v: slots offsets[v] .. offsets[v+1]).
template <class T>
struct EmbeddingGrad {
  const std::int32_t* offsets;
  const std::int32_t* slot_token;
  const T* dy;
  index_t lddy, d;
  T* grad;
  SMOE_HOST_DEVICE void operator()(index_t idx) const {
    const index_t v = idx / d, c = idx % d;
    acc_t<T> sum = 0;
    for (index_t s = offsets[v]; s < offsets[v + 1]; ++s) sum += to_acc(dy[index_t(slot_token[s]) * lddy + c]);
    grad[idx] = from_acc<T>(to_acc(grad[idx]) + sum);
  }
};

}  // namespace cuda_kernels

template <class T>
class Embedding<T, cuda> {
  static_assert(is_device_scalar_v<T>, "Embedding<T, smoe::cuda>: T must be float, double, bf16 or fp16");

 public:
  using scalar_type = T;
  using backend = cuda;
  static constexpr const char* name = "Embedding<cuda>";
  // NaN/Inf checks of dy copy it to the host and wait for the stream: opt-in on the device.
  bool validate_inputs = false;
  // The CPU's range check of the ids (copies them to the host and waits): opt-in on the device.
  bool check_ids = false;

  explicit Embedding(EmbeddingConfig c, cuda_stream stream = {}) : config_((c.validate(name), c)), weight_({c.vocab, c.d_model}) {
    set_stream(stream);
  }

  index_t vocab() const { return config_.vocab; }
  index_t d_model() const { return config_.d_model; }
  const EmbeddingConfig& config() const { return config_; }
  Parameter<T, cuda>& weight() { return weight_; }
  cuda_stream stream() const { return stream_; }
  void set_stream(cuda_stream s) {
    stream_ = s;
    weight_.value.set_stream(s);
    weight_.grad.set_stream(s);
    for (auto* t : {&ids_, &invalid_}) t->set_stream(s);
    by_id_.set_stream(s);
  }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("weight"), weight_);
  }

  index_t total_parameters() const { return config_.vocab * config_.d_model; }
  double active_parameters_per_token() const { return double(config_.d_model); }
  double flops_per_token() const { return 0.0; }

  // ids: a device tensor of N ids (any shape; read in order); y [N, d].
  void forward(const Tensor<std::int32_t, cuda>& ids, MatrixView<T, cuda> y) { forward_impl(ids, y); }
  void forward(const Tensor<std::int64_t, cuda>& ids, MatrixView<T, cuda> y) { forward_impl(ids, y); }

  // dy [N, d] of the last forward's ids; accumulates weight.grad.
  void backward(ConstMatrixView<T, cuda> dy) {
    if (ids_.rank() != 2) fail(name, ": backward called before forward");
    const index_t tokens = ids_.dim(0), d = d_model();
    expect_shape(name, "dy", dy, tokens, d);
    if (validate_inputs) cuda_kernels::check_finite(name, "dy", dy, stream_);
    if (tokens == 0) return;
    // The kept ids are their own "gates": the dispatch's gate column is not used here.
    const ConstMatrixView<std::int32_t, cuda> ids = std::as_const(ids_).matrix();
    build_dispatch<std::int32_t>(ids, ids, vocab(), by_id_, stream_);
    cuda_kernels::for_each_index(stream_, vocab() * d,
                                 cuda_kernels::EmbeddingGrad<T>{by_id_.offsets.data(), by_id_.slot_token.data(), dy.data,
                                                                dy.stride, d, weight_.grad.data()});
  }

  // Whether the last forward saw an id outside [0, V) (waits for the stream).
  bool had_invalid_ids() const { return invalid_.size() == 1 && to_host(invalid_)[0] != 0; }

 private:
  template <class Id>
  void forward_impl(const Tensor<Id, cuda>& ids, MatrixView<T, cuda> y) {
    const index_t tokens = ids.size(), V = vocab(), d = d_model();
    expect_shape(name, "y", y, tokens, d);
    if (check_ids && tokens > 0) {
      std::vector<Id> host(static_cast<std::size_t>(tokens));
      cuda_kernels::copy_bytes(host.data(), ids.data(), sizeof(Id) * host.size(), stream_);
      synchronize(stream_);
      for (index_t t = 0; t < tokens; ++t)
        if (host[t] < 0 || host[t] >= V) fail(name, ": ids[", t, "] must be in [0, ", V, "), got ", host[t]);
    }
    ids_.resize({tokens, 1});
    invalid_.resize({1});
    invalid_.zero();
    cuda_kernels::for_each_index(stream_, tokens * d,
                                 cuda_kernels::EmbeddingGather<T, Id>{ids.data(), weight_.value.data(), V, d, ids_.data(),
                                                                      invalid_.data(), y.data, y.stride});
  }

  EmbeddingConfig config_;
  Parameter<T, cuda> weight_;
  cuda_stream stream_{};
  Tensor<std::int32_t, cuda> ids_;      // forward cache: ids [N, 1] (−1 where out of range)
  Tensor<std::int32_t, cuda> invalid_;  // device flag: the last forward saw an id out of range
  Dispatch<std::int32_t, cuda> by_id_;  // backward: tokens grouped by id, in token order
};

}  // namespace smoe
