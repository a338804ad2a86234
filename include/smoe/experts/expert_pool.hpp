#pragma once
// ExpertPool: SaMoE's global pool of M MoE layers ("members"), each a set of E two-layer experts
// (Zhang et al., "SaMoE: Parameter Efficient MoE Language Models via Self-Adaptive Expert
// Combination", ICLR 2023 submission), shared by every MoE layer of a model:
//
//   "w1" [M, E, d, fan·G]   "w2" [M, E, G, d]   optional "b1" [M, E, fan·G], "b2" [M, E, d]
//
// Member m, expert e is the expert y = act(x·W1[m, e] + b1[m, e])·W2[m, e] + b2[m, e]. The pool
// only owns the parameters; each layer uses it through a SaMoEExperts handle (experts/
// samoe_experts.hpp) that holds a non-owning pointer to it, its own combination logits and its
// own caches, and accumulates its gradients into the pool's grads. The owner (a model, MoEStack)
// visits the pool once, under "pool.", so optimizers and checkpoints see every tensor once.
//
// Accounting (FLOPs count matrix products, 2 per multiply-add): one expert holds
//   P_e = d·fan·G + G·d (+ fan·G + d with biases) parameters and costs F_e = 2·d·G·(fan + 1)
// FLOPs per token. total_parameters() = M·E·P_e; per token the pool answers for one routed
// assignment through one member (P_e, F_e): a pool does not know K nor how many members its
// layers combine, the layers multiply.
#include <string_view>
#include <type_traits>

#include "smoe/core/parameter.hpp"
#include "smoe/cpu/grouped_ffn.hpp"
#include "smoe/cpu/parallel.hpp"
#include "smoe/experts/activation.hpp"
#include "smoe/train/init.hpp"

namespace smoe {

struct ExpertPoolConfig {
  index_t d_model = 0;
  index_t experts = 1;  // E, per member
  index_t hidden = 0;   // G, the hidden units of one expert
  index_t members = 1;  // M, MoE layers in the pool
  bool bias = false;

  void validate(const char* context) const {
    if (d_model < 1) fail(context, ": d_model must be >= 1, got ", d_model);
    if (experts < 1) fail(context, ": experts must be >= 1, got ", experts);
    if (hidden < 1) fail(context, ": hidden (expert size G) must be >= 1, got ", hidden);
    if (members < 1) fail(context, ": members (pool size M) must be >= 1, got ", members);
  }
};

// A handle re-bound to another pool needs one of the same shape (SaMoEExperts::bind, both backends).
inline void expect_same_pool_shape(const char* context, const ExpertPoolConfig& a, const ExpertPoolConfig& b) {
  if (a.members != b.members || a.experts != b.experts || a.d_model != b.d_model || a.hidden != b.hidden ||
      a.bias != b.bias)
    fail(context, ": bind needs a pool of the same shape [M, E, d, G] = [", a.members, ", ", a.experts, ", ", a.d_model,
         ", ", a.hidden, "], got [", b.members, ", ", b.experts, ", ", b.d_model, ", ", b.hidden, "]");
}

namespace detail {
// parallel_for_blocks (cpu/parallel.hpp) for elementwise loops without Eigen products: the same
// fixed blocks, but a single block runs on the calling thread, without a parallel region.
template <class F>
void elementwise_blocks(index_t n, index_t block, F&& f) {
  if (n <= 0) return;
  if (n < 2 * block) {
    f(index_t(0), n);
    return;
  }
  cpu_kernels::parallel_for_blocks(n, block, f);
}
}  // namespace detail

// Parameters and forward FLOPs per token of one two-layer expert (FLOPs: matrix products only).
template <Activation Act>
constexpr index_t expert_parameters(index_t d, index_t G, bool bias) {
  return d * Act::fan * G + G * d + (bias ? Act::fan * G + d : 0);
}
template <Activation Act>
constexpr double expert_flops(index_t d, index_t G) {
  return 2.0 * double(d) * double(G) * double(Act::fan + 1);
}

template <class T, Activation Act, class Backend = cpu>
class ExpertPool {
  static_assert(std::is_same_v<Backend, cpu>, "ExpertPool<T, Act, cuda> needs <smoe/cuda/expert_pool.cuh>");

 public:
  using scalar_type = T;
  using backend = cpu;
  using activation = Act;
  static constexpr const char* name = "ExpertPool";
  // Where a model puts the pool's parameters: "pool.w1", "pool.w2", ...
  static constexpr const char* parameter_prefix = "pool.";

  explicit ExpertPool(ExpertPoolConfig c)
      : config_((c.validate(name), c)),
        w1_({c.members, c.experts, c.d_model, Act::fan * c.hidden}),
        w2_({c.members, c.experts, c.hidden, c.d_model}) {
    if (c.bias) {
      b1_ = Parameter<T>({c.members, c.experts, Act::fan * c.hidden});
      b2_ = Parameter<T>({c.members, c.experts, c.d_model});
    }
  }

  index_t members() const { return config_.members; }
  index_t experts() const { return config_.experts; }
  index_t d_model() const { return config_.d_model; }
  index_t hidden() const { return config_.hidden; }
  bool has_bias() const { return config_.bias; }
  const ExpertPoolConfig& config() const { return config_; }
  Parameter<T>& w1() { return w1_; }
  Parameter<T>& w2() { return w2_; }
  Parameter<T>& b1() { return b1_; }
  Parameter<T>& b2() { return b2_; }
  const Parameter<T>& w1() const { return w1_; }
  const Parameter<T>& w2() const { return w2_; }
  const Parameter<T>& b1() const { return b1_; }
  const Parameter<T>& b2() const { return b2_; }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("w1"), w1_);
    f(std::string_view("w2"), w2_);
    if (config_.bias) {
      f(std::string_view("b1"), b1_);
      f(std::string_view("b2"), b2_);
    }
  }

  // Elements of one member's w1, w2, b1, b2 (0 for absent biases): member m starts at m times these.
  index_t member_w1_size() const { return experts() * d_model() * Act::fan * hidden(); }
  index_t member_w2_size() const { return experts() * hidden() * d_model(); }
  index_t member_b1_size() const { return has_bias() ? experts() * Act::fan * hidden() : 0; }
  index_t member_b2_size() const { return has_bias() ? experts() * d_model() : 0; }

  // Member m's E experts, in the grouped-GEMM kernel's layout.
  cpu_kernels::ExpertWeights<T> member_weights(index_t m) const {
    check_member(m);
    return {w1_.value.data() + m * member_w1_size(), w2_.value.data() + m * member_w2_size(),
            has_bias() ? b1_.value.data() + m * member_b1_size() : nullptr,
            has_bias() ? b2_.value.data() + m * member_b2_size() : nullptr};
  }
  cpu_kernels::ExpertGradients<T> member_gradients(index_t m) {
    check_member(m);
    return {w1_.grad.data() + m * member_w1_size(), w2_.grad.data() + m * member_w2_size(),
            has_bias() ? b1_.grad.data() + m * member_b1_size() : nullptr,
            has_bias() ? b2_.grad.data() + m * member_b2_size() : nullptr};
  }

  index_t parameters_per_expert() const { return expert_parameters<Act>(d_model(), hidden(), has_bias()); }
  double flops_per_expert() const { return expert_flops<Act>(d_model(), hidden()); }

  index_t total_parameters() const { return members() * experts() * parameters_per_expert(); }
  // Per routed assignment through one member (see the header comment).
  double active_parameters_per_token() const { return double(parameters_per_expert()); }
  double flops_per_token() const { return flops_per_expert(); }

 private:
  void check_member(index_t m) const {
    if (m < 0 || m >= members()) fail(name, ": member must be in [0, ", members(), "), got ", m);
  }

  ExpertPoolConfig config_;
  Parameter<T> w1_, w2_, b1_, b2_;
};

// sigma-MoE-style initialization of every member (train/init.hpp): W1 std = scale·d^-1/2,
// W2 std = scale·(E·G)^-1/2, biases 0; every element of every member is its own draw.
template <class T, Activation Act>
void init_expert_pool(ExpertPool<T, Act>& pool, InitOptions o = {}) {
  const double d = double(pool.d_model()), dff = double(pool.experts() * pool.hidden());
  fill_normal(pool.w1().value, o.scale / std::sqrt(d), o.seed, 1);
  fill_normal(pool.w2().value, o.scale / std::sqrt(dff), o.seed, 2);
  if (pool.has_bias()) {
    pool.b1().value.zero();
    pool.b2().value.zero();
  }
}

}  // namespace smoe
