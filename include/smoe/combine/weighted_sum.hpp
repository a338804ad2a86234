#pragma once
// WeightedSum combiner: y[t] = Σ_k gate[t, k] · ys[slot(t, k)], empty assignments skipped.
// Run per token (a gather, not a scatter-add), so it is race-free and deterministic.
//   backward: dys[s] = gate[s] · dy[token(s)],  d_gates[t, k] = <dy[t], ys[slot(t, k)]>.
#include <concepts>
#include <type_traits>

#include "smoe/core/dispatch.hpp"
#include "smoe/cpu/dot.hpp"
#include "smoe/cpu/parallel.hpp"

namespace smoe {

template <class C>
concept Combiner = requires(C& c, const Dispatch<gate_type_of_t<C>, backend_of_t<C>>& dispatch,
                            ConstMatrixView<typename C::scalar_type, backend_of_t<C>> in,
                            MatrixView<typename C::scalar_type, backend_of_t<C>> out,
                            MatrixView<gate_type_of_t<C>, backend_of_t<C>> d_gates) {
  c.forward(dispatch, in, out);
  c.backward(dispatch, in, in, out, d_gates);
};

// check_combiner<C>(): Combiner<C> with one static_assert per requirement (a first error line that
// names the concept and the member; MoE<> calls it).
template <class C>
constexpr bool check_combiner() {
  static_assert(requires { typename C::scalar_type; }, "smoe::Combiner: missing member type `scalar_type` (float or double)");
  if constexpr (requires { typename C::scalar_type; }) {
    using T = typename C::scalar_type;
    using G = gate_type_of_t<C>;
    using S = backend_of_t<C>;
    static_assert(requires(C& c, const Dispatch<G, S>& dispatch, ConstMatrixView<T, S> ys, MatrixView<T, S> y) {
                    c.forward(dispatch, ys, y);
                  },
                  "smoe::Combiner: missing or ill-typed member "
                  "`void forward(const Dispatch<T>& dispatch, ConstMatrixView<T> ys, MatrixView<T> y)`");
    static_assert(requires(C& c, const Dispatch<G, S>& dispatch, ConstMatrixView<T, S> ys, ConstMatrixView<T, S> dy,
                           MatrixView<T, S> dys, MatrixView<G, S> d_gates) { c.backward(dispatch, ys, dy, dys, d_gates); },
                  "smoe::Combiner: missing or ill-typed member `void backward(const Dispatch<T>& dispatch, "
                  "ConstMatrixView<T> ys, ConstMatrixView<T> dy, MatrixView<T> dys, MatrixView<T> d_gates)`");
  }
  return Combiner<C>;
}

// WeightedSum<T, cuda> is the CUDA backend's (smoe/cuda/weighted_sum.cuh).
template <class T, class Backend = cpu>
struct WeightedSum {
  static_assert(std::is_same_v<Backend, cpu>, "WeightedSum<T, cuda> needs <smoe/cuda/weighted_sum.cuh>");
  using scalar_type = T;
  using backend = cpu;
  static constexpr const char* name = "WeightedSum";

  void forward(const Dispatch<T>& dispatch, ConstMatrixView<T> ys, MatrixView<T> y) const {
    const index_t d = y.cols, K = dispatch.k;
    expect_shape(name, "ys", ys, dispatch.assignments(), d);
    expect_shape(name, "y", y, dispatch.tokens, d);
    cpu_kernels::parallel_for_blocks(dispatch.tokens, token_block, [&](index_t first, index_t last) {
      for (index_t t = first; t < last; ++t) {
        T* out = y.row(t);
        std::fill_n(out, d, T(0));
        for (index_t j = 0; j < K; ++j)
          if (const index_t s = dispatch.slot(t, j); s >= 0) {
            const T g = dispatch.slot_gate[s];
            const T* in = ys.row(s);
            for (index_t c = 0; c < d; ++c) out[c] += g * in[c];
          }
      }
    });
  }

  void backward(const Dispatch<T>& dispatch, ConstMatrixView<T> ys, ConstMatrixView<T> dy, MatrixView<T> dys,
                MatrixView<T> d_gates) const {
    const index_t d = dy.cols, K = dispatch.k;
    expect_shape(name, "dy", dy, dispatch.tokens, ys.cols);
    expect_shape(name, "dys", dys, dispatch.assignments(), d);
    expect_shape(name, "d_gates", d_gates, dispatch.tokens, K);
    cpu_kernels::parallel_for_blocks(dispatch.tokens, token_block, [&](index_t first, index_t last) {
      for (index_t t = first; t < last; ++t) {
        const T* g_out = dy.row(t);
        for (index_t j = 0; j < K; ++j) {
          const index_t s = dispatch.slot(t, j);
          if (s < 0) {
            d_gates(t, j) = T(0);
            continue;
          }
          // The slot's ys row is read before its dys row is written, so dys may alias ys.
          d_gates(t, j) = cpu_kernels::dot(g_out, ys.row(s), d);
          const T g = dispatch.slot_gate[s];
          T* out = dys.row(s);
          for (index_t c = 0; c < d; ++c) out[c] = g * g_out[c];
        }
      }
    });
  }

 private:
  static constexpr index_t token_block = 32;
};

}  // namespace smoe
