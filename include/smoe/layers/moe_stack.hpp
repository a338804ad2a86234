#pragma once
// MoEStack<Layer, Pool>: L MoE layers chained with residual connections over one shared pool,
//
//   x_0 = x,   x_{l+1} = x_l + Layer_l(x_l)   (l = 0 … L−1),   y = x_L,   aux = Σ_l aux_l
//
// backward(dy) returns the gradient of Σ y ⊙ dy + Σ_l aux_l: g_L = dy, g_l = g_{l+1} + J_lᵀ g_{l+1}.
// A small helper for tests, examples and benchmarks (a transformer model adds norms and
// attention around the same pattern). Like MoE<>, it does not copy x: the memory passed to
// forward must hold the same values until backward; the inner x_l are the stack's own.
//
// Ownership: the stack owns the pool (on the heap, so its address survives moves of the stack)
// and the layers, built by make_layer(pool, l); each layer holds a non-owning pointer to the pool.
// Parameters are visited once each, under the checkpoint names
//   pool:     Pool::parameter_prefix ("pool.w1" …) or "experts." for a tied FeedForwardExperts set
//   layer l:  "layers.{l}." + for_each_layer_parameter(layer): "router.weight", "experts.w1" (own
//             experts), "combine" (SaMoE), "residual.…" (ResidualMoE), "shared.…" (SharedExpertsMoE)
// NoPool is the pool of layers with their own experts (visits nothing).
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "smoe/core/parameter.hpp"
#include "smoe/experts/expert_pool.hpp"
#include "smoe/experts/feed_forward_experts.hpp"
#include "smoe/layers/accounting.hpp"
#include "smoe/layers/layer_parameters.hpp"
#include "smoe/layers/moe.hpp"
#include "smoe/layers/row_ops.hpp"

namespace smoe {

// The pool of a stack whose layers own their experts.
struct NoPool {
  static constexpr const char* parameter_prefix = "";
  template <class F>
  void for_each_parameter(F&&) {}
  index_t total_parameters() const { return 0; }
  double active_parameters_per_token() const { return 0.0; }
  double flops_per_token() const { return 0.0; }
};

template <class Pool>
constexpr const char* pool_parameter_prefix() {
  if constexpr (requires { Pool::parameter_prefix; })
    return Pool::parameter_prefix;
  else
    return "experts.";  // a tied set (FeedForwardExperts): "experts.w1" [E, d, fan·G]
}

// LayerOutput: what a layer's forward returns (a device layer's keeps its losses on the device,
// and aux_loss is then 0 here: read each layer's read_losses()).
template <class T, class LayerOutput = MoEOutput<T>>
struct StackOutput {
  T aux_loss = 0;                   // Σ_l aux_l
  std::vector<LayerOutput> layers;  // each layer's output (losses, routing statistics)
};

// On the CPU or the device (the layers' backend; a device stack runs on its first layer's stream).
template <class Layer, class Pool = NoPool>
class MoEStack {
 public:
  using scalar_type = typename Layer::scalar_type;
  using T = scalar_type;
  using backend = backend_of_t<Layer>;
  using layer_output = decltype(std::declval<Layer&>().forward(std::declval<ConstMatrixView<T, backend>>(),
                                                               std::declval<MatrixView<T, backend>>(), Mode::eval));
  static constexpr const char* name = "MoEStack";

  // Layers over a shared pool: make_layer(Pool&, index_t l) returns layer l.
  template <class Make>
  MoEStack(Pool pool, index_t layers, Make&& make_layer) : pool_(std::make_unique<Pool>(std::move(pool))) {
    build(layers, [&](index_t l) { return make_layer(*pool_, l); });
  }
  // Layers with their own experts: make_layer(index_t l) returns layer l.
  template <class Make>
    requires std::is_same_v<Pool, NoPool>
  MoEStack(index_t layers, Make&& make_layer) : pool_(std::make_unique<Pool>()) {
    build(layers, make_layer);
  }

  index_t layers() const { return index_t(layers_.size()); }
  index_t d_model() const { return layers_.front().d_model(); }
  Pool& pool() { return *pool_; }
  const Pool& pool() const { return *pool_; }
  Layer& layer(index_t l) { return layers_.at(static_cast<std::size_t>(l)); }
  const Layer& layer(index_t l) const { return layers_.at(static_cast<std::size_t>(l)); }

  template <class F>
  void for_each_parameter(F&& f) {
    pool_->for_each_parameter(with_prefix(pool_parameter_prefix<Pool>(), f));
    for (index_t l = 0; l < layers(); ++l)
      for_each_layer_parameter(layers_[l], with_prefix("layers." + std::to_string(l) + ".", f));
  }

  StackOutput<T, layer_output> forward(ConstMatrixView<T, backend> x, MatrixView<T, backend> y, Mode mode = Mode::eval) {
    const index_t tokens = x.rows, d = d_model();
    expect_shape(name, "x", x, tokens, d);
    expect_shape(name, "y", y, tokens, d);
    StackOutput<T, layer_output> out;
    h_.resize(layers_.size());
    ConstMatrixView<T, backend> in = x;
    for (index_t l = 0; l < layers(); ++l) {
      follow_stream(h_[l]);
      h_[l].resize({tokens, d});
      const MatrixView<T, backend> next = h_[l].matrix();
      out.layers.push_back(layers_[l].forward(in, next, mode));
      if constexpr (!std::is_pointer_v<decltype(out.layers.back().aux_loss)>) out.aux_loss += out.layers.back().aux_loss;
      RowOps<backend>::add(in, ConstMatrixView<T, backend>(next), next, stream());  // x_{l+1} = x_l + Layer_l(x_l)
      in = next;
    }
    RowOps<backend>::copy(in, y, stream());
    tokens_ = tokens;
    return out;
  }

  void backward(ConstMatrixView<T, backend> dy, MatrixView<T, backend> dx) {
    if (tokens_ < 0) fail(name, ": backward called before forward");
    const index_t d = d_model();
    expect_shape(name, "dy", dy, tokens_, d);
    expect_shape(name, "dx", dx, tokens_, d);
    follow_stream(g_);
    follow_stream(dl_);
    g_.resize({tokens_, d});
    dl_.resize({tokens_, d});
    RowOps<backend>::copy(dy, g_.matrix(), stream());
    for (index_t l = layers() - 1; l >= 0; --l) {
      layers_[l].backward(std::as_const(g_).matrix(), dl_.matrix());
      // g_l = g_{l+1} + J_lᵀ g_{l+1}
      RowOps<backend>::add(std::as_const(dl_).matrix(), std::as_const(g_).matrix(), g_.matrix(), stream());
    }
    RowOps<backend>::copy(std::as_const(g_).matrix(), dx, stream());
  }

  // A device stack's stream: its first layer's.
  auto stream() const { return detail::stream_of(layers_.front()); }

  // Accounting of the whole stack, the pool counted once (no attention or embeddings here).
  ModelAccounting accounting() const {
    ModelAccounting a;
    a.add_shared(*pool_);
    for (const Layer& layer : layers_) a.add_layer(layer);
    return a;
  }
  index_t total_parameters() const { return accounting().total_parameters; }
  double active_parameters_per_token() const { return accounting().active_parameters_per_token; }
  double flops_per_token() const { return accounting().flops_per_token; }
  double materialization_flops() const { return accounting().materialization_flops; }

 private:
  template <class Make>
  void build(index_t layers, Make&& make) {
    if (layers < 1) fail(name, ": layers must be >= 1, got ", layers);
    layers_.reserve(static_cast<std::size_t>(layers));
    for (index_t l = 0; l < layers; ++l) layers_.push_back(make(l));
    for (index_t l = 1; l < layers; ++l)
      expect_equal(name, "d_model of every layer (= layer 0's)", layers_[0].d_model(), layers_[l].d_model());
  }

  // Device buffers allocate on the stack's stream (no-op on the CPU).
  void follow_stream(Tensor<T, backend>& t) {
    if constexpr (requires { t.set_stream(stream()); }) t.set_stream(stream());
  }

  std::unique_ptr<Pool> pool_;
  std::vector<Layer> layers_;
  index_t tokens_ = -1;
  std::vector<Tensor<T, backend>> h_;  // x_1 … x_L
  Tensor<T, backend> g_, dl_;
};

}  // namespace smoe
