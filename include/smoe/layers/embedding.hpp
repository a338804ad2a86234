#pragma once
// Embedding: token ids → rows of a table, y[t] = W[id_t], "weight" W [V, d].
// backward: dW[v] += Σ_{t : id_t = v} dy[t]. The ids are counting-sorted (stable), and each id's
// row sums its tokens in token order, one work item per block of ids: no two threads write the
// same row and the sum order is fixed, so dW is the same for any thread count.
// The forward keeps the ids (8 bytes per token); there is no input gradient.
#include <algorithm>
#include <cstdint>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

#include "smoe/core/parameter.hpp"
#include "smoe/core/validate.hpp"
#include "smoe/cpu/parallel.hpp"

namespace smoe {

struct EmbeddingConfig {
  index_t vocab = 0;  // V
  index_t d_model = 0;

  void validate(const char* context) const {
    if (vocab < 1) fail(context, ": vocab must be >= 1, got ", vocab);
    if (d_model < 1) fail(context, ": d_model must be >= 1, got ", d_model);
  }
};

template <class T, class Backend = cpu>
class Embedding {
  static_assert(std::is_same_v<Backend, cpu>, "Embedding<T, smoe::cuda> needs <smoe/cuda/embedding.cuh>");

 public:
  using scalar_type = T;
  using backend = cpu;
  static constexpr const char* name = "Embedding";
  bool validate_inputs = validate_by_default;

  explicit Embedding(EmbeddingConfig c) : config_((c.validate(name), c)), weight_({c.vocab, c.d_model}) {}

  index_t vocab() const { return config_.vocab; }
  index_t d_model() const { return config_.d_model; }
  const EmbeddingConfig& config() const { return config_; }
  Parameter<T>& weight() { return weight_; }

  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("weight"), weight_);
  }

  // Accounting: a token reads one row (d parameters) and does no arithmetic.
  index_t total_parameters() const { return config_.vocab * config_.d_model; }
  double active_parameters_per_token() const { return double(config_.d_model); }
  double flops_per_token() const { return 0.0; }

  // ids [N] in [0, V); y [N, d]. Throws naming the first id out of range, before writing y.
  void forward(std::span<const std::int32_t> ids, MatrixView<T> y) { forward_impl(ids, y); }
  void forward(std::span<const std::int64_t> ids, MatrixView<T> y) { forward_impl(ids, y); }

  // dy [N, d] of the last forward's ids; accumulates weight.grad.
  void backward(ConstMatrixView<T> dy) {
    if (!ready_) fail(name, ": backward called before forward");
    const index_t tokens = static_cast<index_t>(ids_.size()), V = vocab(), d = d_model();
    expect_shape(name, "dy", dy, tokens, d);
    if (validate_inputs) check_finite(name, "dy", dy);
    if (tokens == 0) return;
    // Stable counting sort of the tokens by id: tokens of id v are order_[offsets_[v] .. offsets_[v+1]).
    offsets_.assign(static_cast<std::size_t>(V) + 1, 0);
    for (index_t id : ids_) ++offsets_[static_cast<std::size_t>(id) + 1];
    for (index_t v = 0; v < V; ++v) offsets_[v + 1] += offsets_[v];
    order_.resize(ids_.size());
    next_.assign(offsets_.begin(), offsets_.end() - 1);
    for (index_t t = 0; t < tokens; ++t) order_[static_cast<std::size_t>(next_[static_cast<std::size_t>(ids_[t])]++)] = t;
    cpu_kernels::parallel_for_blocks(V, id_block, [&](index_t first, index_t last) {
      for (index_t v = first; v < last; ++v) {
        T* g = weight_.grad.data() + v * d;
        for (index_t s = offsets_[v]; s < offsets_[v + 1]; ++s) {
          const T* in = dy.row(order_[static_cast<std::size_t>(s)]);
          for (index_t c = 0; c < d; ++c) g[c] += in[c];
        }
      }
    });
  }

 private:
  static constexpr index_t id_block = 256;  // vocabulary rows per backward work item
  static constexpr index_t row_block = 64;  // tokens per forward work item

  template <class Id>
  void forward_impl(std::span<const Id> ids, MatrixView<T> y) {
    const index_t tokens = static_cast<index_t>(ids.size()), V = vocab(), d = d_model();
    expect_shape(name, "y", y, tokens, d);
    for (index_t t = 0; t < tokens; ++t)
      if (ids[t] < 0 || ids[t] >= V) fail(name, ": ids[", t, "] must be in [0, ", V, "), got ", ids[t]);
    ids_.assign(ids.begin(), ids.end());
    ready_ = true;
    cpu_kernels::parallel_for_blocks(tokens, row_block, [&](index_t first, index_t last) {
      for (index_t t = first; t < last; ++t) std::copy_n(weight_.value.data() + ids_[t] * d, d, y.row(t));
    });
  }

  EmbeddingConfig config_;
  Parameter<T> weight_;
  bool ready_ = false;
  std::vector<index_t> ids_;                    // forward cache
  std::vector<index_t> offsets_, next_, order_;  // backward: counting sort by id
};

}  // namespace smoe
