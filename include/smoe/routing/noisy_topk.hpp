#pragma once
// NoisyTopK: noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks",
// Eq. 3-5) with its load loss (Appendix A).
//   s = x Wᵀ                  (W "weight" [E, d]; the clean logits, routing.logits)
//   σ = softplus(x W_noiseᵀ)  (W_noise "noise_weight" [E, d]; the noise scale)
//   H = s + ε ⊙ σ             ε_te ~ N(0, 1) = standard_normal(seed, t·E + e, step) in Mode::train;
//                             H = s in Mode::eval (no noise)
//   ids = top-k of H          (select_topk: ties to the smaller index, NaN lowest)
//   gates = softmax over the K selected H values (KeepTopK, then softmax: renormalized)
// Load loss (router-owned, aux_loss() = load_coef · L_load, off when load_coef = 0):
//   P(x, i) = Φ((s_i − kth_excluding(H, k, i)) / σ_i),  kth_excluding(H, k, i) = k-th largest of H
//   without entry i (the K-th largest of H if i is not selected, else the (K+1)-th; with K = E there
//   is none and P = 1);  Load_i = Σ_x P(x, i);  L_load = CV(Load)² = Var/mean² (population, 0 if
//   mean 0). In eval the same formula is used with H = s.
// Gradients: the gates reach H, hence s and σ (ε fixed); the load loss reaches s through s_i and
// through the threshold entry (H_j = s_j + ε_j σ_j), and σ through the denominator and ε_j σ_j.
// The selection and which entry is the threshold are piecewise constant (no gradient).
// W and W_noise start at zero (as in the paper): the Parameter default; initialise as you wish.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "smoe/core/error.hpp"
#include "smoe/core/parameter.hpp"
#include "smoe/core/rng.hpp"
#include "smoe/cpu/parallel.hpp"
#include "smoe/routing/linear_scores.hpp"
#include "smoe/routing/routing.hpp"
#include "smoe/routing/softmax_topk.hpp"
#include "smoe/routing/topk_select.hpp"

namespace smoe {

struct NoisyTopKConfig {
  index_t d_model = 0;
  index_t experts = 0;
  index_t k = 1;
  double load_coef = 0.0;  // weight of the load loss (the paper's w_load, 0.1 in its LM runs); 0 = off
  std::uint64_t seed = 0;  // the noise is a function of (seed, step, token, expert)

  void validate(const char* context) const {
    if (d_model < 1) fail(context, ": d_model must be >= 1, got ", d_model);
    if (experts < 1) fail(context, ": experts must be >= 1, got ", experts);
    if (k < 1 || k > experts) fail(context, ": k must be in [1, experts = ", experts, "], got ", k);
    if (!(load_coef >= 0.0 && std::isfinite(load_coef)))
      fail(context, ": load_coef must be finite and >= 0, got ", load_coef);
  }
};

// NoisyTopK<T, cuda> is the CUDA backend's (smoe/cuda/noisy_topk_router.cuh).
template <class T, class Backend = cpu>
class NoisyTopK {
  static_assert(std::is_same_v<Backend, cpu>, "NoisyTopK<T, cuda> needs <smoe/cuda/noisy_topk_router.cuh>");

 public:
  using scalar_type = T;
  using backend = cpu;
  static constexpr const char* name = "NoisyTopK";

  explicit NoisyTopK(NoisyTopKConfig config)
      : config_((config.validate(name), config)),
        weight_({config.experts, config.d_model}),
        noise_weight_({config.experts, config.d_model}) {}

  index_t experts() const { return config_.experts; }
  index_t k() const { return config_.k; }
  index_t d_model() const { return config_.d_model; }
  const NoisyTopKConfig& config() const { return config_; }
  Parameter<T>& weight() { return weight_; }
  Parameter<T>& noise_weight() { return noise_weight_; }
  // Training steps taken: the noise of step s depends on (seed, s) only.
  std::uint64_t step() const { return step_; }
  void set_step(std::uint64_t s) { step_ = s; }

  // load_coef · L_load of the last forward (0 when load_coef = 0).
  T aux_loss() const { return T(config_.load_coef) * load_loss_; }
  // L_load of the last forward without its coefficient (computed only when load_coef > 0).
  T load_loss() const { return load_loss_; }
  // The noisy scores H [T, E] of the last forward (equal to the logits in eval).
  const Tensor<T>& noisy_logits() const { return noisy_; }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("weight"), weight_);
    f(std::string_view("noise_weight"), noise_weight_);
  }
  // The step counter (a checkpoint restores it so a resumed run draws the same random numbers).
  template <class F>
  void for_each_counter(F&& f) {
    f(std::string_view("step"), step_);
  }

  // The per-element math, shared with the CUDA backend (__host__ __device__).
  // softplus(u) and its derivative sigmoid(u) from one exp, both stable for any u (out may alias u).
  SMOE_HOST_DEVICE static void softplus(T u, T& out, T& derivative) {
    using std::abs;
    using std::exp;
    using std::log1p;
    const T exp_neg_abs = exp(-abs(u));
    out = (u < T(0) ? T(0) : u) + log1p(exp_neg_abs);  // std::max(u, 0), NaN kept
    derivative = (u >= T(0) ? T(1) : exp_neg_abs) / (T(1) + exp_neg_abs);
  }
  SMOE_HOST_DEVICE static T normal_cdf(T z) {
    using std::erfc;
    return T(0.5) * erfc(-z * T(0.70710678118654752440));
  }
  SMOE_HOST_DEVICE static T normal_pdf(T z) {
    using std::exp;
    return T(0.39894228040143267794) * exp(T(-0.5) * z * z);
  }

  void forward(ConstMatrixView<T> x, Routing<T>& out, Mode mode) {
    using namespace cpu_kernels;
    expect_shape(name, "x", x, x.rows, d_model());
    const index_t tokens = x.rows, E = experts(), K = k(), K1 = next_count();
    out.logits.resize({tokens, E});
    out.experts.resize({tokens, K});
    out.gates.resize({tokens, K});
    noisy_.resize({tokens, E});
    sigma_.resize({tokens, E});
    dsoftplus_.resize({tokens, E});
    eps_.resize({tokens, E});
    order_.resize({tokens, K1});
    z_.resize({tokens, load_on() ? E : 0});
    // Σ_x P(x, i) per token block (the blocks depend on T only), summed in block order afterwards.
    block_load_.resize({load_on() ? std::max<index_t>(1, tokens / token_block) : 0, E});
    block_load_.zero();
    train_ = mode == Mode::train;
    tokens_ = tokens;
    const std::uint64_t step = step_;
    // One token block per task: both GEMMs single-threaded (rounding independent of the thread
    // count), then noise, selection, gates and P(x, i) while the block is in cache.
    scores_.prepare(std::as_const(weight_.value).matrix());
    noise_scores_.prepare(std::as_const(noise_weight_.value).matrix());
    parallel_for_blocks(tokens, token_block, [&](index_t first, index_t last) {
      scores_.forward_block(x.rows_range(first, last), out.logits.matrix().rows_range(first, last));
      noise_scores_.forward_block(x.rows_range(first, last), sigma_.matrix().rows_range(first, last));
      std::vector<std::uint8_t> selected(static_cast<std::size_t>(E));
      for (index_t t = first; t < last; ++t) {
        const T* s = out.logits.data() + t * E;
        T* H = noisy_.data() + t * E;
        T* sig = sigma_.data() + t * E;
        T* dsp = dsoftplus_.data() + t * E;
        T* eps = eps_.data() + t * E;
        for (index_t e = 0; e < E; ++e) {
          softplus(sig[e], sig[e], dsp[e]);
          eps[e] = train_ ? T(standard_normal(config_.seed, std::uint64_t(t * E + e), step)) : T(0);
          H[e] = s[e] + eps[e] * sig[e];
        }
        std::int32_t* order = order_.data() + t * K1;
        select_topk(static_cast<const T*>(H), E, K1, order);
        std::int32_t* ids = out.experts.data() + t * K;
        std::copy_n(order, K, ids);
        gate_.forward(static_cast<const T*>(H), E, ids, K, out.gates.data() + t * K);
        if (load_on()) {
          T* z = z_.data() + t * E;
          T* load = block_load_.data() + (first / token_block) * E;
          if (K1 == K) {  // K = E: no k-th largest without i, P = Φ(+∞) = 1
            std::fill_n(z, E, T(INFINITY));
            for (index_t i = 0; i < E; ++i) load[i] += T(1);
            continue;
          }
          std::fill(selected.begin(), selected.end(), std::uint8_t{0});
          for (index_t j = 0; j < K; ++j) selected[order[j]] = 1;
          for (index_t i = 0; i < E; ++i) {
            z[i] = (s[i] - H[threshold(order, selected.data(), i)]) / sig[i];
            load[i] += normal_cdf(z[i]);
          }
        }
      }
    });
    load_loss_ = 0;
    if (load_on()) compute_load_loss();
    if (mode == Mode::train) ++step_;
  }

  void backward(ConstMatrixView<T> x, const Routing<T>& r, ConstMatrixView<T> d_gates, MatrixView<T> d_logits,
                MatrixView<T> dx) {
    using namespace cpu_kernels;
    const index_t tokens = x.rows, E = experts(), K = k(), K1 = next_count(), d = d_model();
    expect_shape(name, "x", x, tokens_, d);
    expect_shape(name, "d_gates", d_gates, tokens, K);
    expect_shape(name, "d_logits", d_logits, tokens, E);
    expect_shape(name, "dx", dx, tokens, d);
    if (tokens == 0) return;
    // ∂(coef·L)/∂Load_e = coef · (2/E) · ((Load_e − μ)/μ² − Var/μ³), as for the importance loss.
    std::vector<T> d_load(static_cast<std::size_t>(E), T(0));
    const bool load_grad = load_on() && K1 > K && mean_ != T(0);
    if (load_grad)
      for (index_t e = 0; e < E; ++e)
        d_load[e] = T(config_.load_coef) * T(2) / T(E) *
                    ((load_[e] - mean_) / (mean_ * mean_) - var_ / (mean_ * mean_ * mean_));
    // σ receives gradient from the gates only through the noise (ε = 0 in eval) and from the load loss.
    const bool noise_grad = train_ || load_grad;
    du_.resize({tokens, noise_grad ? E : 0});
    parallel_for_blocks(tokens, token_block, [&](index_t first, index_t last) {
      std::vector<T> dH(static_cast<std::size_t>(E)), dsigma(static_cast<std::size_t>(E));
      std::vector<std::uint8_t> selected(static_cast<std::size_t>(E));
      for (index_t t = first; t < last; ++t) {
        const T* H = noisy_.data() + t * E;
        const T* sig = sigma_.data() + t * E;
        const T* eps = eps_.data() + t * E;
        T* ds = d_logits.row(t);
        std::fill(dH.begin(), dH.end(), T(0));
        gate_.backward(H, E, r.experts.data() + t * K, K, r.gates.data() + t * K, d_gates.row(t), dH.data());
        for (index_t e = 0; e < E; ++e) {
          ds[e] += dH[e];  // ∂H/∂s = 1
          dsigma[e] = eps[e] * dH[e];
        }
        if (load_grad) {
          const std::int32_t* order = order_.data() + t * K1;
          std::fill(selected.begin(), selected.end(), std::uint8_t{0});
          for (index_t j = 0; j < K; ++j) selected[order[j]] = 1;
          const T* z = z_.data() + t * E;
          for (index_t i = 0; i < E; ++i) {
            const T pdf = normal_pdf(z[i]);
            if (pdf == T(0)) continue;  // far tail (or σ = 0): P is flat, its gradient is 0
            const T g = d_load[i] * pdf / sig[i];  // ∂/∂(s_i − threshold)
            const std::int32_t j = threshold(order, selected.data(), i);
            ds[i] += g;
            dsigma[i] -= g * z[i];
            ds[j] -= g;
            dsigma[j] -= g * eps[j];
          }
        }
        if (noise_grad) {
          T* du = du_.data() + t * E;
          const T* dsp = dsoftplus_.data() + t * E;
          for (index_t e = 0; e < E; ++e) du[e] = dsigma[e] * dsp[e];
        }
      }
    });
    // Both weight gradients before dx is written, so dx may alias x.
    using Scores = LinearScores<T>;
    Scores::accumulate_weight_grad(x, ConstMatrixView<T>(d_logits), weight_.grad.matrix());
    if (noise_grad) Scores::accumulate_weight_grad(x, std::as_const(du_).matrix(), noise_weight_.grad.matrix());
    Scores::accumulate_input_grad(ConstMatrixView<T>(d_logits), std::as_const(weight_.value).matrix(), dx);
    if (noise_grad)
      Scores::accumulate_input_grad(std::as_const(du_).matrix(), std::as_const(noise_weight_.value).matrix(), dx);
  }

 private:
  static constexpr index_t token_block = 128;

  bool load_on() const { return config_.load_coef > 0.0; }
  // Selection keeps the (K+1)-th entry too: the load loss's threshold for the selected experts.
  index_t next_count() const { return config_.k < config_.experts ? config_.k + 1 : config_.k; }
  // The entry of H that is kth_excluding(H, k, i): the (K+1)-th best if i is selected, else the K-th.
  std::int32_t threshold(const std::int32_t* order, const std::uint8_t* selected, index_t i) const {
    return selected[i] ? order[config_.k] : order[config_.k - 1];
  }


  void compute_load_loss() {
    const index_t E = experts();
    load_.assign(static_cast<std::size_t>(E), T(0));
    for (index_t b = 0; b < block_load_.dim(0); ++b)  // block order: independent of the thread count
      for (index_t e = 0; e < E; ++e) load_[e] += block_load_.data()[b * E + e];
    mean_ = 0;
    for (T v : load_) mean_ += v / T(E);
    var_ = 0;
    for (T v : load_) var_ += (v - mean_) * (v - mean_) / T(E);
    load_loss_ = mean_ == T(0) ? T(0) : var_ / (mean_ * mean_);
  }

  NoisyTopKConfig config_;
  SoftmaxGate gate_{.renormalize = true};
  Parameter<T> weight_, noise_weight_;
  LinearScores<T> scores_, noise_scores_;
  std::uint64_t step_ = 0;
  // Cache of the last forward, [T, E] unless noted.
  Tensor<T> noisy_, sigma_, dsoftplus_, eps_, z_;  // H, σ, softplus'(u), ε, (s_i − threshold)/σ_i
  Tensor<std::int32_t> order_;                     // [T, K+1] best first (K when K = E)
  Tensor<T> block_load_;                           // [T / token_block, E] Σ P(x, i) per block
  Tensor<T> du_;                                   // backward scratch: ∂/∂(x W_noiseᵀ)
  std::vector<T> load_;
  T mean_ = 0, var_ = 0, load_loss_ = 0;
  index_t tokens_ = 0;
  bool train_ = false;
};

}  // namespace smoe
