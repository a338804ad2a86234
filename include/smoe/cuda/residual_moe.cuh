#pragma once
// ResidualMoE<Layer, Act> of a CUDA layer: layers/residual_moe.hpp on the device (PR-MoE's residual
// expert: (c0, c1) = softmax(x·mixᵀ (+ mix_bias)), y = c0·MoE(x) + c1·MLP(x)), same parameters
// ("residual.w1", "residual.w2", "residual.mix" [2, d], optional biases) and math: the mixing
// logits and ∂L/∂c in double per token as on the CPU, dmix as a reduction over tokens in order (no
// atomics). The residual MLP is a DenseMLP<T, Act, cuda>. Runs on the inner layer's stream.
#include <cmath>
#include <string_view>

#include "smoe/cuda/dense_mlp.cuh"
#include "smoe/cuda/moe.cuh"
#include "smoe/layers/residual_moe.hpp"

namespace smoe {

namespace cuda_kernels {

// c[t] = softmax(mix·x[t] (+ bias)) in double; y[t] = c0·a[t] + c1·b[t] (per token).
template <class T>
struct ResidualMix {
  const T* x;
  index_t x_stride;
  const T* mix;
  const T* mix_bias;  // null: none
  const T* a;         // MoE(x) [T, d]
  const T* b;         // MLP(x) [T, d]
  T* c;               // [T, 2]
  T* y;
  index_t y_stride, d;
  SMOE_HOST_DEVICE void operator()(index_t t) const {
    double z[2];
    for (int j = 0; j < 2; ++j) {
      double acc = mix_bias ? double(to_acc(mix_bias[j])) : 0.0;
      for (index_t i = 0; i < d; ++i) acc += double(to_acc(mix[j * d + i])) * double(to_acc(x[t * x_stride + i]));
      z[j] = acc;
    }
    const double top = fmax(z[0], z[1]), e0 = exp(z[0] - top), e1 = exp(z[1] - top);
    const acc_t<T> c0 = acc_t<T>(e0 / (e0 + e1)), c1 = acc_t<T>(e1 / (e0 + e1));
    c[2 * t] = from_acc<T>(c0);
    c[2 * t + 1] = from_acc<T>(c1);
    for (index_t i = 0; i < d; ++i)
      y[t * y_stride + i] = from_acc<T>(c0 * to_acc(a[t * d + i]) + c1 * to_acc(b[t * d + i]));
  }
};

// dz[t] = c ⊙ (dc − Σ_j c_j dc_j), dc_j = <dy[t], out_j[t]> in double; the two branches' output
// gradients c0·dy and c1·dy (per token).
template <class T>
struct ResidualMixBackward {
  const T* dy;
  index_t dy_stride;
  const T* a;
  const T* b;
  const T* c;
  T* dz;      // [T, 2]
  T* d_moe;   // [T, d]
  T* d_mlp;   // [T, d]
  index_t d;
  SMOE_HOST_DEVICE void operator()(index_t t) const {
    const T* g = dy + t * dy_stride;
    double dc0 = 0, dc1 = 0;
    for (index_t i = 0; i < d; ++i) {
      dc0 += double(to_acc(g[i])) * double(to_acc(a[t * d + i]));
      dc1 += double(to_acc(g[i])) * double(to_acc(b[t * d + i]));
    }
    const double c0 = double(to_acc(c[2 * t])), c1 = double(to_acc(c[2 * t + 1])), mean = c0 * dc0 + c1 * dc1;
    dz[2 * t] = from_acc<T>(acc_t<T>(c0 * (dc0 - mean)));
    dz[2 * t + 1] = from_acc<T>(acc_t<T>(c1 * (dc1 - mean)));
    for (index_t i = 0; i < d; ++i) {
      d_moe[t * d + i] = from_acc<T>(acc_t<T>(c0) * to_acc(g[i]));
      d_mlp[t * d + i] = from_acc<T>(acc_t<T>(c1) * to_acc(g[i]));
    }
  }
};

// dx[t, i] += dx_mlp[t, i] + dz[t, 0]·mix[0, i] + dz[t, 1]·mix[1, i].
template <class T>
struct ResidualInputGradient {
  const T* dx_mlp;
  const T* dz;
  const T* mix;
  T* dx;
  index_t dx_stride, d;
  SMOE_HOST_DEVICE void operator()(index_t idx) const {
    const index_t t = idx / d, i = idx % d;
    T& o = dx[t * dx_stride + i];
    o = from_acc<T>(to_acc(o) + (to_acc(dx_mlp[idx]) + to_acc(dz[2 * t]) * to_acc(mix[i]) +
                                 to_acc(dz[2 * t + 1]) * to_acc(mix[d + i])));
  }
};

}  // namespace cuda_kernels

template <class Layer, Activation Act>
  requires std::same_as<typename Layer::backend, cuda>
class ResidualMoE<Layer, Act> {
 public:
  using scalar_type = typename Layer::scalar_type;
  using T = scalar_type;
  using gate_type = typename Layer::gate_type;
  using backend = cuda;
  static constexpr const char* name = "ResidualMoE<cuda>";

  ResidualMoE(Layer moe, ResidualConfig c)
      : moe_(std::move(moe)),
        config_((c.validate(name), c)),
        mlp_(DenseMLPConfig{.d_model = moe_.d_model(), .hidden = c.hidden, .bias = c.bias}),
        mix_({2, moe_.d_model()}) {
    if (c.mix_bias) mix_bias_ = Parameter<T, cuda>({2});
    set_stream(moe_.stream());
  }

  index_t d_model() const { return moe_.d_model(); }
  index_t k() const { return moe_.k(); }
  Layer& moe() { return moe_; }
  const Layer& moe() const { return moe_; }
  auto& router() { return moe_.router(); }
  DenseMLP<T, Act, cuda>& residual() { return mlp_; }
  Parameter<T, cuda>& mix() { return mix_; }
  Parameter<T, cuda>& mix_bias() { return mix_bias_; }
  const ResidualConfig& config() const { return config_; }
  // (c0, c1) of the last forward, [T, 2].
  const Tensor<T, cuda>& coefficients() const { return c_; }

  cuda_stream stream() const { return moe_.stream(); }
  void set_stream(cuda_stream s) {
    moe_.set_stream(s);
    mlp_.set_stream(s);
    for (auto* p : {&mix_, &mix_bias_}) {
      p->value.set_stream(s);
      p->grad.set_stream(s);
    }
    for (auto* t : {&moe_y_, &mlp_y_, &c_, &dz_, &d_moe_, &d_mlp_, &dx_mlp_}) t->set_stream(s);
  }

  template <class F>
  void for_each_parameter(F&& f) {
    for_each_layer_parameter(moe_, f);
    mlp_.for_each_parameter(with_prefix("residual.", f));
    f(std::string_view("residual.mix"), mix_);
    if (config_.mix_bias) f(std::string_view("residual.mix_bias"), mix_bias_);
  }

  MoEDeviceOutput<gate_type> forward(ConstMatrixView<T, cuda> x, MatrixView<T, cuda> y, Mode mode = Mode::eval) {
    using namespace cuda_kernels;
    const index_t tokens = x.rows, d = d_model();
    expect_shape(name, "x", x, tokens, d);
    expect_shape(name, "y", y, tokens, d);
    moe_y_.resize({tokens, d});
    mlp_y_.resize({tokens, d});
    const auto out = moe_.forward(x, moe_y_.matrix(), mode);
    mlp_.forward(x, mlp_y_.matrix());
    x_ = x;
    c_.resize({tokens, 2});
    for_each_index(stream(), tokens,
                   ResidualMix<T>{x.data, x.stride, mix_.value.data(), config_.mix_bias ? mix_bias_.value.data() : nullptr,
                                  moe_y_.data(), mlp_y_.data(), c_.data(), y.data, y.stride, d});
    has_forward_ = true;
    return out;
  }

  void backward(ConstMatrixView<T, cuda> dy, MatrixView<T, cuda> dx) {
    using namespace cuda_kernels;
    if (!has_forward_) fail(name, ": backward called before forward");
    const index_t tokens = x_.rows, d = d_model();
    expect_shape(name, "dy", dy, tokens, d);
    expect_shape(name, "dx", dx, tokens, d);
    dz_.resize({tokens, 2});
    d_moe_.resize({tokens, d});
    d_mlp_.resize({tokens, d});
    dx_mlp_.resize({tokens, d});
    for_each_index(stream(), tokens,
                   ResidualMixBackward<T>{dy.data, dy.stride, moe_y_.data(), mlp_y_.data(), c_.data(), dz_.data(),
                                          d_moe_.data(), d_mlp_.data(), d});
    // dmix[j] += Σ_t dz[t, j]·x[t]; dmix_bias[j] += Σ_t dz[t, j] (tokens in order).
    for_each_index(stream(), 2 * d,
                   GroupedOuterSum<T, T, T>{dz_.data(), 2, nullptr, x_.data, x_.stride, nullptr, tokens, mix_.grad.data(), 2, d});
    if (config_.mix_bias)
      for_each_index(stream(), 2,
                     GroupedOuterSum<T, T, T>{nullptr, 0, nullptr, dz_.data(), 2, nullptr, tokens, mix_bias_.grad.data(), 1, 2});
    mlp_.backward(std::as_const(d_mlp_).matrix(), dx_mlp_.matrix());
    moe_.backward(std::as_const(d_moe_).matrix(), dx);
    for_each_index(stream(), tokens * d,
                   ResidualInputGradient<T>{dx_mlp_.data(), dz_.data(), mix_.value.data(), dx.data, dx.stride, d});
  }

  // The inner layer's losses and routing statistics of the last forward (each waits for the stream).
  MoEOutput<gate_type> read_losses() const { return moe_.read_losses(); }
  RoutingStats routing_stats() const { return moe_.routing_stats(); }

  // Accounting as the CPU composite's.
  index_t total_parameters() const { return smoe::total_parameters(moe_) + residual_parameters(); }
  double active_parameters_per_token() const {
    return smoe::active_parameters_per_token(moe_) + double(residual_parameters());
  }
  double flops_per_token() const {
    return smoe::flops_per_token(moe_) + expert_flops<Act>(d_model(), config_.hidden) + 4.0 * double(d_model());
  }

 private:
  index_t residual_parameters() const {
    return expert_parameters<Act>(d_model(), config_.hidden, config_.bias) + 2 * d_model() + (config_.mix_bias ? 2 : 0);
  }

  Layer moe_;
  ResidualConfig config_;
  DenseMLP<T, Act, cuda> mlp_;
  Parameter<T, cuda> mix_, mix_bias_;
  ConstMatrixView<T, cuda> x_;  // the forward input (not copied)
  bool has_forward_ = false;
  Tensor<T, cuda> moe_y_, mlp_y_, c_;            // forward cache
  Tensor<T, cuda> dz_, d_moe_, d_mlp_, dx_mlp_;  // backward scratch
};

}  // namespace smoe
