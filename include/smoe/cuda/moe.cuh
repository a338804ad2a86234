#pragma once
// MoE<Router, Experts, Combiner, Losses...> of CUDA parts (layers/moe.hpp's layer on the device):
//   forward:  router → build_dispatch → experts over the slots → combiner; losses write their
//             values to device scalars and the aux loss Σ coef_i · L_i (+ a router-owned loss, e.g.
//             noisy top-k's load loss, from the router's aux_loss_on_device()) is summed on the device.
//   backward: combiner⁻¹ → losses → experts⁻¹ (dx) → router⁻¹ (dx +=, router gradients).
// Nothing in forward or backward synchronizes the host: the aux loss and the routing statistics
// stay on the device until asked for (read_losses, routing_stats), and buffers are sized by the
// T·K slots a batch can have, not by the data-dependent assignment count. Every call is ordered
// on the layer's stream (set_stream).
#include <cstdint>
#include <tuple>
#include <vector>

#include "smoe/cuda/capacity.cuh"
#include "smoe/cuda/dispatch.cuh"
#include "smoe/cuda/validate.cuh"
#include "smoe/cuda/weighted_sum.cuh"
#include "smoe/layers/moe.hpp"

namespace smoe {

// What a device forward returns: device pointers, valid until the layer's next forward.
template <class G>
struct MoEDeviceOutput {
  const G* aux_loss = nullptr;     // Σ coef_i · loss_i + the router's own loss (a device scalar)
  const G* loss_values = nullptr;  // loss_i without its coefficient, in template order [n_losses]
  index_t n_losses = 0;
  cuda_stream stream{};
};

namespace cuda_kernels {

// total[0] = Σ coef_i · values_i + the router's own loss (when it has one), total[1] = that router loss.
template <class G, std::size_t N>
struct WeightedTotal {
  G coef[N + 1];
  const G* values;
  const G* router_loss;  // null for routers without their own loss
  G* total;
  index_t n = N;  // a run-time bound: a loop to a constant 0 draws nvcc's "pointless comparison"
  SMOE_HOST_DEVICE void operator()(index_t) const {
    G sum = 0;
    for (index_t i = 0; i < n; ++i) sum += coef[i] * values[i];
    const G router = router_loss ? *router_loss : G(0);
    if (router_loss) sum += router;
    total[0] = sum;
    total[1] = router;
  }
};

}  // namespace cuda_kernels

template <class R, class X, class C, class... Losses>
  requires std::same_as<backend_of_t<X>, cuda>
class MoE<R, X, C, Losses...> {
  static_assert(check_moe<R, X, C, Losses...>());

 public:
  using scalar_type = typename X::scalar_type;
  using gate_type = gate_type_of_t<X>;
  using backend = cuda;
  using T = scalar_type;
  using G = gate_type;
  static constexpr const char* name = "MoE<cuda>";
  static constexpr std::size_t n_losses = sizeof...(Losses);

  // NaN/Inf checks of x and dy copy them to the host and wait for the stream: opt-in on the device.
  bool validate_inputs = false;
  // Expert capacity for token-choice routers (routing/capacity.hpp), applied on the device
  // (cuda/capacity.cuh): the CPU's drops; the count is read by routing_stats().
  CapacityPolicy capacity{};

  MoE(R router, X experts, C combiner = {}, Losses... losses)
      : router_(std::move(router)), experts_(std::move(experts)), combiner_(std::move(combiner)), losses_(losses...) {
    expect_equal(name, "router.experts() (= experts.experts())", experts_.experts(), router_.experts());
    expect_equal(name, "router.d_model() (= experts.d_model())", experts_.d_model(), router_.d_model());
    set_stream(experts_.stream());
  }

  index_t d_model() const { return experts_.d_model(); }
  index_t n_experts() const { return experts_.experts(); }
  index_t k() const { return router_.k(); }
  R& router() { return router_; }
  const R& router() const { return router_; }
  X& experts() { return experts_; }
  const X& experts() const { return experts_; }
  C& combiner() { return combiner_; }
  std::tuple<Losses...>& losses() { return losses_; }
  const Routing<G, cuda>& routing() const { return routing_; }
  const Dispatch<G, cuda>& dispatch() const { return dispatch_; }
  // The router's ids with capacity-dropped assignments set to −1: what the experts computed.
  const Tensor<std::int32_t, cuda>& dispatched_experts() const {
    return capacity_applied_ ? dispatched_ : routing_.experts;
  }

  cuda_stream stream() const { return stream_; }
  void set_stream(cuda_stream s) {
    stream_ = s;
    if constexpr (requires { router_.set_stream(s); }) router_.set_stream(s);
    experts_.set_stream(s);
    dispatch_.set_stream(s);
    dispatched_.set_stream(s);
    capacity_work_.set_stream(s);
    for (auto* t : {&ys_, &dys_}) t->set_stream(s);
    for (auto* t : {&d_gates_, &d_logits_, &loss_values_, &aux_loss_}) t->set_stream(s);
  }

  template <class F>
  void for_each_parameter(F&& f) {
    if constexpr (HasParameters<R>) router_.for_each_parameter(with_prefix("router.", f));
    experts_.for_each_parameter(with_prefix("experts.", f));
  }
  template <class F>
  void for_each_counter(F&& f) {
    if constexpr (HasCounters<R>) router_.for_each_counter(with_prefix("router.", f));
  }

  MoEDeviceOutput<G> forward(ConstMatrixView<T, cuda> x, MatrixView<T, cuda> y, Mode mode = Mode::eval) {
    using namespace cuda_kernels;
    const index_t tokens = x.rows, d = d_model(), E = n_experts();
    expect_shape(name, "x", x, tokens, d);
    expect_shape(name, "y", y, tokens, d);
    capacity.validate(name);
    if constexpr (requires { R::token_choice; })
      if (!R::token_choice && capacity.enabled())
        fail(name, ": capacity applies to token-choice routers; ", R::name, " sets its own capacity");
    if (validate_inputs) check_finite(name, "x", x, stream_);
    x_ = x;
    has_forward_ = true;
    router_.forward(x_, routing_, mode);
    expect_shape(name, "router output experts", std::as_const(routing_.experts).matrix(), tokens, k());
    capacity_applied_ = capacity.enabled();
    if (capacity_applied_)
      apply_capacity(capacity, E, std::as_const(routing_.experts).matrix(), std::as_const(routing_.gates).matrix(),
                     dispatched_, capacity_work_, stream_);
    const Tensor<std::int32_t, cuda>& ids = capacity_applied_ ? dispatched_ : routing_.experts;
    build_dispatch(ids.matrix(), std::as_const(routing_.gates).matrix(), E, dispatch_, stream_);
    ys_.resize({dispatch_.slots(), d});
    experts_.forward(x_, dispatch_, ys_.matrix());
    combiner_.forward(dispatch_, std::as_const(ys_).matrix(), y);

    loss_values_.resize({static_cast<index_t>(n_losses) + 1});
    aux_loss_.resize({2});
    std::size_t i = 0;
    std::apply([&](auto&... loss) { (loss.forward(routing_, E, loss_values_.data() + i++), ...); }, losses_);
    const G* router_loss = nullptr;
    if constexpr (requires { router_.aux_loss_on_device(); }) router_loss = router_.aux_loss_on_device();
    WeightedTotal<G, n_losses> total{{}, loss_values_.data(), router_loss, aux_loss_.data()};
    i = 0;
    std::apply([&](auto&... loss) { ((total.coef[i++] = G(loss.coef)), ...); }, losses_);
    for_each_index(stream_, 1, total);
    return {aux_loss_.data(), loss_values_.data(), static_cast<index_t>(n_losses), stream_};
  }

  void backward(ConstMatrixView<T, cuda> dy, MatrixView<T, cuda> dx) {
    using namespace cuda_kernels;
    const index_t tokens = dispatch_.tokens, d = d_model(), E = n_experts(), K = k();
    if (!has_forward_) fail(name, ": backward called before forward");
    expect_shape(name, "dy", dy, tokens, d);
    expect_shape(name, "dx", dx, tokens, d);
    if (validate_inputs) check_finite(name, "dy", dy, stream_);
    d_gates_.resize({tokens, K});
    d_logits_.resize({tokens, routing_.logits.rank() == 2 ? routing_.logits.dim(1) : 0});
    d_logits_.zero();
    dys_.resize({dispatch_.slots(), d});
    combiner_.backward(dispatch_, std::as_const(ys_).matrix(), dy, dys_.matrix(), d_gates_.matrix());
    std::apply([&](auto&... loss) { (loss.backward(routing_, E, d_logits_.matrix(), d_gates_.matrix()), ...); },
               losses_);
    experts_.backward(x_, dispatch_, std::as_const(dys_).matrix(), dx);
    router_.backward(x_, routing_, std::as_const(d_gates_).matrix(), d_logits_.matrix(), dx);
  }

  // The losses of the last forward on the host (waits for the stream).
  MoEOutput<G> read_losses() const {
    MoEOutput<G> out;
    const auto values = to_host(loss_values_);
    out.loss_values.assign(values.data(), values.data() + n_losses);
    const auto aux = to_host(aux_loss_);
    out.aux_loss = aux[0];
    out.router_loss = aux[1];
    return out;
  }
  // Routing statistics of the last forward (copies the routing to the host; waits for the stream).
  RoutingStats routing_stats() const {
    Routing<G> host;
    host.logits = to_host(routing_.logits);
    host.experts = to_host(routing_.experts);
    host.gates = to_host(routing_.gates);
    host.dropped = capacity_applied_ ? to_host(capacity_work_.dropped)[0] : 0;
    return compute_routing_stats(host, to_host(dispatch_));
  }
  // Whether the last forward's router produced ids outside [-1, E) (waits for the stream).
  bool had_invalid_ids() const { return to_host(dispatch_.invalid_ids)[0] != 0; }

 private:
  R router_;
  X experts_;
  C combiner_;
  std::tuple<Losses...> losses_;
  cuda_stream stream_{};
  ConstMatrixView<T, cuda> x_;
  bool has_forward_ = false;
  Routing<G, cuda> routing_;
  Dispatch<G, cuda> dispatch_;
  bool capacity_applied_ = false;
  Tensor<std::int32_t, cuda> dispatched_;  // the ids after capacity, when it applies
  CapacityWorkspace capacity_work_;
  Tensor<T, cuda> ys_, dys_;
  Tensor<G, cuda> d_gates_, d_logits_, loss_values_, aux_loss_;
};

}  // namespace smoe
