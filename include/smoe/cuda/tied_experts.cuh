#pragma once
// TiedExperts<T, Act, cuda>: experts/tied_experts.hpp on the device (WideNet: one set of E experts
// shared by every MoE layer). The set is a FeedForwardExperts<T, Act, cuda> the owner keeps and
// visits once; each layer's handle runs the grouped GEMM (cuda/grouped_ffn.cuh) on the set's weights
// with its own forward cache, and its backward accumulates into the set's gradients. It runs on the
// set's stream and GEMM path.
#include <string_view>

#include "smoe/cuda/feed_forward_experts.cuh"
#include "smoe/experts/tied_experts.hpp"

namespace smoe {

template <class T, Activation Act>
class TiedExperts<T, Act, cuda> {
 public:
  using scalar_type = T;
  using gate_type = acc_t<T>;
  using backend = cuda;
  using activation = Act;
  using set_type = FeedForwardExperts<T, Act, cuda>;
  static constexpr const char* name = "TiedExperts<cuda>";

  explicit TiedExperts(set_type& set) : set_(&set) { cache_.set_stream(set.stream()); }

  void bind(set_type& set) {
    set_ = &set;
    cache_.set_stream(set.stream());
  }
  set_type& set() const { return *set_; }

  index_t experts() const { return set_->experts(); }
  index_t d_model() const { return set_->d_model(); }
  index_t hidden() const { return set_->hidden(); }
  cuda_stream stream() const { return set_->stream(); }
  // The layer's stream is the set's: a layer on another stream would race with the other layers'
  // gradient accumulation into the shared set.
  void set_stream(cuda_stream s) {
    if (s != set_->stream()) fail(name, ": the stream of a tied layer is its set's; call set().set_stream instead");
  }

  template <class F>
  void for_each_parameter(F&&) {}  // the shared set is the owner's

  void forward(ConstMatrixView<T, cuda> x, const Dispatch<gate_type, cuda>& dispatch, MatrixView<T, cuda> ys) {
    check(x, dispatch);
    expect_shape(name, "ys", ys, dispatch.slots(), d_model());
    cuda_kernels::grouped_ffn_forward<T, Act>(stream(), x, dispatch, set_->weights(), shape(), ys, cache_,
                                              set_->gemm_path());
  }

  void backward(ConstMatrixView<T, cuda> x, const Dispatch<gate_type, cuda>& dispatch, ConstMatrixView<T, cuda> dys,
                MatrixView<T, cuda> dx) {
    check(x, dispatch);
    expect_shape(name, "dys", dys, dispatch.slots(), d_model());
    expect_shape(name, "dx", dx, x.rows, d_model());
    if (!cache_.holds(dispatch.slots())) fail(name, ": backward needs the forward of the same dispatch first");
    cuda_kernels::grouped_ffn_backward<T, Act>(stream(), x, dispatch, set_->weights(), set_->gradients(), shape(), dys,
                                               dx, cache_, set_->gemm_path());
  }

  // Accounting as the CPU's: the set belongs to its owner.
  index_t total_parameters() const { return 0; }
  double active_parameters_per_token() const { return double(expert_parameters<Act>(d_model(), hidden(), set_->has_bias())); }
  double flops_per_token() const { return expert_flops<Act>(d_model(), hidden()); }

 private:
  void check(ConstMatrixView<T, cuda> x, const Dispatch<gate_type, cuda>& dispatch) const {
    expect_shape(name, "x", x, dispatch.tokens, d_model());
    expect_equal(name, "dispatch.experts", experts(), dispatch.experts);
  }
  cuda_kernels::GroupedFFNShape shape() const { return {d_model(), hidden()}; }

  set_type* set_;
  cuda_kernels::GroupedFFNDeviceCache<T> cache_;
};

}  // namespace smoe
