#pragma once
// ExpertParallel<Comm, R, X, C, Losses...>: an MoE layer whose E experts are split over the P ranks
// of a communicator (dist/communicator.hpp) in contiguous blocks: rank r owns the global experts
// [r·E/P, (r+1)·E/P), and its expert pool X holds only those E/P experts. The router is replicated.
//
//   forward:  route own tokens (global ids) → Dispatch (CSR by global expert, so slots are also
//             sorted by owner rank) → exchange counts [P × E/P] (one all-to-all of ints) → send
//             each slot's token row to its owner (all-to-all-v) → the owner reorders the received
//             rows by (local expert, source rank, sender's slot order), runs its experts with the
//             existing grouped kernels, returns the ungated outputs the reverse way → the home rank
//             combines them with its gates (no gate travels).
//   backward: the reverse path: combiner⁻¹ on the home rank → slot output gradients to the owners
//             → expert backward there (expert weight gradients stay on the owner: every token
//             routed to an expert arrives at its owner, so its gradient is complete) → slot input
//             gradients back → dx[t] = Σ_k of them; router backward on the home rank, then the
//             router's gradients of this backward are summed over ranks (all-reduce).
//
// Parameter gradients are those of the global objective Σ_ranks Σ(y ⊙ dy) + aux_loss, where a
// global-scope loss (losses/balance_loss.hpp: LossScope) counts once for the whole batch and a
// local-scope loss once per rank. They accumulate; call zero_grad.
//
// Every rank takes part in every collective, with 0 tokens, 0 received rows or unchosen experts
// too; receive counts come only from the exchanged counts. A rank whose input is rejected tells
// the others first (one all_agree), so all ranks throw instead of some waiting. At construction
// one all-reduce compares the configuration of every rank (E, k, d, scalar type, router and expert
// types, local experts, expert d and hidden size, losses) and every rank throws smoe::error
// naming a mismatch.
// Capacity (`capacity`, MoE's CapacityPolicy, position priority) is per expert over the global
// batch: C = ceil(capacity_factor · T_global · K / E), the assignments kept in the order (choice j,
// then global token, ranks' tokens in rank order), exactly as one process on the concatenated batch.
// One all-reduce of the per-(rank, expert, choice) counts lets each rank drop its own assignments
// locally, before any row travels.
// Not here yet: capacity with gate priority (the order needs every rank's gates), routers that are
// not token-choice (expert choice, BASE, S-BASE: their assignment needs the global batch), fused
// forward_weighted experts (the owner cannot apply a gate it does not have).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <tuple>
#include <typeinfo>
#include <vector>

#include "smoe/combine/weighted_sum.hpp"
#include "smoe/core/dispatch.hpp"
#include "smoe/core/parameter.hpp"
#include "smoe/core/validate.hpp"
#include "smoe/dist/communicator.hpp"
#include "smoe/dist/data_parallel.hpp"
#include "smoe/experts/experts.hpp"
#include "smoe/layers/moe.hpp"
#include "smoe/layers/moe_check.hpp"
#include "smoe/layers/routing_stats.hpp"
#include "smoe/losses/balance_loss.hpp"
#include "smoe/routing/capacity.hpp"
#include "smoe/routing/routing.hpp"

namespace smoe {

template <Communicator Comm, class R, class X, class C = detail::default_combiner_t<X>, class... Losses>
class ExpertParallel {
  static_assert(check_moe<R, X, C, Losses...>());
  static_assert(std::is_same_v<backend_of_t<X>, cpu>, "ExpertParallel: CPU parts (the NCCL path comes later)");

 public:
  using scalar_type = typename X::scalar_type;
  using T = scalar_type;
  static constexpr const char* name = "ExpertParallel";

  bool validate_inputs = validate_by_default;
  // Expert capacity over the global batch (position priority only); dropless by default.
  CapacityPolicy capacity{};

  // `local_experts` holds this rank's E/P experts; `router` routes to all E. The communicator is
  // referenced, not copied: it must outlive the layer.
  ExpertParallel(Comm& comm, R router, X local_experts, C combiner = {}, Losses... losses)
      : comm_(&comm), router_(std::move(router)), experts_(std::move(local_experts)),
        combiner_(std::move(combiner)), losses_(losses...) {
    check_configuration();
    const index_t E = router_.experts(), P = comm_->size();
    if (E % P != 0) fail(name, ": router experts E = ", E, " must be a multiple of the ranks P = ", P);
    expect_equal(name, "local experts (= E / P)", E / P, experts_.experts());
    expect_equal(name, "router.d_model() (= experts.d_model())", experts_.d_model(), router_.d_model());
  }

  index_t d_model() const { return experts_.d_model(); }
  index_t n_experts() const { return router_.experts(); }
  index_t local_experts() const { return experts_.experts(); }
  index_t first_expert() const { return index_t(comm_->rank()) * local_experts(); }
  index_t k() const { return router_.k(); }
  R& router() { return router_; }
  X& experts() { return experts_; }
  C& combiner() { return combiner_; }
  std::tuple<Losses...>& losses() { return losses_; }
  Comm& communicator() { return *comm_; }
  const Routing<T>& routing() const { return routing_; }
  const Dispatch<T>& dispatch() const { return dispatch_; }
  // The router's ids with capacity-dropped assignments set to −1: what the experts computed.
  const Tensor<std::int32_t>& dispatched_experts() const { return capacity.enabled() ? dispatched_ : routing_.experts; }
  // Rows this rank's experts computed in the last forward (from all ranks).
  index_t received_rows() const { return local_dispatch_.assignments(); }

  // Parameters under their layer names: "router.*" replicated, "experts.*" this rank's shard
  // (leading dimension E/P, global experts first_expert() + i). `sharded` tells which is which;
  // `sharding` says how allreduce_gradients (dist/data_parallel.hpp) treats them: the shard stays
  // on its owner, the router's gradient was already summed over ranks in backward.
  template <class F>
  void for_each_parameter(F&& f) {
    if constexpr (HasParameters<R>) router_.for_each_parameter(with_prefix("router.", f));
    experts_.for_each_parameter(with_prefix("experts.", f));
  }
  // The router's step counter ("router.step": its expert-dropout masks), replicated like the router.
  template <class F>
  void for_each_counter(F&& f) {
    if constexpr (HasCounters<R>) router_.for_each_counter(with_prefix("router.", f));
  }
  static bool sharded(std::string_view parameter_name) { return parameter_name.starts_with("experts."); }
  static GradientSharding sharding(std::string_view parameter_name) {
    return sharded(parameter_name) ? GradientSharding::sharded : GradientSharding::reduced;
  }

  MoEOutput<T> forward(ConstMatrixView<T> x, MatrixView<T> y, Mode mode = Mode::eval) {
    const index_t tokens = x.rows, d = d_model(), E = n_experts(), K = k();
    // Input checks and the local routing run before the first exchange, under one agreement: a
    // rank whose input or router throws (a hash router without ids, say) takes every rank with it.
    has_forward_ = false;
    agree_on_input([&] {
      expect_shape(name, "x", x, tokens, d);
      expect_shape(name, "y", y, tokens, d);
      if (validate_inputs) check_finite(name, "x", x);
      capacity.validate(name);
      if (capacity.enabled() && capacity.priority != CapacityPolicy::Priority::position)
        fail(name, ": capacity needs position priority under expert parallelism (gate priority would need every "
                   "rank's gates)");
      router_.forward(x, routing_, mode);
      expect_shape(name, "router output experts", ConstMatrixView<std::int32_t>(routing_.experts.matrix()), tokens, K);
      expect_shape(name, "router output gates", ConstMatrixView<T>(routing_.gates.matrix()), tokens, K);
      build_dispatch(std::as_const(routing_.experts).matrix(), std::as_const(routing_.gates).matrix(), E, dispatch_);
    });
    if (capacity.enabled()) {  // the ids are valid (build_dispatch accepted them): drop, then dispatch again
      routing_.dropped = apply_global_capacity();
      build_dispatch(std::as_const(dispatched_).matrix(), std::as_const(routing_.gates).matrix(), E, dispatch_);
    } else {
      routing_.dropped = 0;
    }
    x_ = x;
    has_forward_ = true;
    plan_exchange();

    // Token rows to the owners, in slot order (= owner order), then the owners' experts.
    send_.resize({dispatch_.assignments(), d});
    for (index_t s = 0; s < dispatch_.assignments(); ++s)
      std::memcpy(send_.data() + s * d, x.row(dispatch_.slot_token[s]), sizeof(T) * std::size_t(d));
    exchange_to_owners(send_, xr_);
    ysr_.resize({xr_.dim(0), d});
    experts_.forward(std::as_const(xr_).matrix(), local_dispatch_, ysr_.matrix());
    exchange_to_homes(ysr_, ys_);
    combiner_.forward(dispatch_, std::as_const(ys_).matrix(), y);

    MoEOutput<T> out;
    auto reduce = [this](std::span<T> values) { comm_->all_reduce_sum(values); };
    std::apply([&](auto&... loss) { ((out.loss_values.push_back(loss_forward(loss, E, reduce))), ...); }, losses_);
    std::size_t i = 0;
    std::apply([&](auto&... loss) { ((out.aux_loss += T(loss.coef) * out.loss_values[i++]), ...); }, losses_);
    if constexpr (HasRouterLoss<R>) {
      out.router_loss = router_.aux_loss();
      out.aux_loss += out.router_loss;
    }
    out.stats = compute_routing_stats(routing_, dispatch_);
    return out;
  }

  void backward(ConstMatrixView<T> dy, MatrixView<T> dx) {
    const index_t tokens = dispatch_.tokens, d = d_model(), E = n_experts(), K = k();
    agree_on_input([&] {
      if (!has_forward_) fail(name, ": backward called before forward");
      expect_shape(name, "dy", dy, tokens, d);
      expect_shape(name, "dx", dx, tokens, d);
      if (validate_inputs) check_finite(name, "dy", dy);
      d_gates_.resize({tokens, K});
      d_logits_.resize({tokens, routing_.logits.rank() == 2 ? routing_.logits.dim(1) : 0});
      d_logits_.zero();
      dys_.resize({dispatch_.assignments(), d});
      combiner_.backward(dispatch_, std::as_const(ys_).matrix(), dy, dys_.matrix(), d_gates_.matrix());
      std::apply([&](auto&... loss) { (loss.backward(routing_, E, d_logits_.matrix(), d_gates_.matrix()), ...); },
                 losses_);
    });

    exchange_to_owners(dys_, dysr_);
    dxr_.resize({xr_.dim(0), d});
    experts_.backward(std::as_const(xr_).matrix(), local_dispatch_, std::as_const(dysr_).matrix(), dxr_.matrix());
    exchange_to_homes(dxr_, dxs_);
    // dx[t] = Σ_k of its slots' input gradients, k in order.
    for (index_t t = 0; t < tokens; ++t) {
      T* row = dx.row(t);
      std::fill(row, row + d, T(0));
      for (index_t j = 0; j < K; ++j)
        if (const std::int32_t s = dispatch_.slot(t, j); s >= 0) {
          const T* g = dxs_.data() + index_t(s) * d;
          for (index_t c = 0; c < d; ++c) row[c] += g[c];
        }
    }
    router_backward_summed(dx);
  }

 private:
  template <class L, class Reduce>
  T loss_forward(L& loss, index_t E, Reduce& reduce) {
    if constexpr (requires { loss.forward(routing_, E, reduce); }) return loss.forward(routing_, E, reduce);
    else return loss.forward(routing_, E);
  }

  // Runs the local checks, then one agreement: every rank throws if any rank's check failed.
  template <class Checks>
  void agree_on_input(Checks&& checks) {
    std::string message;
    try {
      checks();
    } catch (const std::exception& e) {  // any failure here must reach the other ranks
      message = e.what();
    }
    if (!comm_->all_agree(message.empty()))
      fail(message.empty() ? std::string(name) + ": the input of another rank was rejected (see its message)"
                           : message);
  }

  // The configuration of every rank must agree. One all-reduce of [v, v²] per field: all ranks
  // hold the same v exactly when P·Σv² = (Σv)², so every rank reaches the same verdict. The sums
  // are exact in double while P·v² < 2^53: types are compared by a 16-bit hash of their name
  // (a real mismatch escapes with probability 2^-16), sizes below 2^20 for up to 8192 ranks.
  void check_configuration() {
    const auto type_tag = [](const std::type_info& t) {
      std::uint32_t h = 2166136261u;  // FNV-1a of the type's name
      for (const char* c = t.name(); *c; ++c) h = (h ^ std::uint8_t(*c)) * 16777619u;
      return double((h ^ (h >> 16)) & 0xFFFFu);
    };
    index_t hidden = 0;
    if constexpr (requires { experts_.hidden(); }) hidden = experts_.hidden();
    const char* fields[] = {"experts E",   "k",           "d_model",       "scalar type size", "router type",
                            "expert type", "local experts", "expert d_model", "expert hidden size", "losses"};
    const double values[] = {double(router_.experts()), double(router_.k()), double(router_.d_model()),
                             double(sizeof(T)), type_tag(typeid(R)), type_tag(typeid(X)), double(experts_.experts()),
                             double(experts_.d_model()), double(hidden), type_tag(typeid(std::tuple<Losses...>))};
    constexpr std::size_t n = std::size(values);
    std::vector<double> sums(2 * n);
    for (std::size_t i = 0; i < n; ++i) {
      sums[2 * i] = values[i];
      sums[2 * i + 1] = values[i] * values[i];
    }
    comm_->all_reduce_sum(std::span<double>(sums));
    const double P = comm_->size();
    for (std::size_t i = 0; i < n; ++i)
      if (P * sums[2 * i + 1] != sums[2 * i] * sums[2 * i])
        fail(name, ": configuration differs across ranks: ", fields[i], " must be the same on every rank; rank ",
             comm_->rank(), " has ", values[i], ", the mean over the ", comm_->size(), " ranks is ", sums[2 * i] / P);
  }

  // dispatched_ ← routing_.experts with the assignments over the global capacity set to −1; returns
  // how many of this rank's were dropped. Global position order: (choice j, rank, local token), so an
  // assignment (t, j) to expert e is kept iff fewer than C (the limit) of e's assignments precede it: those of
  // every rank at choices < j, of lower ranks at choice j, and this rank's earlier tokens at choice j.
  index_t apply_global_capacity() {
    const index_t P = comm_->size(), r = comm_->rank(), E = n_experts(), K = k(), tokens = routing_.tokens();
    // [T_r per rank | counts per (rank, expert, choice)], exact in double.
    std::vector<double> all(std::size_t(P + P * E * K), 0.0);
    all[std::size_t(r)] = double(tokens);
    double* mine = all.data() + P + r * E * K;
    for (index_t t = 0; t < tokens; ++t)
      for (index_t j = 0; j < K; ++j)
        if (const std::int32_t e = routing_.experts[t * K + j]; e >= 0) mine[e * K + j] += 1;
    comm_->all_reduce_sum(std::span<double>(all));
    index_t global_tokens = 0;
    for (index_t p = 0; p < P; ++p) global_tokens += index_t(all[std::size_t(p)]);
    const double limit = double(capacity.capacity(global_tokens, K, E));
    std::vector<double> before(std::size_t(E * K), 0.0);  // assignments ahead of this rank's, per (e, j)
    for (index_t e = 0; e < E; ++e)
      for (index_t j = 0; j < K; ++j) {
        double n = 0;
        for (index_t p = 0; p < P; ++p)
          for (index_t jj = 0; jj < K; ++jj)
            if (jj < j || (jj == j && p < r)) n += all[std::size_t(P + p * E * K + e * K + jj)];
        before[e * K + j] = n;
      }
    dispatched_ = routing_.experts;
    index_t dropped = 0;
    for (index_t j = 0; j < K; ++j)
      for (index_t t = 0; t < tokens; ++t)
        if (const std::int32_t e = dispatched_[t * K + j]; e >= 0 && before[e * K + j]++ >= limit) {
          dispatched_[t * K + j] = -1;
          ++dropped;
        }
    return dropped;
  }

  // Counts [P × E/P] out and in; the owner's layout (local expert, source rank, sender order).
  void plan_exchange() {
    const index_t P = comm_->size(), El = local_experts();
    send_counts_.resize(std::size_t(P * El));
    for (index_t e = 0; e < P * El; ++e) send_counts_[e] = std::int32_t(dispatch_.count(e));
    recv_counts_.resize(send_counts_.size());
    comm_->all_to_all(send_counts_, recv_counts_);
    send_rows_.assign(std::size_t(P), 0);
    recv_rows_.assign(std::size_t(P), 0);
    std::int64_t received = 0;
    for (index_t p = 0; p < P; ++p)
      for (index_t j = 0; j < El; ++j) {
        send_rows_[p] += send_counts_[p * El + j];
        recv_rows_[p] += recv_counts_[p * El + j];
        received += recv_counts_[p * El + j];
      }
    if (received > std::numeric_limits<std::int32_t>::max())
      fail(name, ": rows received by rank ", comm_->rank(), " must be <= 2^31 - 1, got ", received);
    // wire_to_local_[i]: where the i-th received row (source-rank order) goes in the owner's layout.
    const index_t rows = index_t(received);
    local_dispatch_.tokens = rows;
    local_dispatch_.k = 1;
    local_dispatch_.experts = El;
    local_dispatch_.offsets.assign(std::size_t(El + 1), 0);
    for (index_t j = 0; j < El; ++j) {
      std::int32_t n = 0;
      for (index_t p = 0; p < P; ++p) n += recv_counts_[p * El + j];
      local_dispatch_.offsets[j + 1] = local_dispatch_.offsets[j] + n;
    }
    wire_to_local_.resize(std::size_t(rows));
    std::vector<std::int32_t> next(local_dispatch_.offsets.begin(), local_dispatch_.offsets.end() - 1);
    std::int32_t wire = 0;
    for (index_t p = 0; p < P; ++p)
      for (index_t j = 0; j < El; ++j)
        for (std::int32_t i = 0; i < recv_counts_[p * El + j]; ++i) wire_to_local_[wire++] = next[j]++;
    // Each received row is its own "token" of the local pool; gates stay at home (ungated outputs).
    local_dispatch_.slot_token.resize(std::size_t(rows));
    local_dispatch_.token_slot.resize(std::size_t(rows));
    for (index_t s = 0; s < rows; ++s) local_dispatch_.slot_token[s] = local_dispatch_.token_slot[s] = std::int32_t(s);
    local_dispatch_.slot_gate.assign(std::size_t(rows), T(1));
  }

  // Slot-ordered rows [A, d] of this rank → the owners' layout [received, d].
  void exchange_to_owners(const Tensor<T>& slots, Tensor<T>& local) {
    const index_t d = d_model(), rows = local_dispatch_.assignments();
    wire_.resize({rows, d});
    comm_->all_to_all_rows(slots.data(), send_rows_, wire_.data(), recv_rows_, d);
    local.resize({rows, d});
    for (index_t i = 0; i < rows; ++i)
      std::memcpy(local.data() + index_t(wire_to_local_[i]) * d, wire_.data() + i * d, sizeof(T) * std::size_t(d));
  }

  // The reverse: the owners' layout → slot-ordered rows [A, d] on the home ranks.
  void exchange_to_homes(const Tensor<T>& local, Tensor<T>& slots) {
    const index_t d = d_model(), rows = local_dispatch_.assignments();
    wire_.resize({rows, d});
    for (index_t i = 0; i < rows; ++i)
      std::memcpy(wire_.data() + i * d, local.data() + index_t(wire_to_local_[i]) * d, sizeof(T) * std::size_t(d));
    slots.resize({dispatch_.assignments(), d});
    comm_->all_to_all_rows(wire_.data(), recv_rows_, slots.data(), send_rows_, d);
  }

  // Router backward on this rank's tokens, then the router gradients of this call summed over
  // ranks (gradients accumulated before this call are kept, not summed again).
  void router_backward_summed(MatrixView<T> dx) {
    if constexpr (HasParameters<R>) {
      std::vector<T> before;
      router_.for_each_parameter([&](std::string_view, auto& p) {
        before.insert(before.end(), p.grad.data(), p.grad.data() + p.grad.size());
        p.grad.zero();
      });
      router_.backward(x_, routing_, std::as_const(d_gates_).matrix(), d_logits_.matrix(), dx);
      std::vector<T> summed;
      summed.reserve(before.size());
      router_.for_each_parameter([&](std::string_view, auto& p) {
        summed.insert(summed.end(), p.grad.data(), p.grad.data() + p.grad.size());
      });
      comm_->all_reduce_sum(std::span<T>(summed));
      std::size_t at = 0;
      router_.for_each_parameter([&](std::string_view, auto& p) {
        for (index_t i = 0; i < p.grad.size(); ++i, ++at) p.grad[i] = before[at] + summed[at];
      });
    } else {
      router_.backward(x_, routing_, std::as_const(d_gates_).matrix(), d_logits_.matrix(), dx);
    }
  }

  Comm* comm_;
  R router_;
  X experts_;
  C combiner_;
  std::tuple<Losses...> losses_;
  ConstMatrixView<T> x_;
  bool has_forward_ = false;
  Routing<T> routing_;
  Tensor<std::int32_t> dispatched_;  // routing_.experts after the capacity (when enabled)
  Dispatch<T> dispatch_;        // this rank's tokens by global expert
  Dispatch<T> local_dispatch_;  // the received rows by local expert
  std::vector<std::int32_t> send_counts_, recv_counts_, send_rows_, recv_rows_, wire_to_local_;
  Tensor<T> send_, wire_, xr_, ysr_, ys_;
  Tensor<T> dys_, dysr_, dxr_, dxs_, d_gates_, d_logits_;
};

}  // namespace smoe
