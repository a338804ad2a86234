#pragma once
// Initializations, all reproducible from a seed through the counter-based RNG.
//
// sigma-MoE (Csordás et al. 2023, Sec. 5 "σ-MoE initialization"): the dense pre-LN init, ignoring
// the expert split:  W1 std = scale·d^-1/2,  W2 std = scale·(E·G)^-1/2 (d_ff = E·G, not G),
// router W std = scale·d^-1/2 with every row rescaled to the same norm and the whole matrix then
// rescaled back to that std (a token's score depends only on its angle to the row). Biases 0.
// `scale` is 1 for post-LN; the paper's pre-LN models use sqrt(2 / n_layers).
#include <cmath>
#include <cstdint>

#include "smoe/core/parameter.hpp"
#include "smoe/core/rng.hpp"

namespace smoe {

struct InitOptions {
  double scale = 1.0;
  std::uint64_t seed = 0;
};

// Fills t with N(0, std²); `stream` separates tensors initialized from the same seed.
template <class T>
void fill_normal(Tensor<T>& t, double std, std::uint64_t seed, std::uint64_t stream) {
  for (index_t i = 0; i < t.size(); ++i) t[i] = T(std * standard_normal(seed, static_cast<std::uint64_t>(i), stream));
}

// Rescales every row of m to unit norm, then the whole matrix so its element std is unchanged.
template <class T>
void renormalize_rows_keep_std(MatrixView<T> m) {
  auto element_std = [&] {
    double sum = 0, sq = 0;
    const double n = double(m.rows * m.cols);
    for (index_t r = 0; r < m.rows; ++r)
      for (index_t c = 0; c < m.cols; ++c) sum += m(r, c), sq += double(m(r, c)) * m(r, c);
    return std::sqrt(std::max(0.0, sq / n - (sum / n) * (sum / n)));
  };
  const double before = element_std();
  for (index_t r = 0; r < m.rows; ++r) {
    double norm = 0;
    for (index_t c = 0; c < m.cols; ++c) norm += double(m(r, c)) * m(r, c);
    norm = std::sqrt(norm);
    if (norm > 0)
      for (index_t c = 0; c < m.cols; ++c) m(r, c) = T(m(r, c) / norm);
  }
  const double after = element_std();
  if (after > 0)
    for (index_t r = 0; r < m.rows; ++r)
      for (index_t c = 0; c < m.cols; ++c) m(r, c) = T(m(r, c) * (before / after));
}

// sigma-MoE init of a layer whose router has weight() [E, d] and whose experts have w1/w2.
template <class Layer>
void sigma_moe_init(Layer& layer, InitOptions o = {}) {
  auto& router = layer.router();
  auto& experts = layer.experts();
  const double d = double(experts.d_model()), dff = double(experts.experts() * experts.hidden());
  fill_normal(router.weight().value, o.scale / std::sqrt(d), o.seed, 0);
  renormalize_rows_keep_std(router.weight().value.matrix());
  fill_normal(experts.w1().value, o.scale / std::sqrt(d), o.seed, 1);
  fill_normal(experts.w2().value, o.scale / std::sqrt(dff), o.seed, 2);
  if (experts.has_bias()) {
    experts.b1().value.zero();
    experts.b2().value.zero();
  }
}

// The matching dense init: W1 std = scale·d^-1/2, W2 std = scale·d_ff^-1/2, biases 0.
template <class MLP>
void dense_init(MLP& mlp, InitOptions o = {}) {
  fill_normal(mlp.w1().value, o.scale / std::sqrt(double(mlp.d_model())), o.seed, 1);
  fill_normal(mlp.w2().value, o.scale / std::sqrt(double(mlp.hidden())), o.seed, 2);
  if (mlp.config().bias) {
    mlp.b1().value.zero();
    mlp.b2().value.zero();
  }
}

}  // namespace smoe
