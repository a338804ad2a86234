#pragma once
// A combiner: the gate-weighted sum renormalized over the assignments that were computed,
//   y[t] = Σ_k g_tk ys[slot(t, k)] / Σ_k g_tk     (k over the token's non-empty slots),
// so a token whose assignment a capacity limit dropped keeps a full-weight output (gates > 0).
#include <vector>

#include <smoe/core/dispatch.hpp>

namespace extending {

// example-begin combiner
template <class T>
struct RenormalizedSum {
  using scalar_type = T;

  void forward(const smoe::Dispatch<T>& dispatch, smoe::ConstMatrixView<T> ys, smoe::MatrixView<T> y) const {
    for (smoe::index_t t = 0; t < dispatch.tokens; ++t) {
      const T z = gate_sum(dispatch, t);
      for (smoe::index_t c = 0; c < y.cols; ++c) y(t, c) = T(0);
      for (smoe::index_t j = 0; j < dispatch.k; ++j)
        if (const smoe::index_t s = dispatch.slot(t, j); s >= 0)
          for (smoe::index_t c = 0; c < y.cols; ++c) y(t, c) += dispatch.slot_gate[s] / z * ys(s, c);
    }
  }

  // WRITES dys[s] = g_s / z · dy[t] and d_gates(t, k) = (<dy[t], ys[s]> − <dy[t], y[t]>) / z
  // (0 for empty slots).
  void backward(const smoe::Dispatch<T>& dispatch, smoe::ConstMatrixView<T> ys, smoe::ConstMatrixView<T> dy,
                smoe::MatrixView<T> dys, smoe::MatrixView<T> d_gates) const {
    std::vector<T> dot(static_cast<std::size_t>(dispatch.k));
    for (smoe::index_t t = 0; t < dispatch.tokens; ++t) {
      const T z = gate_sum(dispatch, t);
      T dot_y = 0;  // <dy[t], y[t]> = Σ_k g_k <dy[t], ys[s_k]> / z
      for (smoe::index_t j = 0; j < dispatch.k; ++j) {
        const smoe::index_t s = dispatch.slot(t, j);
        dot[j] = 0;
        if (s < 0) continue;
        for (smoe::index_t c = 0; c < dy.cols; ++c) dot[j] += dy(t, c) * ys(s, c);
        dot_y += dispatch.slot_gate[s] * dot[j] / z;
      }
      for (smoe::index_t j = 0; j < dispatch.k; ++j) {
        const smoe::index_t s = dispatch.slot(t, j);
        d_gates(t, j) = s < 0 ? T(0) : (dot[j] - dot_y) / z;
        if (s >= 0)
          for (smoe::index_t c = 0; c < dy.cols; ++c) dys(s, c) = dispatch.slot_gate[s] / z * dy(t, c);
      }
    }
  }

 private:
  static T gate_sum(const smoe::Dispatch<T>& dispatch, smoe::index_t t) {
    T z = 0;
    for (smoe::index_t j = 0; j < dispatch.k; ++j)
      if (const smoe::index_t s = dispatch.slot(t, j); s >= 0) z += dispatch.slot_gate[s];
    return z;
  }
};
// example-end combiner

}  // namespace extending
