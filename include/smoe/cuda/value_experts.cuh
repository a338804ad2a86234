#pragma once
// ValueExperts<T, cuda>: experts/value_experts.hpp on the device, the value rows "values" [E, d] of
// a product-key memory (E = N² for a ProductKeyRouter), dtype T (fp32, bf16, fp16, fp64).
//   forward:  ys[s] = values[e(s)]                          (one element per thread)
//   backward: values.grad[e] += Σ_{s of e} dys[s]          (per element, its expert's slots in slot
//             order: no atomics);  dx = 0 (written: the output does not depend on x)
// The combiner then scales each row by its gate; both are O(A·d + E·d).
#include <string_view>

#include "smoe/core/parameter.hpp"
#include "smoe/cuda/device_tensor.cuh"
#include "smoe/cuda/dispatch.cuh"
#include "smoe/experts/value_experts.hpp"

namespace smoe {

namespace cuda_kernels {

template <class T>
struct CopyValueRows {
  const T* values;
  const std::int32_t* slot_expert;  // E on padding slots, which stay as they are
  index_t experts, d;
  T* ys;
  index_t ys_stride;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    const index_t s = i / d, c = i % d, e = slot_expert[s];
    if (e < experts) ys[s * ys_stride + c] = values[e * d + c];
  }
};

template <class T>
struct SumValueGradients {
  const std::int32_t* offsets;
  const T* dys;
  index_t dys_stride, d;
  T* grad;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    const index_t e = i / d, c = i % d;
    acc_t<T> sum = to_acc(grad[i]);
    for (index_t s = offsets[e]; s < offsets[e + 1]; ++s) sum += to_acc(dys[s * dys_stride + c]);
    grad[i] = from_acc<T>(sum);
  }
};

template <class T>
struct ZeroRows {
  T* out;
  index_t stride, d;
  SMOE_HOST_DEVICE void operator()(index_t i) const { out[i / d * stride + i % d] = from_acc<T>(0); }
};

}  // namespace cuda_kernels

template <class T>
class ValueExperts<T, cuda> {
 public:
  using scalar_type = T;
  using gate_type = acc_t<T>;
  using backend = cuda;
  static constexpr const char* name = "ValueExperts<cuda>";

  explicit ValueExperts(ValueExpertsConfig c, cuda_stream stream = {}) : config_((c.validate(name), c)) {
    values_ = Parameter<T, cuda>({c.values, c.d_model});
    set_stream(stream);
  }

  index_t experts() const { return config_.values; }
  index_t d_model() const { return config_.d_model; }
  const ValueExpertsConfig& config() const { return config_; }
  Parameter<T, cuda>& values() { return values_; }
  cuda_stream stream() const { return stream_; }
  void set_stream(cuda_stream s) {
    stream_ = s;
    values_.value.set_stream(s);
    values_.grad.set_stream(s);
  }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("values"), values_);
  }

  // Accounting as the CPU's.
  index_t total_parameters() const { return values_.value.size(); }
  double active_parameters_per_token() const { return double(d_model()); }
  double flops_per_token() const { return 2.0 * double(d_model()); }

  // ys: [dispatch.slots(), d]; rows past the assignment count are left as they are.
  void forward(ConstMatrixView<T, cuda> x, const Dispatch<gate_type, cuda>& dispatch, MatrixView<T, cuda> ys) {
    check(x, dispatch);
    const index_t d = d_model();
    expect_shape(name, "ys", ys, dispatch.slots(), d);
    cuda_kernels::for_each_index(stream_, dispatch.slots() * d,
                                 cuda_kernels::CopyValueRows<T>{values_.value.data(), dispatch.slot_expert.data(),
                                                                experts(), d, ys.data, ys.stride});
  }

  void backward(ConstMatrixView<T, cuda> x, const Dispatch<gate_type, cuda>& dispatch, ConstMatrixView<T, cuda> dys,
                MatrixView<T, cuda> dx) {
    check(x, dispatch);
    const index_t d = d_model();
    expect_shape(name, "dys", dys, dispatch.slots(), d);
    expect_shape(name, "dx", dx, x.rows, d);
    cuda_kernels::for_each_index(stream_, experts() * d,
                                 cuda_kernels::SumValueGradients<T>{dispatch.offsets.data(), dys.data, dys.stride, d,
                                                                    values_.grad.data()});
    cuda_kernels::for_each_index(stream_, dx.rows * d, cuda_kernels::ZeroRows<T>{dx.data, dx.stride, d});
  }

 private:
  void check(ConstMatrixView<T, cuda> x, const Dispatch<gate_type, cuda>& dispatch) const {
    expect_shape(name, "x", x, dispatch.tokens, d_model());
    expect_equal(name, "dispatch.experts", experts(), dispatch.experts);
  }

  ValueExpertsConfig config_;
  cuda_stream stream_{};
  Parameter<T, cuda> values_;
};

}  // namespace smoe
