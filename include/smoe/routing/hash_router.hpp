#pragma once
// HashRouter: hash layers (Roller et al. 2021, "Hash Layers For Large Sparse Models"). No learned
// parameters: token t goes to the single expert
//   e(t) = philox4x32(seed, uint64(id_t))[0] mod E
// of its caller-provided int64 token id, with gate 1. This is the paper's best variant, a fixed
// random table from token id to expert, in closed form: uniform over experts in expectation (the
// modulo bias is below E / 2^32) and identical on every backend. Negative ids hash their bit pattern.
// Nothing is differentiable: the router has no gradient and adds nothing to dx. routing.logits
// is [T, 0], so logit-based losses (Switch, z, entropy) refuse it; ImportanceLoss (gates) works.
// Ids are passed with set_token_ids before forward; the router keeps a copy until replaced.
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "smoe/core/config.hpp"
#include "smoe/core/error.hpp"
#include "smoe/core/rng.hpp"
#include "smoe/routing/routing.hpp"

namespace smoe {

struct HashRouterConfig {
  index_t d_model = 0;
  index_t experts = 0;
  std::uint64_t seed = 0;  // picks the table

  void validate(const char* context) const {
    if (d_model < 1) fail(context, ": d_model must be >= 1, got ", d_model);
    if (experts < 1) fail(context, ": experts must be >= 1, got ", experts);
  }
};

// HashRouter<T, cuda> is the CUDA backend's (smoe/cuda/hash_router.cuh).
template <class T, class Backend = cpu>
class HashRouter {
  static_assert(std::is_same_v<Backend, cpu>, "HashRouter<T, cuda> needs <smoe/cuda/hash_router.cuh>");

 public:
  using scalar_type = T;
  using backend = cpu;
  static constexpr const char* name = "HashRouter";

  explicit HashRouter(HashRouterConfig config) : config_((config.validate(name), config)) {}

  index_t experts() const { return config_.experts; }
  index_t k() const { return 1; }
  index_t d_model() const { return config_.d_model; }
  const HashRouterConfig& config() const { return config_; }

  template <class F>
  void for_each_parameter(F&&) {}  // no parameters

  // The token ids of the next forward(s), one per row of x; copied.
  void set_token_ids(std::span<const std::int64_t> ids) {
    ids_.assign(ids.begin(), ids.end());
    has_ids_ = true;
  }
  std::span<const std::int64_t> token_ids() const { return ids_; }

  // The expert of one token id (host and device).
  SMOE_HOST_DEVICE static std::int32_t expert_of(std::int64_t id, std::uint64_t seed, index_t experts) {
    return static_cast<std::int32_t>(philox4x32(seed, static_cast<std::uint64_t>(id))[0] %
                                     static_cast<std::uint64_t>(experts));
  }
  std::int32_t expert_of(std::int64_t id) const { return expert_of(id, config_.seed, config_.experts); }

  void forward(ConstMatrixView<T> x, Routing<T>& out, Mode) {
    expect_shape(name, "x", x, x.rows, d_model());
    const index_t tokens = x.rows;
    if (!has_ids_) fail(name, ": token ids: expected ", tokens, ", got none (call set_token_ids before forward)");
    if (index_t(ids_.size()) != tokens) fail(name, ": token ids: expected ", tokens, ", got ", ids_.size());
    out.logits.resize({tokens, 0});
    out.experts.resize({tokens, 1});
    out.gates.resize({tokens, 1});
    for (index_t t = 0; t < tokens; ++t) out.experts[t] = expert_of(ids_[static_cast<std::size_t>(t)]);
    out.gates.fill(T(1));
  }

  // No gradient: the gates are constants and the choice does not depend on x.
  void backward(ConstMatrixView<T> x, const Routing<T>&, ConstMatrixView<T> d_gates, MatrixView<T> d_logits,
                MatrixView<T> dx) const {
    const index_t tokens = x.rows;
    expect_shape(name, "x", x, tokens, d_model());
    expect_shape(name, "d_gates", d_gates, tokens, 1);
    expect_equal(name, "d_logits rows", tokens, d_logits.rows);
    expect_shape(name, "dx", dx, tokens, d_model());
  }

 private:
  HashRouterConfig config_;
  std::vector<std::int64_t> ids_;
  bool has_ids_ = false;
};

}  // namespace smoe
