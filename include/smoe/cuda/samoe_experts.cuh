#pragma once
// SaMoEExperts<T, Act, Space, cuda>: experts/samoe_experts.hpp on the device: one MoE layer as a
// learned soft combination α_l = softmax(a_l / τ) (over the r selected members) of the members of
// a device ExpertPool, in weight space (W_l = Σ α_m W_m, then one grouped GEMM) or output space
// (ys = Σ α_m FFN_m(x), a grouped GEMM per member); same parameter ("combine" [M], a layer
// parameter), same forward, backward and freeze() as the CPU handle (its header has the math).
//
// No host synchronization: which members are selected and their weights α are computed on the
// device (one small functor from a_l) and read there by every kernel that needs them. Hence, in
// output space with r < M the r selected members are first gathered into a scratch copy (and
// their gradients scattered back to the pool), r·E·P_e copies per forward, like weight space's
// materialization; with r = M (the default) the members are used in place. The partial dot
// products of ∂L/∂α are summed in double over fixed blocks, as on the CPU. Every kernel runs on
// the pool's stream. top_members (r) below M is limited to 32 (cuda/topk.cuh).
#include <cmath>
#include <cstdint>
#include <string_view>
#include <vector>

#include "smoe/cuda/expert_pool.cuh"
#include "smoe/cuda/topk.cuh"
#include "smoe/experts/samoe_experts.hpp"

namespace smoe {

namespace cuda_kernels {

// selected[0..r) (increasing) and α over them from the logits a [M] (one work item).
template <class T>
struct MemberCoefficients {
  const T* logits;
  acc_t<T>* scratch;  // [M]
  std::int32_t* selected;
  acc_t<T>* alpha;
  index_t M, r;
  double inv_tau;
  SMOE_HOST_DEVICE void operator()(index_t) const {
    for (index_t m = 0; m < M; ++m) scratch[m] = to_acc(logits[m]);
    if (r == M) {
      for (index_t m = 0; m < M; ++m) selected[m] = std::int32_t(m);
    } else {
      topk_row(scratch, M, r, selected, NotRemoved{});
      for (index_t j = 1; j < r; ++j)  // increasing member order, as the CPU's
        for (index_t i = j; i > 0 && selected[i - 1] > selected[i]; --i) {
          const std::int32_t t = selected[i];
          selected[i] = selected[i - 1];
          selected[i - 1] = t;
        }
    }
    double top = -INFINITY, z = 0;
    for (index_t j = 0; j < r; ++j) top = fmax(top, double(scratch[selected[j]]) * inv_tau);
    for (index_t j = 0; j < r; ++j) z += exp(double(scratch[selected[j]]) * inv_tau - top);
    for (index_t j = 0; j < r; ++j) alpha[j] = acc_t<T>(exp(double(scratch[selected[j]]) * inv_tau - top) / z);
  }
};

// out[i] = Σ_j α_j · src_j[i], src_j = members + member(j)·size, member order (weight space's W_l).
template <class T>
struct CombineMembers {
  const T* members;
  index_t size;
  const std::int32_t* selected;  // member(j) = selected[j]
  const acc_t<T>* alpha;
  index_t r;
  T* out;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    acc_t<T> v = alpha[0] * to_acc(members[selected[0] * size + i]);
    for (index_t j = 1; j < r; ++j) v += alpha[j] * to_acc(members[selected[j] * size + i]);
    out[i] = from_acc<T>(v);
  }
};

// pool[selected[j]·size + i] += w_j · src[j·src_stride + i] for every j (distinct members: no
// race); w_j = α_j, or 1 when alpha is null.
template <class T>
struct AddToSelectedMembers {
  T* pool;
  index_t size;
  const std::int32_t* selected;
  const acc_t<T>* alpha;
  index_t r;
  const T* src;
  index_t src_stride;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    for (index_t j = 0; j < r; ++j) {
      const acc_t<T> v = to_acc(src[j * src_stride + i]);
      T& out = pool[selected[j] * size + i];
      out = from_acc<T>(to_acc(out) + (alpha ? alpha[j] * v : v));
    }
  }
};

// out[j·size + i] = members[selected[j]·size + i]: the selected members, gathered.
template <class T>
struct GatherSelectedMembers {
  const T* members;
  index_t size;
  const std::int32_t* selected;
  T* out;
  SMOE_HOST_DEVICE void operator()(index_t idx) const {
    const index_t j = idx / size, i = idx % size;
    out[idx] = members[selected[j] * size + i];
  }
};

// partial[b·r + j] = Σ_{i in block b} a(i)·b_j[i] in double over a flat range [0, n) of rows of
// `row` elements: a(i) = a[(i / row)·a_stride + i % row], b_j = b + member(j)·b_stride with
// member(j) = selected[j] (j when selected is null). Rows from *count on (when count is given) are
// outside the data. Block b covers [b·block, (b+1)·block), the last one up to n.
template <class T>
struct BlockDots {
  const T* a;
  index_t a_stride;
  const T* b;
  index_t b_stride;
  const std::int32_t* selected;
  const std::int32_t* count;
  index_t row, n, block, blocks, r;
  double* partial;
  SMOE_HOST_DEVICE void operator()(index_t idx) const {
    const index_t blk = idx / r, j = idx % r;
    const index_t limit = count ? index_t(*count) * row : n;
    const index_t first = blk * block, last = blk + 1 == blocks ? n : first + block;
    const T* bj = b + (selected ? selected[j] : j) * b_stride;
    double acc = 0;
    for (index_t i = first; i < last && i < limit; ++i)
      acc += double(to_acc(a[(i / row) * a_stride + i % row])) * double(to_acc(bj[i]));
    partial[idx] = acc;
  }
};

// g[j] += Σ_b partial[b·r + j], blocks in order.
struct AddBlockPartials {
  const double* partial;
  double* g;
  index_t blocks, r;
  SMOE_HOST_DEVICE void operator()(index_t j) const {
    double sum = 0;
    for (index_t b = 0; b < blocks; ++b) sum += partial[b * r + j];
    g[j] += sum;
  }
};

// ∂L/∂a_m += (α_m / τ)·(g_m − Σ_j α_j g_j) for the selected members (one work item).
template <class T>
struct CombineGradient {
  const double* g;
  const acc_t<T>* alpha;
  const std::int32_t* selected;
  index_t r;
  double inv_tau;
  T* grad;
  SMOE_HOST_DEVICE void operator()(index_t) const {
    double mean = 0;
    for (index_t j = 0; j < r; ++j) mean += double(alpha[j]) * g[j];
    for (index_t j = 0; j < r; ++j) {
      T& out = grad[selected[j]];
      out = from_acc<T>(to_acc(out) + acc_t<T>(inv_tau * double(alpha[j]) * (g[j] - mean)));
    }
  }
};

// ys[s] = Σ_j α_j · member_ys[j][s] for the assigned slots (output space's combination).
template <class T>
struct SumMemberOutputs {
  const T* member_ys;  // [r, S, d]
  const acc_t<T>* alpha;
  const std::int32_t* count;
  index_t r, S, d;
  T* ys;
  index_t ys_stride;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    const index_t s = i / d, c = i % d;
    if (s >= *count) return;
    acc_t<T> v = alpha[0] * to_acc(member_ys[i]);
    for (index_t j = 1; j < r; ++j) v += alpha[j] * to_acc(member_ys[j * S * d + i]);
    ys[s * ys_stride + c] = from_acc<T>(v);
  }
};

// out[s] = α_j · dys[s] for the assigned slots.
template <class T>
struct ScaleRowsByCoefficient {
  const T* dys;
  index_t dys_stride;
  const acc_t<T>* alpha_j;
  const std::int32_t* count;
  index_t d;
  T* out;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    const index_t s = i / d, c = i % d;
    if (s >= *count) return;
    out[i] = from_acc<T>(*alpha_j * to_acc(dys[s * dys_stride + c]));
  }
};

}  // namespace cuda_kernels

template <class T, Activation Act, class Space>
  requires(std::same_as<Space, WeightSpace> || std::same_as<Space, OutputSpace>)
class SaMoEExperts<T, Act, Space, cuda> {
 public:
  using scalar_type = T;
  using gate_type = acc_t<T>;
  using backend = cuda;
  using activation = Act;
  using space = Space;
  using pool_type = ExpertPool<T, Act, cuda>;
  static constexpr bool weight_space = std::is_same_v<Space, WeightSpace>;
  static constexpr const char* name =
      weight_space ? "SaMoEExperts<WeightSpace, cuda>" : "SaMoEExperts<OutputSpace, cuda>";

  explicit SaMoEExperts(pool_type& pool, SaMoEConfig c = {})
      : pool_(&pool), config_((c.validate(name, pool.members()), c)), combine_({pool.members()}) {
    if (members_used() < members() && members_used() > cuda_kernels::max_topk)
      fail(name, ": top_members below the pool size must be <= ", cuda_kernels::max_topk, " on the device, got ",
           members_used());
    caches_.resize(static_cast<std::size_t>(weight_space ? 1 : members_used()));
    set_stream(pool.stream());
    if (c.init == CombineInit::member) {
      Tensor<T> init({members()});
      for (index_t m = 0; m < members(); ++m) init[m] = from_acc<T>(acc_t<T>(m == c.layer % members() ? c.init_scale : 0.0));
      copy(init, combine_.value);
    }
  }

  // Re-points the handle at `pool` (same shape), and onto its stream.
  void bind(pool_type& pool) {
    expect_same_pool_shape(name, pool_->config(), pool.config());
    pool_ = &pool;
    set_stream(pool.stream());
  }
  pool_type& pool() const { return *pool_; }

  index_t experts() const { return pool_->experts(); }
  index_t d_model() const { return pool_->d_model(); }
  index_t hidden() const { return pool_->hidden(); }
  index_t members() const { return pool_->members(); }
  index_t members_used() const { return config_.top_members > 0 ? config_.top_members : members(); }
  const SaMoEConfig& config() const { return config_; }
  Parameter<T, cuda>& combine() { return combine_; }
  const Parameter<T, cuda>& combine() const { return combine_; }

  // The stream is the pool's (every layer's gradients accumulate into the pool's).
  cuda_stream stream() const { return pool_->stream(); }
  void set_stream(cuda_stream s) {
    if (s != pool_->stream()) fail(name, ": the stream of a pooled layer is its pool's; call pool().set_stream instead");
    combine_.value.set_stream(s);
    combine_.grad.set_stream(s);
    for (auto& c : caches_) c.set_stream(s);
    for (auto* t : {&combined_, &combined_grad_, &gathered_, &gathered_grad_})
      for (auto& seg : *t) seg.set_stream(s);
    for (auto* t : {&member_ys_, &scaled_dys_}) t->set_stream(s);
    for (auto* t : {&scratch_, &alpha_}) t->set_stream(s);
    for (auto* t : {&g_, &partial_}) t->set_stream(s);
    selected_.set_stream(s);
  }

  // α_l over all M members (0 outside the selected ones), from the current logits (waits for the stream).
  std::vector<gate_type> coefficients() {
    compute_coefficients();
    const auto sel = to_host(selected_);
    const auto a = to_host(alpha_);
    std::vector<gate_type> out(static_cast<std::size_t>(members()), gate_type(0));
    for (index_t j = 0; j < members_used(); ++j) out[static_cast<std::size_t>(sel[j])] = a[j];
    return out;
  }

  template <class F>
  void for_each_parameter(F&&) {}  // the pool is the owner's; a_l is a layer parameter
  template <class F>
  void for_each_layer_parameter(F&& f) {
    f(std::string_view("combine"), combine_);
  }

  void freeze()
    requires weight_space
  {
    compute_coefficients();
    materialize();
    frozen_ = true;
  }
  void unfreeze()
    requires weight_space
  {
    frozen_ = false;
  }
  bool frozen() const { return frozen_; }

  void forward(ConstMatrixView<T, cuda> x, const Dispatch<gate_type, cuda>& dispatch, MatrixView<T, cuda> ys) {
    using namespace cuda_kernels;
    check(x, dispatch);
    expect_shape(name, "ys", ys, dispatch.slots(), d_model());
    const cuda_stream s = stream();
    if constexpr (weight_space) {
      if (!frozen_) {
        compute_coefficients();
        materialize();
      }
      grouped_ffn_forward<T, Act>(s, x, dispatch, segment_weights(combined_, 0), shape(), ys, caches_[0],
                                  pool_->gemm_path());
    } else {
      compute_coefficients();
      if (gathers()) gather_selected();
      const index_t S = dispatch.slots(), d = d_model(), r = members_used();
      member_ys_.resize({r, S, d});
      for (index_t j = 0; j < r; ++j)
        grouped_ffn_forward<T, Act>(s, x, dispatch, member_weights(j), shape(),
                                    MatrixView<T, cuda>{member_ys_.data() + j * S * d, S, d}, caches_[j],
                                    pool_->gemm_path());
      for_each_index(s, S * d,
                     SumMemberOutputs<T>{member_ys_.data(), alpha_.data(), dispatch.assignments_device(), r, S, d,
                                         ys.data, ys.stride});
    }
    forward_slots_ = dispatch.slots();
  }

  void backward(ConstMatrixView<T, cuda> x, const Dispatch<gate_type, cuda>& dispatch, ConstMatrixView<T, cuda> dys,
                MatrixView<T, cuda> dx) {
    using namespace cuda_kernels;
    check(x, dispatch);
    expect_shape(name, "dys", dys, dispatch.slots(), d_model());
    expect_shape(name, "dx", dx, x.rows, d_model());
    if (forward_slots_ != dispatch.slots() || !caches_[0].holds(dispatch.slots()))
      fail(name, ": backward needs the forward of the same dispatch first");
    const cuda_stream s = stream();
    const index_t r = members_used(), S = dispatch.slots(), d = d_model();
    g_.resize({r});
    g_.zero();
    if constexpr (weight_space) {
      for (auto& seg : combined_grad_) seg.zero();
      grouped_ffn_backward<T, Act>(s, x, dispatch, segment_weights(combined_, 0), segment_gradients(combined_grad_, 0),
                                   shape(), dys, dx, caches_[0], pool_->gemm_path());
      // dW_m += α_m·dW_l and g_m += <dW_l, W_m>.
      for (index_t k = 0; k < segment_count(); ++k) {
        const index_t size = segment_size(k);
        add_dots(combined_grad_[k].data(), size, pool_value(k), size, selected_.data(), size, size, nullptr, element_block);
        for_each_index(s, size,
                       AddToSelectedMembers<T>{pool_grad(k), size, selected_.data(), alpha_.data(), r,
                                               combined_grad_[k].data(), 0});
      }
    } else {
      // g_j = Σ_s <dys[s], ys_j[s]> over the assigned slots.
      add_dots(dys.data, dys.stride, member_ys_.data(), S * d, nullptr, S * d, d, dispatch.assignments_device(),
               slot_block * d);
      scaled_dys_.resize({S, d});
      if (gathers())
        for (auto& seg : gathered_grad_) seg.zero();
      for (index_t j = 0; j < r; ++j) {
        for_each_index(s, S * d,
                       ScaleRowsByCoefficient<T>{dys.data, dys.stride, alpha_.data() + j, dispatch.assignments_device(),
                                                 d, scaled_dys_.data()});
        // The first member writes dx, the others add theirs in member order.
        grouped_ffn_backward<T, Act>(s, x, dispatch, member_weights(j), member_gradients(j), shape(),
                                     std::as_const(scaled_dys_).matrix(), dx, caches_[j], pool_->gemm_path(), j > 0);
      }
      if (gathers())
        for (index_t k = 0; k < segment_count(); ++k)
          for_each_index(s, segment_size(k),
                         AddToSelectedMembers<T>{pool_grad(k), segment_size(k), selected_.data(), nullptr, r,
                                                 gathered_grad_[k].data(), segment_size(k)});
    }
    for_each_index(s, 1,
                   CombineGradient<T>{g_.data(), alpha_.data(), selected_.data(), r, 1.0 / config_.temperature,
                                      combine_.grad.data()});
  }

  // Accounting as the CPU handle's.
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

  void check(ConstMatrixView<T, cuda> x, const Dispatch<gate_type, cuda>& dispatch) const {
    expect_shape(name, "x", x, dispatch.tokens, d_model());
    expect_equal(name, "dispatch.experts", experts(), dispatch.experts);
  }
  cuda_kernels::GroupedFFNShape shape() const { return {d_model(), hidden()}; }
  // Output space with r < M works on a gathered copy of the selected members.
  bool gathers() const { return !weight_space && members_used() < members(); }

  // Segments w1, w2 (, b1, b2): the pool's member-0 slab of each (member m at m·size).
  index_t segment_count() const { return pool_->has_bias() ? 4 : 2; }
  index_t segment_size(index_t k) const {
    const index_t sizes[4] = {pool_->member_w1_size(), pool_->member_w2_size(), pool_->member_b1_size(),
                              pool_->member_b2_size()};
    return sizes[k];
  }
  Parameter<T, cuda>& pool_parameter(index_t k) const {
    Parameter<T, cuda>* p[4] = {&pool_->w1(), &pool_->w2(), &pool_->b1(), &pool_->b2()};
    return *p[k];
  }
  const T* pool_value(index_t k) const { return pool_parameter(k).value.data(); }
  T* pool_grad(index_t k) const { return pool_parameter(k).grad.data(); }

  // Weights / gradients of member j of `segments` ([j·size …] in each of the 2 or 4 tensors).
  cuda_kernels::ExpertWeights<T> segment_weights(const std::vector<Tensor<T, cuda>>& segments, index_t j) const {
    const bool b = pool_->has_bias();
    return {segments[0].data() + j * segment_size(0), segments[1].data() + j * segment_size(1),
            b ? segments[2].data() + j * segment_size(2) : nullptr, b ? segments[3].data() + j * segment_size(3) : nullptr};
  }
  cuda_kernels::ExpertGradients<T> segment_gradients(std::vector<Tensor<T, cuda>>& segments, index_t j) const {
    const bool b = pool_->has_bias();
    return {segments[0].data() + j * segment_size(0), segments[1].data() + j * segment_size(1),
            b ? segments[2].data() + j * segment_size(2) : nullptr, b ? segments[3].data() + j * segment_size(3) : nullptr};
  }
  // Output space: the j-th selected member, in the pool (r = M: member j) or gathered.
  cuda_kernels::ExpertWeights<T> member_weights(index_t j) const {
    return gathers() ? segment_weights(gathered_, j) : pool_->member_weights(j);
  }
  cuda_kernels::ExpertGradients<T> member_gradients(index_t j) {
    return gathers() ? segment_gradients(gathered_grad_, j) : pool_->member_gradients(j);
  }

  void compute_coefficients() {
    const index_t M = members(), r = members_used();
    scratch_.resize({M});
    selected_.resize({r});
    alpha_.resize({r});
    cuda_kernels::for_each_index(stream(), 1,
                                 cuda_kernels::MemberCoefficients<T>{combine_.value.data(), scratch_.data(), selected_.data(),
                                                                     alpha_.data(), M, r, 1.0 / config_.temperature});
  }

  // W_l = Σ_j α_j W_{selected j}.
  void materialize() {
    resize_segments(combined_, 1);
    resize_segments(combined_grad_, 1);
    for (index_t k = 0; k < segment_count(); ++k)
      cuda_kernels::for_each_index(stream(), segment_size(k),
                                   cuda_kernels::CombineMembers<T>{pool_value(k), segment_size(k), selected_.data(),
                                                                   alpha_.data(), members_used(), combined_[k].data()});
  }

  void gather_selected() {
    const index_t r = members_used();
    resize_segments(gathered_, r);
    resize_segments(gathered_grad_, r);
    for (index_t k = 0; k < segment_count(); ++k)
      cuda_kernels::for_each_index(stream(), r * segment_size(k),
                                   cuda_kernels::GatherSelectedMembers<T>{pool_value(k), segment_size(k), selected_.data(),
                                                                          gathered_[k].data()});
  }

  void resize_segments(std::vector<Tensor<T, cuda>>& segments, index_t copies) {
    segments.resize(static_cast<std::size_t>(segment_count()));
    for (index_t k = 0; k < segment_count(); ++k) {
      segments[k].set_stream(stream());
      segments[k].resize({copies * segment_size(k)});
    }
  }

  // g[j] += Σ_i a(i)·b_j[i] (BlockDots) by fixed blocks, in double, blocks added in order.
  void add_dots(const T* a, index_t a_stride, const T* b, index_t b_stride, const std::int32_t* selected, index_t n,
                index_t row, const std::int32_t* count, index_t block) {
    using namespace cuda_kernels;
    const index_t blocks = std::max<index_t>(1, n / block), r = members_used();
    partial_.resize({blocks * r});
    for_each_index(stream(), blocks * r,
                   BlockDots<T>{a, a_stride, b, b_stride, selected, count, row, n, block, blocks, r, partial_.data()});
    for_each_index(stream(), r, AddBlockPartials{partial_.data(), g_.data(), blocks, r});
  }

  pool_type* pool_;
  SaMoEConfig config_;
  Parameter<T, cuda> combine_;  // a_l [M]
  bool frozen_ = false;
  index_t forward_slots_ = -1;
  // Of the last forward (or freeze), on the device: selected members (increasing) and α.
  Tensor<std::int32_t, cuda> selected_;
  Tensor<gate_type, cuda> alpha_, scratch_;
  Tensor<double, cuda> g_, partial_;  // ∂L/∂α_j; per-block partial dot products
  std::vector<cuda_kernels::GroupedFFNDeviceCache<T>> caches_;  // one per combined member
  // Weight space: W_l and dW_l per segment. Output space with r < M: the selected members and
  // their gradients, gathered.
  std::vector<Tensor<T, cuda>> combined_, combined_grad_, gathered_, gathered_grad_;
  Tensor<T, cuda> member_ys_, scaled_dys_;  // output space: [r, S, d], [S, d]
};

}  // namespace smoe
