#pragma once
// ExpertPool<T, Act, cuda>: experts/expert_pool.hpp's global pool of M MoE layers on the device,
// same parameters and names ("w1" [M, E, d, fan·G], "w2" [M, E, G, d], "b1" [M, E, fan·G],
// "b2" [M, E, d]) and accounting. Member m's experts are device pointers in the grouped GEMM's
// layout (cuda/grouped_ffn.cuh). The layers that combine the pool (cuda/samoe_experts.cuh) run on
// the pool's stream: their gradients all accumulate into the pool's.
#include <string_view>

#include "smoe/core/parameter.hpp"
#include "smoe/cuda/grouped_ffn.cuh"
#include "smoe/experts/expert_pool.hpp"

namespace smoe {

template <class T, Activation Act>
class ExpertPool<T, Act, cuda> {
  static_assert(UnitActivation<Act>, "ExpertPool<T, Act, cuda>: Act needs the per-unit `unit` and `unit_backward`");

 public:
  using scalar_type = T;
  using backend = cuda;
  using activation = Act;
  static constexpr const char* name = "ExpertPool<cuda>";
  static constexpr const char* parameter_prefix = "pool.";

  explicit ExpertPool(ExpertPoolConfig c, cuda_stream stream = {}) : config_((c.validate(name), c)) {
    w1_ = Parameter<T, cuda>({c.members, c.experts, c.d_model, Act::fan * c.hidden});
    w2_ = Parameter<T, cuda>({c.members, c.experts, c.hidden, c.d_model});
    if (c.bias) {
      b1_ = Parameter<T, cuda>({c.members, c.experts, Act::fan * c.hidden});
      b2_ = Parameter<T, cuda>({c.members, c.experts, c.d_model});
    }
    set_stream(stream);
  }

  index_t members() const { return config_.members; }
  index_t experts() const { return config_.experts; }
  index_t d_model() const { return config_.d_model; }
  index_t hidden() const { return config_.hidden; }
  bool has_bias() const { return config_.bias; }
  const ExpertPoolConfig& config() const { return config_; }
  Parameter<T, cuda>& w1() { return w1_; }
  Parameter<T, cuda>& w2() { return w2_; }
  Parameter<T, cuda>& b1() { return b1_; }
  Parameter<T, cuda>& b2() { return b2_; }

  cuda_stream stream() const { return stream_; }
  void set_stream(cuda_stream s) {
    stream_ = s;
    for (auto* p : {&w1_, &w2_, &b1_, &b2_}) {
      p->value.set_stream(s);
      p->grad.set_stream(s);
    }
  }
  // GemmPath::portable runs the portable GEMMs on a GPU too (the tensor-core kernels' reference).
  void set_gemm_path(cuda_kernels::GemmPath path) { gemm_path_ = path; }
  cuda_kernels::GemmPath gemm_path() const { return gemm_path_; }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("w1"), w1_);
    f(std::string_view("w2"), w2_);
    if (config_.bias) {
      f(std::string_view("b1"), b1_);
      f(std::string_view("b2"), b2_);
    }
  }

  index_t member_w1_size() const { return experts() * d_model() * Act::fan * hidden(); }
  index_t member_w2_size() const { return experts() * hidden() * d_model(); }
  index_t member_b1_size() const { return has_bias() ? experts() * Act::fan * hidden() : 0; }
  index_t member_b2_size() const { return has_bias() ? experts() * d_model() : 0; }

  cuda_kernels::ExpertWeights<T> member_weights(index_t m) const {
    check_member(m);
    return {w1_.value.data() + m * member_w1_size(), w2_.value.data() + m * member_w2_size(),
            has_bias() ? b1_.value.data() + m * member_b1_size() : nullptr,
            has_bias() ? b2_.value.data() + m * member_b2_size() : nullptr};
  }
  cuda_kernels::ExpertGradients<T> member_gradients(index_t m) {
    check_member(m);
    return {w1_.grad.data() + m * member_w1_size(), w2_.grad.data() + m * member_w2_size(),
            has_bias() ? b1_.grad.data() + m * member_b1_size() : nullptr,
            has_bias() ? b2_.grad.data() + m * member_b2_size() : nullptr};
  }

  index_t parameters_per_expert() const { return expert_parameters<Act>(d_model(), hidden(), has_bias()); }
  double flops_per_expert() const { return expert_flops<Act>(d_model(), hidden()); }
  index_t total_parameters() const { return members() * experts() * parameters_per_expert(); }
  double active_parameters_per_token() const { return double(parameters_per_expert()); }
  double flops_per_token() const { return flops_per_expert(); }

 private:
  void check_member(index_t m) const {
    if (m < 0 || m >= members()) fail(name, ": member must be in [0, ", members(), "), got ", m);
  }

  ExpertPoolConfig config_;
  cuda_stream stream_{};
  Parameter<T, cuda> w1_, w2_, b1_, b2_;
  cuda_kernels::GemmPath gemm_path_ = cuda_kernels::GemmPath::fastest;
};

}  // namespace smoe
