#pragma once
// FeedForwardExperts<T, Act, cuda>: the E two-layer experts of experts/feed_forward_experts.hpp on
// the device, same parameters and names ("w1" [E, d, fan·G], "w2" [E, G, d], "b1", "b2"), dtype T
// (fp32, bf16, fp16, fp64) with fp32 accumulation (fp64 for double).
//   forward:  pre = x[slot_token]·W1[e] + b1[e]   (tokens gathered in the GEMM's loads)
//             h = act(pre);  ys = h·W2[e] + b2[e]
//   backward: dh = dys·W2[e]ᵀ;  dpre = act'(pre)·dh;  W2.grad[e] += hᵀ·dys;  W1.grad[e] += x[slots]ᵀ·dpre
//             (per-expert reductions over its slots in slot order, no atomics);  dx[t] = Σ_k dpre·W1ᵀ
//             summed per token over its k slots.
// The GEMMs are cuda/grouped_ffn.cuh's, shared with the tied and pooled experts.
#include <string_view>

#include "smoe/core/parameter.hpp"
#include "smoe/cuda/grouped_ffn.cuh"
#include "smoe/experts/feed_forward_experts.hpp"

namespace smoe {

template <class T, Activation Act>
class FeedForwardExperts<T, Act, cuda> {
  static_assert(UnitActivation<Act>, "FeedForwardExperts<T, Act, cuda>: Act needs the per-unit `unit` and "
                                     "`unit_backward` (experts/activation.hpp) to run on the device");

 public:
  using scalar_type = T;
  using gate_type = acc_t<T>;
  using backend = cuda;
  using activation = Act;
  static constexpr const char* name = "FeedForwardExperts<cuda>";

  explicit FeedForwardExperts(FeedForwardConfig c, cuda_stream stream = {}) : config_((c.validate(name), c)) {
    w1_ = Parameter<T, cuda>({c.experts, c.d_model, Act::fan * c.hidden});
    w2_ = Parameter<T, cuda>({c.experts, c.hidden, c.d_model});
    if (c.bias) {
      b1_ = Parameter<T, cuda>({c.experts, Act::fan * c.hidden});
      b2_ = Parameter<T, cuda>({c.experts, c.d_model});
    }
    set_stream(stream);
  }

  index_t experts() const { return config_.experts; }
  index_t d_model() const { return config_.d_model; }
  index_t hidden() const { return config_.hidden; }
  bool has_bias() const { return config_.bias; }
  const FeedForwardConfig& config() const { return config_; }
  Parameter<T, cuda>& w1() { return w1_; }
  Parameter<T, cuda>& w2() { return w2_; }
  Parameter<T, cuda>& b1() { return b1_; }
  Parameter<T, cuda>& b2() { return b2_; }
  // GemmPath::portable runs the portable GEMMs on a GPU too (the tensor-core kernels' reference).
  void set_gemm_path(cuda_kernels::GemmPath path) { gemm_path_ = path; }
  cuda_stream stream() const { return stream_; }
  void set_stream(cuda_stream s) {
    stream_ = s;
    for (auto* p : {&w1_, &w2_, &b1_, &b2_}) {
      p->value.set_stream(s);
      p->grad.set_stream(s);
    }
    cache_.set_stream(s);
  }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("w1"), w1_);
    f(std::string_view("w2"), w2_);
    if (config_.bias) {
      f(std::string_view("b1"), b1_);
      f(std::string_view("b2"), b2_);
    }
  }

  // ys: [dispatch.slots(), d]; rows past the assignment count are left as they are.
  void forward(ConstMatrixView<T, cuda> x, const Dispatch<gate_type, cuda>& dispatch, MatrixView<T, cuda> ys) {
    check(x, dispatch);
    expect_shape(name, "ys", ys, dispatch.slots(), d_model());
    cuda_kernels::grouped_ffn_forward<T, Act>(stream_, x, dispatch, weights(), shape(), ys, cache_, gemm_path_);
  }

  void backward(ConstMatrixView<T, cuda> x, const Dispatch<gate_type, cuda>& dispatch, ConstMatrixView<T, cuda> dys,
                MatrixView<T, cuda> dx) {
    check(x, dispatch);
    expect_shape(name, "dys", dys, dispatch.slots(), d_model());
    expect_shape(name, "dx", dx, x.rows, d_model());
    if (!cache_.holds(dispatch.slots())) fail(name, ": backward needs the forward of the same dispatch first");
    cuda_kernels::grouped_ffn_backward<T, Act>(stream_, x, dispatch, weights(), gradients(), shape(), dys, dx, cache_,
                                               gemm_path_);
  }

  // Device pointers to the parameters, in the grouped GEMM's layout.
  cuda_kernels::ExpertWeights<T> weights() const {
    return {w1_.value.data(), w2_.value.data(), config_.bias ? b1_.value.data() : nullptr,
            config_.bias ? b2_.value.data() : nullptr};
  }
  cuda_kernels::ExpertGradients<T> gradients() {
    return {w1_.grad.data(), w2_.grad.data(), config_.bias ? b1_.grad.data() : nullptr,
            config_.bias ? b2_.grad.data() : nullptr};
  }
  cuda_kernels::GemmPath gemm_path() const { return gemm_path_; }

 private:
  void check(ConstMatrixView<T, cuda> x, const Dispatch<gate_type, cuda>& dispatch) const {
    expect_shape(name, "x", x, dispatch.tokens, d_model());
    expect_equal(name, "dispatch.experts", experts(), dispatch.experts);
  }
  cuda_kernels::GroupedFFNShape shape() const { return {d_model(), hidden()}; }

  FeedForwardConfig config_;
  cuda_stream stream_{};
  Parameter<T, cuda> w1_, w2_, b1_, b2_;
  cuda_kernels::GroupedFFNDeviceCache<T> cache_;
  cuda_kernels::GemmPath gemm_path_ = cuda_kernels::GemmPath::fastest;
};

}  // namespace smoe
