#pragma once
// ValueExperts: a pool of E value rows "values" [E, d], the memory of a product-key memory layer
// (Lample et al. 2019; sigma-MoE, Csordás et al. 2023, Sec. 3.2). Expert e outputs its row,
// whatever the token:
//   ys[s] = values[e(s)]        backward: values.grad[e] += Σ_{s of e} dys[s],  dx = 0 (written)
// With a ProductKeyRouter, MoE<> computes y = Σ gate · values[id] through the usual dispatch;
// with the WeightedSum combiner it uses forward_weighted / backward_weighted, which read the
// value rows where they are instead of copying them per slot (experts/experts.hpp). Forward and
// backward are O(A·d + E).
#include <algorithm>
#include <string_view>

#include "smoe/core/parameter.hpp"
#include "smoe/cpu/dot.hpp"
#include "smoe/cpu/parallel.hpp"
#include "smoe/experts/experts.hpp"

namespace smoe {

struct ValueExpertsConfig {
  index_t d_model = 0;
  index_t values = 0;  // E, one row per value (N² for a product-key router with N sub-keys)

  void validate(const char* context) const {
    if (d_model < 1) fail(context, ": d_model must be >= 1, got ", d_model);
    if (values < 1) fail(context, ": values must be >= 1, got ", values);
  }
};

// ValueExperts<T, cuda> is the CUDA backend's (smoe/cuda/value_experts.cuh).
template <class T, class Backend = cpu>
class ValueExperts {
 public:
  using scalar_type = T;
  using backend = cpu;
  static constexpr const char* name = "ValueExperts";

  explicit ValueExperts(ValueExpertsConfig c) : config_((c.validate(name), c)), values_({c.values, c.d_model}) {}

  index_t experts() const { return config_.values; }
  index_t d_model() const { return config_.d_model; }
  const ValueExpertsConfig& config() const { return config_; }
  Parameter<T>& values() { return values_; }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("values"), values_);
  }

  // Accounting (layers/accounting.hpp; "per token" is per routed assignment): E·d values, of
  // which one row of d is read and scaled into the output (2·d FLOPs, one multiply-add each).
  index_t total_parameters() const { return values_.value.size(); }
  double active_parameters_per_token() const { return double(d_model()); }
  double flops_per_token() const { return 2.0 * double(d_model()); }

  void forward(ConstMatrixView<T> x, const Dispatch<T>& dispatch, MatrixView<T> ys) {
    check(x, dispatch);
    const index_t d = d_model();
    expect_shape(name, "ys", ys, dispatch.assignments(), d);
    cpu_kernels::parallel_for_blocks(experts(), expert_block, [&](index_t first, index_t last) {
      for (index_t e = first; e < last; ++e)
        for (index_t s = dispatch.expert_begin(e); s < dispatch.expert_end(e); ++s)
          std::copy_n(values_.value.data() + e * d, d, ys.row(s));
    });
  }

  // Every expert sums its slots in slot order: deterministic for any thread count.
  void backward(ConstMatrixView<T> x, const Dispatch<T>& dispatch, ConstMatrixView<T> dys, MatrixView<T> dx) {
    check(x, dispatch);
    const index_t d = d_model();
    expect_shape(name, "dys", dys, dispatch.assignments(), d);
    expect_shape(name, "dx", dx, x.rows, d);
    cpu_kernels::parallel_for_blocks(experts(), expert_block, [&](index_t first, index_t last) {
      for (index_t e = first; e < last; ++e) {
        T* g = values_.grad.data() + e * d;
        for (index_t s = dispatch.expert_begin(e); s < dispatch.expert_end(e); ++s) {
          const T* in = dys.row(s);
          for (index_t c = 0; c < d; ++c) g[c] += in[c];
        }
      }
    });
    for (index_t t = 0; t < dx.rows; ++t) std::fill_n(dx.row(t), d, T(0));  // the output does not depend on x
  }

  // y[t] = Σ_k gate · values[e(t, k)], per token: no per-slot copies of the rows.
  void forward_weighted(ConstMatrixView<T> x, const Dispatch<T>& dispatch, MatrixView<T> y) {
    check(x, dispatch);
    const index_t d = d_model(), K = dispatch.k;
    expect_shape(name, "y", y, dispatch.tokens, d);
    cpu_kernels::parallel_for_blocks(dispatch.tokens, token_block, [&](index_t first, index_t last) {
      for (index_t t = first; t < last; ++t) {
        T* out = y.row(t);
        std::fill_n(out, d, T(0));
        for (index_t j = 0; j < K; ++j)
          if (const index_t s = dispatch.slot(t, j); s >= 0) {
            const T g = dispatch.slot_gate[static_cast<std::size_t>(s)];
            const T* v = values_.value.data() + dispatch.expert_of_slot(s) * d;
            for (index_t c = 0; c < d; ++c) out[c] += g * v[c];
          }
      }
    });
  }

  // d_gates(t, k) = <dy[t], values[e(t, k)]>;  values.grad[e] += Σ_{s of e} gate_s · dy[token(s)],
  // each expert summing its slots in slot order;  dx = 0.
  void backward_weighted(ConstMatrixView<T> x, const Dispatch<T>& dispatch, ConstMatrixView<T> dy,
                         MatrixView<T> d_gates, MatrixView<T> dx) {
    check(x, dispatch);
    const index_t d = d_model(), K = dispatch.k;
    expect_shape(name, "dy", dy, dispatch.tokens, d);
    expect_shape(name, "d_gates", d_gates, dispatch.tokens, K);
    expect_shape(name, "dx", dx, x.rows, d);
    cpu_kernels::parallel_for_blocks(dispatch.tokens, token_block, [&](index_t first, index_t last) {
      for (index_t t = first; t < last; ++t)
        for (index_t j = 0; j < K; ++j) {
          const index_t s = dispatch.slot(t, j);
          d_gates(t, j) =
              s < 0 ? T(0) : cpu_kernels::dot(dy.row(t), values_.value.data() + dispatch.expert_of_slot(s) * d, d);
        }
    });
    cpu_kernels::parallel_for_blocks(experts(), expert_block, [&](index_t first, index_t last) {
      for (index_t e = first; e < last; ++e) {
        T* g = values_.grad.data() + e * d;
        for (index_t s = dispatch.expert_begin(e); s < dispatch.expert_end(e); ++s) {
          const T gate = dispatch.slot_gate[static_cast<std::size_t>(s)];
          const T* in = dy.row(dispatch.slot_token[static_cast<std::size_t>(s)]);
          for (index_t c = 0; c < d; ++c) g[c] += gate * in[c];
        }
      }
    });
    for (index_t t = 0; t < dx.rows; ++t) std::fill_n(dx.row(t), d, T(0));
  }

 private:
  static constexpr index_t expert_block = 256, token_block = 64;

  void check(ConstMatrixView<T> x, const Dispatch<T>& dispatch) const {
    expect_shape(name, "x", x, dispatch.tokens, d_model());
    expect_equal(name, "dispatch.experts", experts(), dispatch.experts);
  }

  ValueExpertsConfig config_;
  Parameter<T> values_;
};

}  // namespace smoe
