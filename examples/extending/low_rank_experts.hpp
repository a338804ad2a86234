#pragma once
// Custom experts over the library's Dispatch, answering the accounting queries of an expert pool:
// E low-rank experts whose first layer is factored,
//   y = gelu((x A_e) B_e) W_e,   A "a" [E, d, r], B "b" [E, r, G], W "w2" [E, G, d],
// so one expert holds r·(d + G) + G·d parameters instead of 2·d·G.
#include <string_view>

#include <Eigen/Core>

#include <smoe/core/dispatch.hpp>
#include <smoe/core/parameter.hpp>
#include <smoe/experts/activation.hpp>

namespace extending {

// example-begin experts
template <class T>
class LowRankExperts {
 public:
  using scalar_type = T;
  static constexpr const char* name = "LowRankExperts";

  LowRankExperts(smoe::index_t d_model, smoe::index_t experts, smoe::index_t rank, smoe::index_t hidden)
      : d_(d_model), E_(experts), r_(rank), G_(hidden), a_({experts, d_model, rank}), b_({experts, rank, hidden}),
        w2_({experts, hidden, d_model}) {}

  smoe::index_t experts() const { return E_; }
  smoe::index_t d_model() const { return d_; }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("a"), a_);
    f(std::string_view("b"), b_);
    f(std::string_view("w2"), w2_);
  }

  // The pool queries (layers/accounting.hpp): per routed assignment, as every Experts type.
  smoe::index_t total_parameters() const { return E_ * per_expert(); }
  double active_parameters_per_token() const { return double(per_expert()); }
  double flops_per_token() const { return 2.0 * double(per_expert()); }

  // ys[s] = expert(s)(x[slot_token[s]]): the slots of expert e are [expert_begin(e), expert_end(e)).
  void forward(smoe::ConstMatrixView<T> x, const smoe::Dispatch<T>& dispatch, smoe::MatrixView<T> ys) {
    smoe::expect_shape(name, "ys", ys, dispatch.assignments(), d_);
    for (smoe::index_t e = 0; e < E_; ++e) {
      const Matrix xe = gather(x, dispatch, e);
      Matrix h = xe * map(a_.value, e, d_, r_) * map(b_.value, e, r_, G_);
      smoe::Gelu::forward(h.data(), h.data(), h.size());
      const Matrix y = h * map(w2_.value, e, G_, d_);
      for (smoe::index_t i = 0; i < y.rows(); ++i)
        for (smoe::index_t c = 0; c < d_; ++c) ys(dispatch.expert_begin(e) + i, c) = y(i, c);
    }
  }

  // Recomputes the expert's activations, ACCUMULATES the parameter gradients and WRITES
  // dx[t] = Σ over t's slots of ∂/∂x (0 for tokens no expert computed).
  void backward(smoe::ConstMatrixView<T> x, const smoe::Dispatch<T>& dispatch, smoe::ConstMatrixView<T> dys,
                smoe::MatrixView<T> dx) {
    smoe::expect_shape(name, "dx", dx, x.rows, d_);
    for (smoe::index_t t = 0; t < dx.rows; ++t)
      for (smoe::index_t c = 0; c < d_; ++c) dx(t, c) = T(0);
    for (smoe::index_t e = 0; e < E_; ++e) {
      const smoe::index_t first = dispatch.expert_begin(e), n = dispatch.count(e);
      const Matrix xe = gather(x, dispatch, e);
      const Matrix xa = xe * map(a_.value, e, d_, r_);
      const Matrix pre = xa * map(b_.value, e, r_, G_);
      Matrix h(n, G_), dpre(n, G_);
      smoe::Gelu::forward(pre.data(), h.data(), pre.size());
      Matrix dy(n, d_);
      for (smoe::index_t i = 0; i < n; ++i)
        for (smoe::index_t c = 0; c < d_; ++c) dy(i, c) = dys(first + i, c);
      map(w2_.grad, e, G_, d_) += h.transpose() * dy;
      const Matrix dh = dy * map(w2_.value, e, G_, d_).transpose();
      smoe::Gelu::backward(pre.data(), dh.data(), dpre.data(), pre.size());
      map(b_.grad, e, r_, G_) += xa.transpose() * dpre;
      const Matrix dxa = dpre * map(b_.value, e, r_, G_).transpose();
      map(a_.grad, e, d_, r_) += xe.transpose() * dxa;
      const Matrix dxe = dxa * map(a_.value, e, d_, r_).transpose();
      for (smoe::index_t i = 0; i < n; ++i)
        for (smoe::index_t c = 0; c < d_; ++c) dx(dispatch.slot_token[first + i], c) += dxe(i, c);
    }
  }

 private:
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  smoe::index_t per_expert() const { return r_ * (d_ + G_) + G_ * d_; }
  // Expert e's [rows, cols] block of a parameter tensor [E, rows, cols].
  static Eigen::Map<Matrix> map(smoe::Tensor<T>& p, smoe::index_t e, smoe::index_t rows, smoe::index_t cols) {
    return Eigen::Map<Matrix>(p.data() + e * rows * cols, rows, cols);
  }
  // The rows of x routed to expert e, in slot order.
  Matrix gather(smoe::ConstMatrixView<T> x, const smoe::Dispatch<T>& dispatch, smoe::index_t e) const {
    Matrix xe(dispatch.count(e), d_);
    for (smoe::index_t i = 0; i < xe.rows(); ++i)
      for (smoe::index_t c = 0; c < d_; ++c) xe(i, c) = x(dispatch.slot_token[dispatch.expert_begin(e) + i], c);
    return xe;
  }

  smoe::index_t d_, E_, r_, G_;
  smoe::Parameter<T> a_, b_, w2_;
};
// example-end experts

}  // namespace extending
