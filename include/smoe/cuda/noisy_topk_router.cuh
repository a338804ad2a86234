#pragma once
// NoisyTopK<T, cuda>: noisy top-k gating (routing/noisy_topk.hpp) on the device, with its load loss.
// The weights "weight" and "noise_weight" [E, d], logits, noise and gates are fp32 (fp64 for
// T = double) whatever T is. The noise ε_te = standard_normal(seed, t·E + e, step) is the CPU's
// Philox draw, and softplus, Φ and φ are the CPU class's own __host__ __device__ helpers: the same
// seed and step give the same noise and selection as the CPU.
//   forward:  s = x·Wᵀ, u = x·W_noiseᵀ (cuda/linear_scores.cuh); per token: σ = softplus(u),
//             H = s + ε σ, top-(k+1) of H, softmax gates over the k selected H, and P(x, i) when the
//             load loss is on; Load = Σ_x P in the CPU's 128-token blocks, then CV² on one thread.
//             The loss stays on the device (aux_loss_on_device(); MoE<cuda> adds it to its aux loss).
//   backward: per token as the CPU (gates → H → s, σ; the load loss through s_i, the threshold
//             entry and σ), then both weight gradients, then dx.
// One choice the CPU leaves open: the CPU skips the noise weight's gradient when it is known to be
// zero (eval with the load loss off, or a zero mean load); the device decides without reading the
// load, so in eval with the load loss on it accumulates that zero gradient (same values).
#include <cstdint>
#include <string_view>

#include "smoe/core/parameter.hpp"
#include "smoe/core/rng.hpp"
#include "smoe/cuda/device_tensor.cuh"
#include "smoe/cuda/linear_scores.cuh"
#include "smoe/cuda/routing.cuh"
#include "smoe/cuda/topk.cuh"
#include "smoe/routing/noisy_topk.hpp"
#include "smoe/routing/routing.hpp"
#include "smoe/routing/softmax_topk.hpp"

namespace smoe {

namespace cuda_kernels {

// The entry of H that is kth_excluding(H, k, i): the (K+1)-th best if i is selected, else the K-th.
SMOE_HOST_DEVICE std::int32_t noisy_threshold(const std::int32_t* order, index_t K, index_t i) {
  for (index_t j = 0; j < K; ++j)
    if (order[j] == i) return order[K];
  return order[K - 1];
}

template <class G>
struct NoisyForward {
  SoftmaxGate gate;
  const G* logits;
  G *sigma, *dsoftplus, *eps, *noisy;  // sigma holds u = x·W_noiseᵀ on entry
  std::int32_t *order, *ids;
  G* gates;
  G *z, *prob;  // [T, E] when the load loss is on, else null
  index_t E, K, K1;
  bool train;
  std::uint64_t seed, step;
  SMOE_HOST_DEVICE void operator()(index_t t) const {
    using Math = NoisyTopK<G>;
    const G* s = logits + t * E;
    G *sig = sigma + t * E, *H = noisy + t * E;
    for (index_t e = 0; e < E; ++e) {
      Math::softplus(sig[e], sig[e], dsoftplus[t * E + e]);
      const G noise = train ? G(standard_normal(seed, static_cast<std::uint64_t>(t * E + e), step)) : G(0);
      eps[t * E + e] = noise;
      H[e] = s[e] + noise * sig[e];
    }
    std::int32_t* best = order + t * K1;
    topk_row(static_cast<const G*>(H), E, K1, best, NotRemoved{});
    std::int32_t* id = ids + t * K;
    for (index_t j = 0; j < K; ++j) id[j] = best[j];
    gate.forward(static_cast<const G*>(H), E, id, K, gates + t * K);
    if (prob == nullptr) return;
    for (index_t i = 0; i < E; ++i) {
      if (K1 == K) {  // K = E: no k-th largest without i, P = Φ(+∞) = 1
        z[t * E + i] = G(INFINITY);
        prob[t * E + i] = G(1);
        continue;
      }
      const G zi = (s[i] - H[noisy_threshold(best, K, i)]) / sig[i];
      z[t * E + i] = zi;
      prob[t * E + i] = Math::normal_cdf(zi);
    }
  }
};

// Σ P(x, e) over the tokens of block b, in token order (the CPU's blocks: T / 128 of them, at least
// one, the last one taking the remainder).
template <class G>
struct BlockLoad {
  const G* prob;
  G* block_load;
  index_t tokens, E, block, blocks;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    const index_t b = i / E, e = i % E;
    const index_t first = b * block, last = b + 1 == blocks ? tokens : first + block;
    G sum = 0;
    for (index_t t = first; t < last; ++t) sum += prob[t * E + e];
    block_load[i] = sum;
  }
};

// Load = Σ over blocks in order; stats = {mean, var, CV², coef · CV²} as the CPU's compute_load_loss.
template <class G>
struct LoadLoss {
  const G* block_load;
  G *load, *stats;
  index_t E, blocks;
  G coef;
  SMOE_HOST_DEVICE void operator()(index_t) const {
    for (index_t e = 0; e < E; ++e) {
      G sum = 0;
      for (index_t b = 0; b < blocks; ++b) sum += block_load[b * E + e];
      load[e] = sum;
    }
    G mean = 0, var = 0;
    for (index_t e = 0; e < E; ++e) mean += load[e] / G(E);
    for (index_t e = 0; e < E; ++e) var += (load[e] - mean) * (load[e] - mean) / G(E);
    const G loss = mean == G(0) ? G(0) : var / (mean * mean);
    stats[0] = mean;
    stats[1] = var;
    stats[2] = loss;
    stats[3] = coef * loss;
  }
};

template <class G>
struct NoisyBackward {
  SoftmaxGate gate;
  const G *noisy, *sigma, *eps, *dsoftplus, *z;
  const std::int32_t *order, *ids;
  const G *gates, *d_gates;
  index_t d_gates_stride;
  G* d_logits;
  index_t d_logits_stride;
  G *dH, *du;           // dH [T, E] scratch; du [T, E] (∂/∂u) when noise_grad, else null
  const G *load, *stats;  // the last forward's Load and {mean, var, ...}; null without the load loss
  G coef;
  index_t E, K, K1;
  SMOE_HOST_DEVICE void operator()(index_t t) const {
    using Math = NoisyTopK<G>;
    G* dh = dH + t * E;
    for (index_t e = 0; e < E; ++e) dh[e] = G(0);
    gate.backward(noisy + t * E, E, ids + t * K, K, gates + t * K, d_gates + t * d_gates_stride, dh);
    G* ds = d_logits + t * d_logits_stride;
    G* dsigma = du ? du + t * E : nullptr;  // ∂/∂σ, turned into ∂/∂u in place at the end
    const G *ep = eps + t * E, *sig = sigma + t * E;
    for (index_t e = 0; e < E; ++e) {
      ds[e] += dh[e];  // ∂H/∂s = 1
      if (dsigma) dsigma[e] = ep[e] * dh[e];
    }
    const G mean = stats ? stats[0] : G(0);
    if (stats && K1 > K && mean != G(0)) {
      const G var = stats[1];
      const std::int32_t* best = order + t * K1;
      const G* zt = z + t * E;
      for (index_t i = 0; i < E; ++i) {
        const G pdf = Math::normal_pdf(zt[i]);
        if (pdf == G(0)) continue;  // far tail (or σ = 0): P is flat, its gradient is 0
        // ∂(coef·L)/∂Load_i, the CPU's expression and rounding order.
        const G d_load = coef * G(2) / G(E) * ((load[i] - mean) / (mean * mean) - var / (mean * mean * mean));
        const G g = d_load * pdf / sig[i];
        const std::int32_t j = noisy_threshold(best, K, i);
        ds[i] += g;
        dsigma[i] -= g * zt[i];
        ds[j] -= g;
        dsigma[j] -= g * ep[j];
      }
    }
    if (dsigma)
      for (index_t e = 0; e < E; ++e) dsigma[e] *= dsoftplus[t * E + e];
  }
};

}  // namespace cuda_kernels

template <class T>
class NoisyTopK<T, cuda> {
 public:
  using scalar_type = T;
  using gate_type = acc_t<T>;
  using backend = cuda;
  using G = gate_type;
  static constexpr const char* name = "NoisyTopK<cuda>";

  explicit NoisyTopK(NoisyTopKConfig config, cuda_stream stream = {}) : config_((config.validate(name), config)) {
    if (next_count() > cuda_kernels::max_topk)
      fail(name, ": k must be <= ", cuda_kernels::max_topk - 1, " (or = experts <= ", cuda_kernels::max_topk,
           ") on the CUDA backend, got ", config.k);
    weight_ = Parameter<G, cuda>({config.experts, config.d_model});
    noise_weight_ = Parameter<G, cuda>({config.experts, config.d_model});
    set_stream(stream);
  }

  index_t experts() const { return config_.experts; }
  index_t k() const { return config_.k; }
  index_t d_model() const { return config_.d_model; }
  const NoisyTopKConfig& config() const { return config_; }
  Parameter<G, cuda>& weight() { return weight_; }
  Parameter<G, cuda>& noise_weight() { return noise_weight_; }
  std::uint64_t step() const { return step_; }
  void set_step(std::uint64_t s) { step_ = s; }
  cuda_stream stream() const { return stream_; }
  void set_stream(cuda_stream s) {
    stream_ = s;
    for (auto* p : {&weight_, &noise_weight_}) {
      p->value.set_stream(s);
      p->grad.set_stream(s);
    }
    for (auto* t : {&noisy_, &sigma_, &dsoftplus_, &eps_, &z_, &prob_, &block_load_, &load_, &stats_, &dH_, &du_})
      t->set_stream(s);
    order_.set_stream(s);
  }

  // load_coef · L_load of the last forward as a device scalar (0 when load_coef = 0): MoE<cuda>
  // adds it to its aux loss on the device.
  const G* aux_loss_on_device() const { return stats_.data() + 3; }
  // The same and L_load without its coefficient, read on the host (wait for the stream).
  G aux_loss() const { return to_host(stats_)[3]; }
  G load_loss() const { return to_host(stats_)[2]; }
  // The noisy scores H [T, E] of the last forward (equal to the logits in eval).
  const Tensor<G, cuda>& noisy_logits() const { return noisy_; }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("weight"), weight_);
    f(std::string_view("noise_weight"), noise_weight_);
  }
  template <class F>
  void for_each_counter(F&& f) {
    f(std::string_view("step"), step_);
  }

  void forward(ConstMatrixView<T, cuda> x, Routing<G, cuda>& out, Mode mode) {
    using namespace cuda_kernels;
    expect_shape(name, "x", x, x.rows, d_model());
    const index_t tokens = x.rows, E = experts(), K = k(), K1 = next_count();
    prepare_routing(out, tokens, E, K, stream_);
    for (auto* t : {&noisy_, &sigma_, &dsoftplus_, &eps_}) t->resize({tokens, E});
    order_.resize({tokens, K1});
    z_.resize({tokens, load_on() ? E : 0});
    prob_.resize({tokens, load_on() ? E : 0});
    stats_.resize({4});
    train_ = mode == Mode::train;
    tokens_ = tokens;
    linear_scores_forward(stream_, x, weight_.value.data(), E, out.logits.data());
    linear_scores_forward(stream_, x, noise_weight_.value.data(), E, sigma_.data());
    for_each_index(stream_, tokens,
                   NoisyForward<G>{gate_, out.logits.data(), sigma_.data(), dsoftplus_.data(), eps_.data(), noisy_.data(),
                                   order_.data(), out.experts.data(), out.gates.data(), load_on() ? z_.data() : nullptr,
                                   load_on() ? prob_.data() : nullptr, E, K, K1, train_, config_.seed, step_});
    if (load_on()) {
      const index_t blocks = std::max<index_t>(1, tokens / token_block);
      block_load_.resize({blocks, E});
      load_.resize({E});
      for_each_index(stream_, blocks * E, BlockLoad<G>{prob_.data(), block_load_.data(), tokens, E, token_block, blocks});
      for_each_index(stream_, 1, LoadLoss<G>{block_load_.data(), load_.data(), stats_.data(), E, blocks, G(config_.load_coef)});
    } else {
      stats_.zero();
    }
    if (mode == Mode::train) ++step_;
  }

  void backward(ConstMatrixView<T, cuda> x, const Routing<G, cuda>& r, ConstMatrixView<G, cuda> d_gates,
                MatrixView<G, cuda> d_logits, MatrixView<T, cuda> dx) {
    using namespace cuda_kernels;
    const index_t tokens = x.rows, E = experts(), K = k(), K1 = next_count(), d = d_model();
    expect_shape(name, "x", x, tokens_, d);
    expect_shape(name, "d_gates", d_gates, tokens, K);
    expect_shape(name, "d_logits", d_logits, tokens, E);
    expect_shape(name, "dx", dx, tokens, d);
    if (tokens == 0) return;
    // σ receives gradient from the gates only through the noise (ε = 0 in eval) and from the load loss.
    const bool load_grad = load_on() && K1 > K;
    const bool noise_grad = train_ || load_grad;
    dH_.resize({tokens, E});
    du_.resize({tokens, noise_grad ? E : 0});
    for_each_index(stream_, tokens,
                   NoisyBackward<G>{gate_, noisy_.data(), sigma_.data(), eps_.data(), dsoftplus_.data(), z_.data(),
                                    order_.data(), r.experts.data(), r.gates.data(), d_gates.data, d_gates.stride,
                                    d_logits.data, d_logits.stride, dH_.data(), noise_grad ? du_.data() : nullptr,
                                    load_grad ? load_.data() : nullptr, load_grad ? stats_.data() : nullptr,
                                    G(config_.load_coef), E, K, K1});
    // Both weight gradients before dx is written, so dx may alias x.
    const ConstMatrixView<G, cuda> ds(d_logits), du = std::as_const(du_).matrix();
    linear_scores_weight_grad(stream_, x, ds, weight_.grad.data());
    if (noise_grad) linear_scores_weight_grad(stream_, x, du, noise_weight_.grad.data());
    linear_scores_input_grad(stream_, ds, weight_.value.data(), dx);
    if (noise_grad) linear_scores_input_grad(stream_, du, noise_weight_.value.data(), dx);
  }

 private:
  static constexpr index_t token_block = 128;  // the CPU's load blocks

  bool load_on() const { return config_.load_coef > 0.0; }
  index_t next_count() const { return config_.k < config_.experts ? config_.k + 1 : config_.k; }

  NoisyTopKConfig config_;
  SoftmaxGate gate_{.renormalize = true};
  cuda_stream stream_{};
  Parameter<G, cuda> weight_, noise_weight_;
  std::uint64_t step_ = 0;
  // Cache of the last forward, [T, E] unless noted.
  Tensor<G, cuda> noisy_, sigma_, dsoftplus_, eps_, z_, prob_;  // H, σ, softplus'(u), ε, z, P(x, i)
  Tensor<std::int32_t, cuda> order_;                            // [T, K+1] best first (K when K = E)
  Tensor<G, cuda> block_load_, load_, stats_;                   // [blocks, E], [E], {mean, var, L, coef·L}
  Tensor<G, cuda> dH_, du_;                                     // backward scratch
  index_t tokens_ = 0;
  bool train_ = false;
};

}  // namespace smoe
