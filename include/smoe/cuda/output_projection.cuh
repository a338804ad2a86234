#pragma once
// OutputProjection<T, smoe::cuda>: layers/output_projection.hpp on the device, same config,
// parameter ("weight" [V, d], the embedding's layout) and contract, tied or untied:
//   forward:   logits = x·Wᵀ (RowGemm, W read through strides: no transposed copy); keeps a copy of x
//   backward:  dx = dlogits·W (RowGemm), W.grad += dlogitsᵀ·x (GroupedOuterSum without groups:
//              one work item per element of W summing the tokens in order): no atomics.
// A tied head holds a pointer to a device Parameter [V, d] (usually Embedding<T, smoe::cuda>::
// weight()), reads its value and adds into its grad; it owns and visits no parameter, as on the CPU.
#include <string_view>

#include "smoe/core/parameter.hpp"
#include "smoe/cuda/device_tensor.cuh"
#include "smoe/cuda/embedding.cuh"
#include "smoe/cuda/grouped_gemm.cuh"
#include "smoe/cuda/row_ops.cuh"
#include "smoe/cuda/validate.cuh"
#include "smoe/layers/output_projection.hpp"

namespace smoe {
template <class T>
class OutputProjection<T, cuda> {
  static_assert(is_device_scalar_v<T>, "OutputProjection<T, smoe::cuda>: T must be float, double, bf16 or fp16");

 public:
  using scalar_type = T;
  using backend = cuda;
  static constexpr const char* name = "OutputProjection<cuda>";
  // NaN/Inf checks of x and dlogits copy them to the host and wait for the stream: opt-in on the device.
  bool validate_inputs = false;

  // A head with its own weight [V, d].
  explicit OutputProjection(OutputProjectionConfig c, cuda_stream stream = {})
      : config_((c.validate(name), c)), own_({c.vocab, c.d_model}) {
    set_stream(stream);
  }
  // A head tied to `shared`, which must be [V, d] and outlive the head.
  OutputProjection(OutputProjectionConfig c, Parameter<T, cuda>& shared, cuda_stream stream = {})
      : config_((c.validate(name), c)) {
    tie(shared);
    set_stream(stream);
  }
  // A head tied to the embedding's weight (on the embedding's stream).
  static OutputProjection tied_to(Embedding<T, cuda>& embedding) {
    return OutputProjection({.vocab = embedding.vocab(), .d_model = embedding.d_model()}, embedding.weight(),
                            embedding.stream());
  }

  // Shares `shared` from now on (also how a composite re-ties after a copy or move).
  void tie(Parameter<T, cuda>& shared) {
    if (shared.value.rank() != 2 || shared.value.dim(0) != vocab() || shared.value.dim(1) != d_model() ||
        shared.grad.size() != shared.value.size())
      fail(name, ": the tied weight must be [", vocab(), ", ", d_model(), "] with a gradient of the same size");
    shared_ = &shared;
  }
  bool tied() const { return shared_ != nullptr; }

  index_t vocab() const { return config_.vocab; }
  index_t d_model() const { return config_.d_model; }
  const OutputProjectionConfig& config() const { return config_; }
  Parameter<T, cuda>& weight() { return shared_ ? *shared_ : own_; }
  const Parameter<T, cuda>& weight() const { return shared_ ? *shared_ : own_; }
  cuda_stream stream() const { return stream_; }
  // The head's own buffers follow `s`; a tied weight stays on its owner's stream.
  void set_stream(cuda_stream s) {
    stream_ = s;
    for (auto* t : {&own_.value, &own_.grad, &x_}) t->set_stream(s);
  }

  // Visits "weight" only when the head owns it.
  template <class F>
  void for_each_parameter(F&& f) {
    if (!tied()) f(std::string_view("weight"), own_);
  }

  index_t total_parameters() const { return tied() ? 0 : vocab() * d_model(); }
  double active_parameters_per_token() const { return double(vocab() * d_model()); }
  double flops_per_token() const { return 2.0 * double(vocab() * d_model()); }

  // x [N, d], logits [N, V].
  void forward(ConstMatrixView<T, cuda> x, MatrixView<T, cuda> logits) {
    using namespace cuda_kernels;
    const index_t tokens = x.rows, d = d_model(), V = vocab();
    expect_shape(name, "x", x, tokens, d);
    expect_shape(name, "logits", logits, tokens, V);
    if (validate_inputs) check_finite(name, "x", x, stream_);
    x_.resize({tokens, d});
    RowOps<cuda>::copy(x, x_.matrix(), stream_);
    for_each_index(stream_, tokens * V,
                   RowGemm<T, T, T>{x_.data(), d, nullptr, Strided<T>{weight().value.data(), 0, 1, d}, nullptr, nullptr, 0,
                                    nullptr, logits.data, logits.stride, d, V, false});
  }

  // dlogits [N, V]; writes dx [N, d] and accumulates the weight's gradient (the tied one's if tied).
  void backward(ConstMatrixView<T, cuda> dlogits, MatrixView<T, cuda> dx) {
    using namespace cuda_kernels;
    if (x_.rank() != 2) fail(name, ": backward called before forward");
    const index_t tokens = x_.dim(0), d = d_model(), V = vocab();
    expect_shape(name, "dlogits", dlogits, tokens, V);
    expect_shape(name, "dx", dx, tokens, d);
    if (validate_inputs) check_finite(name, "dlogits", dlogits, stream_);
    if (tokens == 0) return;
    Parameter<T, cuda>& w = weight();
    for_each_index(stream_, V * d,
                   GroupedOuterSum<T, T, T>{dlogits.data, dlogits.stride, nullptr, x_.data(), d, nullptr, tokens,
                                            w.grad.data(), V, d});
    for_each_index(stream_, tokens * d,
                   RowGemm<T, T, T>{dlogits.data, dlogits.stride, nullptr, Strided<T>{w.value.data(), 0, d, 1}, nullptr,
                                    nullptr, 0, nullptr, dx.data, dx.stride, V, d, false});
  }

 private:
  OutputProjectionConfig config_;
  Parameter<T, cuda> own_;
  Parameter<T, cuda>* shared_ = nullptr;
  cuda_stream stream_{};
  Tensor<T, cuda> x_;  // forward cache: a copy of x
};

}  // namespace smoe
