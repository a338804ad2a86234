#pragma once
// SaMoEExperts<T, Act, Space, Backend>: one MoE layer expressed as a learned soft combination of the M
// members of a global ExpertPool (SaMoE, Zhang et al., ICLR 2023 submission: "expresses each MoE
// layer as a soft combination of global MoE layers"). The paper's full text is not public; the
// choices below are smoe's (docs/samoe.md lists them).
//
//   α_l = softmax(a_l / τ) over the selected members S (all M, or the r with the largest a_l,
//         ties to the smaller index, renormalized over S); a_l "combine" [M] is this layer's.
//   WeightSpace:  W_{l,e} = Σ_{m∈S} α_{l,m} W_{m,e} for W1, W2, b1, b2, then the grouped GEMM
//                 (cpu/grouped_ffn.hpp) on W_l: per-token cost of one normal MoE layer, plus the
//                 materialization, r·E·P_e multiply-adds per forward (none once frozen).
//   OutputSpace:  ys[s] = Σ_{m∈S} α_{l,m} FFN_{m,e(s)}(x[t(s)]): the grouped GEMM once per member
//                 in S, so the per-token cost is r times a normal MoE layer's.
// The router is the layer's own (one routing per layer, shared by the members), so output-space
// combination of whole MoE layers, y_l = Σ_m α_m MoE_m(x), equals the per-slot combination here.
//
// Backward, with g_m = ∂L/∂α_m:
//   WeightSpace:  dW_l from the grouped GEMM on W_l; dW_m += α_m·dW_l; g_m = <dW_l, W_m>.
//   OutputSpace:  dW_m from the grouped GEMM of member m with dys scaled by α_m;
//                 g_m = Σ_s <dys[s], FFN_{m,e(s)}(x[t(s)])>.
//   Both:         ∂L/∂a_m += (α_m / τ)·(g_m − Σ_{j∈S} α_j g_j) for m ∈ S, 0 otherwise.
//
// Ownership: the pool is the model's (a non-owning pointer here; bind() after moving the pool);
// this handle owns a_l, visited by for_each_layer_parameter as "combine" (a layer parameter, so a
// model names it "layers.{l}.combine"); for_each_parameter visits nothing. Gradients accumulate
// into the pool's grads, summed over the layers that use it.
//
// Materialization (WeightSpace): by default W_l is recomputed by every forward from the current
// pool and a_l ("per step"). freeze() computes it once and forward then reuses it: for inference,
// or for the micro-batches of one optimizer step (call freeze() again after the optimizer step).
// Backward is the same either way, so outputs and gradients are identical as long as the pool and
// a_l have not changed since freeze(). W_l and its gradient buffer take E·P_e values each.
#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <string_view>
#include <type_traits>
#include <vector>

#include "smoe/core/parameter.hpp"
#include "smoe/cpu/grouped_ffn.hpp"
#include "smoe/cpu/parallel.hpp"
#include "smoe/experts/expert_pool.hpp"
#include "smoe/experts/experts.hpp"
#include "smoe/routing/topk_select.hpp"

namespace smoe {

// Combination policies.
struct WeightSpace {
  static constexpr const char* name = "weight space";
};
struct OutputSpace {
  static constexpr const char* name = "output space";
};

enum class CombineInit {
  uniform,  // a_l = 0: α_l uniform over the pool
  member,   // a_l = c·onehot(l mod M): layer l starts near its own member
};

struct SaMoEConfig {
  index_t layer = 0;           // l: which member CombineInit::member favours (l mod M)
  double temperature = 1.0;    // τ in softmax(a_l / τ)
  index_t top_members = 0;     // r: combine only the r members with the largest a_l; 0 = all M
  CombineInit init = CombineInit::uniform;
  double init_scale = 4.0;     // c of CombineInit::member

  void validate(const char* context, index_t members) const {
    if (layer < 0) fail(context, ": layer must be >= 0, got ", layer);
    if (!(temperature > 0) || !std::isfinite(temperature))
      fail(context, ": temperature must be finite and > 0, got ", temperature);
    if (top_members < 0 || top_members > members)
      fail(context, ": top_members must be in [0, members = ", members, "] (0 = all), got ", top_members);
    if (!std::isfinite(init_scale)) fail(context, ": init_scale must be finite, got ", init_scale);
  }
};

template <class T, Activation Act, class Space, class Backend = cpu>
  requires(std::same_as<Space, WeightSpace> || std::same_as<Space, OutputSpace>)
class SaMoEExperts {
  static_assert(std::is_same_v<Backend, cpu>, "SaMoEExperts<T, Act, Space, cuda> needs <smoe/cuda/samoe_experts.cuh>");

 public:
  using scalar_type = T;
  using backend = cpu;
  using activation = Act;
  using space = Space;
  using pool_type = ExpertPool<T, Act>;
  static constexpr bool weight_space = std::is_same_v<Space, WeightSpace>;
  static constexpr const char* name = weight_space ? "SaMoEExperts<WeightSpace>" : "SaMoEExperts<OutputSpace>";

  explicit SaMoEExperts(pool_type& pool, SaMoEConfig c = {})
      : pool_(&pool),
        config_((c.validate(name, pool.members()), c)),
        combine_({pool.members()}),
        caches_(static_cast<std::size_t>(weight_space ? 1 : pool.members())) {
    if (c.init == CombineInit::member) combine_.value[c.layer % pool.members()] = T(c.init_scale);
  }

  // Re-points the handle at `pool` (after the owner moved it); it must have the same shape.
  void bind(pool_type& pool) {
    expect_same_pool_shape(name, pool_->config(), pool.config());
    pool_ = &pool;
  }
  pool_type& pool() const { return *pool_; }

  index_t experts() const { return pool_->experts(); }
  index_t d_model() const { return pool_->d_model(); }
  index_t hidden() const { return pool_->hidden(); }
  index_t members() const { return pool_->members(); }
  // r: how many members each forward combines.
  index_t members_used() const { return config_.top_members > 0 ? config_.top_members : members(); }
  const SaMoEConfig& config() const { return config_; }
  Parameter<T>& combine() { return combine_; }
  const Parameter<T>& combine() const { return combine_; }

  // α_l over all M members (0 outside the selected ones), from the current logits.
  std::vector<T> coefficients() const {
    std::vector<std::int32_t> selected;
    std::vector<T> alpha;
    compute_coefficients(selected, alpha);
    std::vector<T> out(static_cast<std::size_t>(members()), T(0));
    for (std::size_t j = 0; j < selected.size(); ++j) out[static_cast<std::size_t>(selected[j])] = alpha[j];
    return out;
  }

  template <class F>
  void for_each_parameter(F&&) {}  // the pool is the owner's; a_l is a layer parameter
  template <class F>
  void for_each_layer_parameter(F&& f) {
    f(std::string_view("combine"), combine_);
  }

  // WeightSpace: materialize W_l now and reuse it in every forward until unfreeze().
  void freeze()
    requires weight_space
  {
    compute_coefficients(selected_, alpha_);
    materialize();
    frozen_ = true;
  }
  void unfreeze()
    requires weight_space
  {
    frozen_ = false;
  }
  bool frozen() const { return frozen_; }
  // The combined experts W_l of the last materialization, in the grouped-GEMM layout.
  cpu_kernels::ExpertWeights<T> combined_weights() const
    requires weight_space
  {
    return {cw1_.data(), cw2_.data(), pool_->has_bias() ? cb1_.data() : nullptr,
            pool_->has_bias() ? cb2_.data() : nullptr};
  }

  void forward(ConstMatrixView<T> x, const Dispatch<T>& dispatch, MatrixView<T> ys) {
    check(x, dispatch);
    expect_shape(name, "ys", ys, dispatch.assignments(), d_model());
    if constexpr (weight_space) {
      if (!frozen_) {
        compute_coefficients(selected_, alpha_);
        materialize();
      }
      cpu_kernels::grouped_ffn_forward<T, Act>(x, dispatch, combined_weights(), shape(), ys, caches_.at(0));
    } else {
      compute_coefficients(selected_, alpha_);
      const index_t A = dispatch.assignments(), d = d_model(), r = index_t(selected_.size());
      member_ys_.resize(static_cast<std::size_t>(r));
      for (index_t j = 0; j < r; ++j) {
        member_ys_[j].resize({A, d});
        cpu_kernels::grouped_ffn_forward<T, Act>(x, dispatch, pool_->member_weights(selected_[j]), shape(),
                                                 member_ys_[j].matrix(), caches_[j]);
      }
      // ys = Σ_j α_j ys_j, members in index order (the first one assigns: with M = 1, ys = 1·ys_0).
      detail::elementwise_blocks(A, slot_block, [&](index_t first, index_t last) {
        for (index_t s = first; s < last; ++s) {
          T* out = ys.row(s);
          const T* in = member_ys_[0].data() + s * d;
          for (index_t c = 0; c < d; ++c) out[c] = alpha_[0] * in[c];
          for (index_t j = 1; j < r; ++j) {
            in = member_ys_[j].data() + s * d;
            for (index_t c = 0; c < d; ++c) out[c] += alpha_[j] * in[c];
          }
        }
      });
    }
    forward_assignments_ = dispatch.assignments();
  }

  void backward(ConstMatrixView<T> x, const Dispatch<T>& dispatch, ConstMatrixView<T> dys, MatrixView<T> dx) {
    check(x, dispatch);
    expect_shape(name, "dys", dys, dispatch.assignments(), d_model());
    expect_shape(name, "dx", dx, x.rows, d_model());
    if (forward_assignments_ != dispatch.assignments())
      fail(name, ": backward needs the forward of the same dispatch first");
    const index_t r = index_t(selected_.size());
    std::vector<double> g(static_cast<std::size_t>(r), 0.0);  // ∂L/∂α_j
    if constexpr (weight_space) {
      for (auto* t : {&cgw1_, &cgw2_, &cgb1_, &cgb2_}) t->zero();
      const cpu_kernels::ExpertGradients<T> dW{cgw1_.data(), cgw2_.data(), pool_->has_bias() ? cgb1_.data() : nullptr,
                                               pool_->has_bias() ? cgb2_.data() : nullptr};
      cpu_kernels::grouped_ffn_backward<T, Act>(x, dispatch, combined_weights(), dW, shape(), dys, dx, caches_.at(0));
      scatter_combined_gradient(g);
    } else {
      const index_t A = dispatch.assignments(), d = d_model();
      // g_j = Σ_s <dys[s], ys_j[s]> by fixed slot blocks, partial sums in double, added in block order.
      const index_t blocks = std::max<index_t>(1, A / slot_block);
      std::vector<double> partial(static_cast<std::size_t>(blocks * r), 0.0);
      detail::elementwise_blocks(A, slot_block, [&](index_t first, index_t last) {
        double* p = partial.data() + (first / slot_block) * r;
        for (index_t s = first; s < last; ++s)
          for (index_t j = 0; j < r; ++j) {
            const T *a = dys.row(s), *b = member_ys_[j].data() + s * d;
            double acc = 0;
            for (index_t c = 0; c < d; ++c) acc += double(a[c]) * double(b[c]);
            p[j] += acc;
          }
      });
      for (index_t b = 0; b < blocks; ++b)
        for (index_t j = 0; j < r; ++j) g[j] += partial[b * r + j];
      scaled_dys_.resize({A, d});
      dx_member_.resize({x.rows, d});
      for (index_t j = 0; j < r; ++j) {
        const T a = alpha_[j];
        detail::elementwise_blocks(A, slot_block, [&](index_t first, index_t last) {
          for (index_t s = first; s < last; ++s) {
            const T* in = dys.row(s);
            T* out = scaled_dys_.data() + s * d;
            for (index_t c = 0; c < d; ++c) out[c] = a * in[c];
          }
        });
        const index_t m = selected_[j];
        // The first member writes dx, the others add theirs in member order.
        cpu_kernels::grouped_ffn_backward<T, Act>(x, dispatch, pool_->member_weights(m), pool_->member_gradients(m),
                                                  shape(), std::as_const(scaled_dys_).matrix(),
                                                  j == 0 ? dx : dx_member_.matrix(), caches_[j]);
        if (j > 0)
          detail::elementwise_blocks(x.rows, slot_block, [&](index_t first, index_t last) {
            for (index_t t = first; t < last; ++t) {
              T* out = dx.row(t);
              const T* in = dx_member_.data() + t * d;
              for (index_t c = 0; c < d; ++c) out[c] += in[c];
            }
          });
      }
    }
    // Softmax over S with temperature τ.
    double mean = 0;
    for (index_t j = 0; j < r; ++j) mean += double(alpha_[j]) * g[j];
    const double inv_tau = 1.0 / config_.temperature;
    for (index_t j = 0; j < r; ++j)
      combine_.grad[selected_[j]] += T(inv_tau * double(alpha_[j]) * (g[j] - mean));
  }

  // Accounting. Parameters owned here: a_l (M). Per token means per routed assignment (the layer
  // multiplies by K): WeightSpace one combined expert (P_e, F_e); OutputSpace r member experts.
  // The materialization is not in flops_per_token(): materialization_flops() gives it per forward
  // (2 FLOPs per multiply-add, r per element of W_l), 0 for OutputSpace and once frozen.
  index_t total_parameters() const { return members(); }
  double active_parameters_per_token() const {
    return double(weight_space ? 1 : members_used()) * double(pool_->parameters_per_expert());
  }
  double flops_per_token() const { return double(weight_space ? 1 : members_used()) * pool_->flops_per_expert(); }
  double materialization_flops() const {
    if (!weight_space || frozen_) return 0.0;
    return 2.0 * double(members_used()) * double(experts()) * double(pool_->parameters_per_expert());
  }

 private:
  static constexpr index_t slot_block = 64;
  static constexpr index_t element_block = 1 << 14;

  void check(ConstMatrixView<T> x, const Dispatch<T>& dispatch) const {
    expect_shape(name, "x", x, dispatch.tokens, d_model());
    expect_equal(name, "dispatch.experts", experts(), dispatch.experts);
  }
  cpu_kernels::GroupedFFNShape shape() const { return {d_model(), hidden()}; }

  // The selected members in increasing index order and their renormalized softmax weights.
  void compute_coefficients(std::vector<std::int32_t>& selected, std::vector<T>& alpha) const {
    const index_t M = members(), r = members_used();
    selected.resize(static_cast<std::size_t>(r));
    if (r == M) {
      for (index_t m = 0; m < M; ++m) selected[m] = std::int32_t(m);
    } else {
      select_topk(combine_.value.data(), M, r, selected.data());
      std::sort(selected.begin(), selected.end());
    }
    const double inv_tau = 1.0 / config_.temperature;
    double top = -INFINITY;
    for (const std::int32_t m : selected) top = std::max(top, double(combine_.value[m]) * inv_tau);
    std::vector<double> e(static_cast<std::size_t>(r));
    double z = 0;
    for (index_t j = 0; j < r; ++j) z += e[j] = std::exp(double(combine_.value[selected[j]]) * inv_tau - top);
    alpha.resize(static_cast<std::size_t>(r));
    for (index_t j = 0; j < r; ++j) alpha[j] = T(e[j] / z);
  }

  // One of w1, w2, b1, b2: the pool's member-0 slab (member m at m·size), its grad, and the
  // combined tensor with its gradient.
  struct Segment {
    const T* pool;
    T* pool_grad;
    T* combined;
    const T* combined_grad;
    index_t size;
  };
  std::vector<Segment> segments() {
    pool_type& p = *pool_;
    const index_t E = experts(), d = d_model(), G = hidden(), H = Act::fan * G;
    cw1_.resize({E, d, H});
    cw2_.resize({E, G, d});
    cgw1_.resize({E, d, H});
    cgw2_.resize({E, G, d});
    std::vector<Segment> s{{p.w1().value.data(), p.w1().grad.data(), cw1_.data(), cgw1_.data(), p.member_w1_size()},
                           {p.w2().value.data(), p.w2().grad.data(), cw2_.data(), cgw2_.data(), p.member_w2_size()}};
    if (p.has_bias()) {
      cb1_.resize({E, H});
      cb2_.resize({E, d});
      cgb1_.resize({E, H});
      cgb2_.resize({E, d});
      s.push_back({p.b1().value.data(), p.b1().grad.data(), cb1_.data(), cgb1_.data(), p.member_b1_size()});
      s.push_back({p.b2().value.data(), p.b2().grad.data(), cb2_.data(), cgb2_.data(), p.member_b2_size()});
    }
    return s;
  }

  // W_l = Σ_j α_j W_{selected j}, elementwise in member order (the first assigns).
  void materialize() {
    const index_t r = index_t(selected_.size());
    for (const Segment& seg : segments()) {
      detail::elementwise_blocks(seg.size, element_block, [&](index_t first, index_t last) {
        const T* w0 = seg.pool + selected_[0] * seg.size;
        for (index_t i = first; i < last; ++i) seg.combined[i] = alpha_[0] * w0[i];
        for (index_t j = 1; j < r; ++j) {
          const T* w = seg.pool + selected_[j] * seg.size;
          const T a = alpha_[j];
          for (index_t i = first; i < last; ++i) seg.combined[i] += a * w[i];
        }
      });
    }
  }

  // dW_m += α_j·dW_l and g_j += <dW_l, W_m>, one pass over each segment by fixed element blocks
  // (partial dot products in double, added in block order: independent of the thread count).
  void scatter_combined_gradient(std::vector<double>& g) {
    const index_t r = index_t(selected_.size());
    for (const Segment& seg : segments()) {
      const index_t blocks = std::max<index_t>(1, seg.size / element_block);
      std::vector<double> partial(static_cast<std::size_t>(blocks * r), 0.0);
      detail::elementwise_blocks(seg.size, element_block, [&](index_t first, index_t last) {
        double* p = partial.data() + (first / element_block) * r;
        for (index_t j = 0; j < r; ++j) {
          const index_t offset = selected_[j] * seg.size;
          const T* w = seg.pool + offset;
          T* gw = seg.pool_grad + offset;
          const T a = alpha_[j];
          double acc = 0;
          for (index_t i = first; i < last; ++i) {
            const T dw = seg.combined_grad[i];
            gw[i] += a * dw;
            acc += double(dw) * double(w[i]);
          }
          p[j] += acc;
        }
      });
      for (index_t b = 0; b < blocks; ++b)
        for (index_t j = 0; j < r; ++j) g[j] += partial[b * r + j];
    }
  }

  pool_type* pool_;
  SaMoEConfig config_;
  Parameter<T> combine_;  // a_l [M]
  bool frozen_ = false;
  index_t forward_assignments_ = -1;
  // Of the last forward (or freeze): selected members (increasing) and their weights.
  std::vector<std::int32_t> selected_;
  std::vector<T> alpha_;
  // Slot j belongs to the j-th selected member (one cache in weight space).
  std::vector<cpu_kernels::GroupedFFNCache<T>> caches_;
  // WeightSpace: W_l and dW_l.
  Tensor<T> cw1_, cw2_, cb1_, cb2_, cgw1_, cgw2_, cgb1_, cgb2_;
  // OutputSpace: per-member slot outputs, backward scratch.
  std::vector<Tensor<T>> member_ys_;
  Tensor<T> scaled_dys_, dx_member_;
};

template <class T, Activation Act, class Backend = cpu>
using WeightSpaceSaMoE = SaMoEExperts<T, Act, WeightSpace, Backend>;
template <class T, Activation Act, class Backend = cpu>
using OutputSpaceSaMoE = SaMoEExperts<T, Act, OutputSpace, Backend>;

}  // namespace smoe
