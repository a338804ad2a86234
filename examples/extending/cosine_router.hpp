#pragma once
// A complete router: X-MoE's cosine router (Chi et al., "On the Representation Collapse of Sparse
// Mixture of Experts", NeurIPS 2022) with a learned scale,
//   h = x Pᵀ (P "proj" [r, d]: routing in a small space),  s_te = scale · cos(h_t, e_e)
//   (expert embeddings "embed" [E, r], "scale" [1], 1/τ in the paper),
//   ids = top-k of s, gates = softmax(s) at the ids (the library's SoftmaxGate).
// It reuses the library's pieces: LinearScores (the projection and its gradients), select_topk
// (selection with smoe's tie rule) and SoftmaxGate (the gates and their gradients).
#include <cmath>
#include <cstdint>
#include <string_view>
#include <utility>
#include <vector>

#include <smoe/core/parameter.hpp>
#include <smoe/core/rng.hpp>
#include <smoe/routing/linear_scores.hpp>
#include <smoe/routing/routing.hpp>
#include <smoe/routing/softmax_topk.hpp>
#include <smoe/routing/topk_select.hpp>

namespace extending {

// example-begin router
template <class T>
class CosineRouter {
 public:
  using scalar_type = T;
  static constexpr const char* name = "CosineRouter";

  CosineRouter(smoe::index_t d_model, smoe::index_t experts, smoe::index_t k, smoe::index_t dim, std::uint64_t seed)
      : d_(d_model), E_(experts), K_(k), proj_({dim, d_model}), embed_({experts, dim}), scale_({1}) {
    for (smoe::index_t i = 0; i < proj_.value.size(); ++i) proj_.value[i] = T(smoe::standard_normal(seed, i, 0));
    for (smoe::index_t i = 0; i < embed_.value.size(); ++i) embed_.value[i] = T(smoe::standard_normal(seed, i, 1));
    scale_.value[0] = T(10);  // X-MoE's τ = 0.1 (learned)
  }

  smoe::index_t experts() const { return E_; }
  smoe::index_t k() const { return K_; }
  smoe::index_t d_model() const { return d_; }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("proj"), proj_);
    f(std::string_view("embed"), embed_);
    f(std::string_view("scale"), scale_);
  }

  void forward(smoe::ConstMatrixView<T> x, smoe::Routing<T>& out, smoe::Mode) {
    smoe::expect_shape(name, "x", x, x.rows, d_);
    const smoe::index_t n = x.rows, r = proj_.value.dim(0);
    h_.resize({n, r});
    projection_.prepare(std::as_const(proj_.value).matrix());
    projection_.forward_block(x, h_.matrix());  // h = x Pᵀ
    hn_ = normalize_rows(h_, h_norm_);
    en_ = normalize_rows(embed_.value, e_norm_);
    out.logits.resize({n, E_});
    out.experts.resize({n, K_});
    out.gates.resize({n, K_});
    for (smoe::index_t t = 0; t < n; ++t) {
      T* s = out.logits.data() + t * E_;
      for (smoe::index_t e = 0; e < E_; ++e) s[e] = scale_.value[0] * dot(hn_.data() + t * r, en_.data() + e * r, r);
      std::int32_t* ids = out.experts.data() + t * K_;
      smoe::select_topk(s, E_, K_, ids);
      gate_.forward(s, E_, ids, K_, out.gates.data() + t * K_);
    }
  }

  void backward(smoe::ConstMatrixView<T> x, const smoe::Routing<T>& out, smoe::ConstMatrixView<T> d_gates,
                smoe::MatrixView<T> d_logits, smoe::MatrixView<T> dx) {
    const smoe::index_t n = x.rows, r = proj_.value.dim(0);
    smoe::Tensor<T> d_hn({n, r}), d_en({E_, r}), d_h({n, r});
    d_hn.zero();
    d_en.zero();
    d_h.zero();
    for (smoe::index_t t = 0; t < n; ++t) {
      // d_logits holds the losses' gradient; the gate policy adds the gates' (ids −1 skipped).
      gate_.backward(out.logits.data() + t * E_, E_, out.experts.data() + t * K_, K_, out.gates.data() + t * K_,
                     d_gates.row(t), d_logits.row(t));
      for (smoe::index_t e = 0; e < E_; ++e) {  // s = scale · <hn_t, en_e>
        const T ds = d_logits(t, e), cos = dot(hn_.data() + t * r, en_.data() + e * r, r);
        scale_.grad[0] += ds * cos;
        for (smoe::index_t i = 0; i < r; ++i) {
          d_hn[t * r + i] += scale_.value[0] * ds * en_[e * r + i];
          d_en[e * r + i] += scale_.value[0] * ds * hn_[t * r + i];
        }
      }
    }
    normalize_rows_backward(hn_, h_norm_, d_hn, d_h.data());
    normalize_rows_backward(en_, e_norm_, d_en, embed_.grad.data());
    // P.grad += d_hᵀ x and dx += d_h P: the projection's backward from the library.
    smoe::LinearScores<T>::backward(x, std::as_const(d_h).matrix(), std::as_const(proj_.value).matrix(),
                                    proj_.grad.matrix(), dx);
  }

 private:
  static T dot(const T* a, const T* b, smoe::index_t n) {
    T s = 0;
    for (smoe::index_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
  }
  // v / |v| per row, keeping |v|.
  static smoe::Tensor<T> normalize_rows(const smoe::Tensor<T>& v, std::vector<T>& norm) {
    const smoe::index_t rows = v.dim(0), n = v.dim(1);
    smoe::Tensor<T> out({rows, n});
    norm.resize(static_cast<std::size_t>(rows));
    for (smoe::index_t i = 0; i < rows; ++i) {
      norm[i] = std::sqrt(dot(v.data() + i * n, v.data() + i * n, n));
      for (smoe::index_t c = 0; c < n; ++c) out[i * n + c] = v[i * n + c] / norm[i];
    }
    return out;
  }
  // dv += (d_vn − vn <vn, d_vn>) / |v| per row: the gradient through v / |v|.
  static void normalize_rows_backward(const smoe::Tensor<T>& vn, const std::vector<T>& norm,
                                      const smoe::Tensor<T>& d_vn, T* dv) {
    const smoe::index_t rows = vn.dim(0), n = vn.dim(1);
    for (smoe::index_t i = 0; i < rows; ++i) {
      const T radial = dot(vn.data() + i * n, d_vn.data() + i * n, n);
      for (smoe::index_t c = 0; c < n; ++c) dv[i * n + c] += (d_vn[i * n + c] - vn[i * n + c] * radial) / norm[i];
    }
  }

  smoe::index_t d_, E_, K_;
  smoe::Parameter<T> proj_, embed_, scale_;
  smoe::SoftmaxGate gate_{};
  smoe::LinearScores<T> projection_;
  smoe::Tensor<T> h_, hn_, en_;   // forward caches: h, h/|h|, embed/|embed|
  std::vector<T> h_norm_, e_norm_;
};
// example-end router

}  // namespace extending
