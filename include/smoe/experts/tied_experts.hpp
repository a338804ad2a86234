#pragma once
// TiedExperts: one set of E experts tied across every MoE layer (WideNet, Xue et al. 2022, "Go
// Wider Instead of Deeper": all MoE layers share their expert weights; routers stay per layer).
//
// The set itself is a FeedForwardExperts<T, Act> that the model owns and visits once, under
// "experts." ("experts.w1" [E, d, fan·G], "experts.w2" [E, G, d]). Each layer's TiedExperts holds
// a non-owning pointer to it plus its own forward cache: forward runs the grouped GEMM
// (cpu/grouped_ffn.hpp) on the set's weights, backward accumulates into the set's grads, so the
// gradient of the shared weights is the sum over the layers. for_each_parameter visits nothing:
// the layer owns no expert parameter.
//
// The pointer follows the object it was given: an owner that is moved or copied must bind() its
// layers to the new set (or keep the set at a stable address, as MoEStack does).
#include <string_view>
#include <type_traits>

#include "smoe/core/parameter.hpp"
#include "smoe/cpu/grouped_ffn.hpp"
#include "smoe/experts/experts.hpp"
#include "smoe/experts/expert_pool.hpp"
#include "smoe/experts/feed_forward_experts.hpp"

namespace smoe {

template <class T, Activation Act, class Backend = cpu>
class TiedExperts {
  static_assert(std::is_same_v<Backend, cpu>, "TiedExperts<T, Act, cuda> needs <smoe/cuda/tied_experts.cuh>");

 public:
  using scalar_type = T;
  using backend = cpu;
  using activation = Act;
  using set_type = FeedForwardExperts<T, Act>;
  static constexpr const char* name = "TiedExperts";

  explicit TiedExperts(set_type& set) : set_(&set) {}

  void bind(set_type& set) { set_ = &set; }
  set_type& set() const { return *set_; }

  index_t experts() const { return set_->experts(); }
  index_t d_model() const { return set_->d_model(); }
  index_t hidden() const { return set_->hidden(); }

  // The shared set is the owner's; this layer has no parameter of its own.
  template <class F>
  void for_each_parameter(F&&) {}

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
    set_type& s = *set_;
    const cpu_kernels::ExpertGradients<T> g{s.w1().grad.data(), s.w2().grad.data(),
                                            s.has_bias() ? s.b1().grad.data() : nullptr,
                                            s.has_bias() ? s.b2().grad.data() : nullptr};
    cpu_kernels::grouped_ffn_backward<T, Act>(x, dispatch, weights(), g, shape(), dys, dx, cache_);
  }

  // Accounting: the set's parameters belong to its owner (0 here); per token means per routed
  // assignment (the layer multiplies by K): one expert, P_e parameters and F_e FLOPs.
  index_t total_parameters() const { return 0; }
  double active_parameters_per_token() const { return double(expert_parameters<Act>(d_model(), hidden(), set_->has_bias())); }
  double flops_per_token() const { return expert_flops<Act>(d_model(), hidden()); }

 private:
  void check(ConstMatrixView<T> x, const Dispatch<T>& dispatch) const {
    expect_shape(name, "x", x, dispatch.tokens, d_model());
    expect_equal(name, "dispatch.experts", experts(), dispatch.experts);
  }
  cpu_kernels::ExpertWeights<T> weights() const {
    set_type& s = *set_;
    return {s.w1().value.data(), s.w2().value.data(), s.has_bias() ? s.b1().value.data() : nullptr,
            s.has_bias() ? s.b2().value.data() : nullptr};
  }
  cpu_kernels::GroupedFFNShape shape() const { return {d_model(), hidden()}; }

  set_type* set_;
  cpu_kernels::GroupedFFNCache<T> cache_;
};

}  // namespace smoe
