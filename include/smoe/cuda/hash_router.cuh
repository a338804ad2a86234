#pragma once
// HashRouter<T, cuda>: hash layers (routing/hash_router.hpp) on the device: token t goes to expert
// philox4x32(seed, id_t)[0] mod E with gate 1, the CPU's table (the same __host__ __device__
// function). Ids are device int64 tensors passed with set_token_ids (copied on the device).
// No parameters, no gradient; routing.logits is [T, 0] (the logit losses refuse it).
#include <cstdint>

#include "smoe/cuda/device_tensor.cuh"
#include "smoe/routing/hash_router.hpp"
#include "smoe/cuda/routing.cuh"
#include "smoe/routing/routing.hpp"

namespace smoe {

namespace cuda_kernels {
template <class G>
struct HashRoute {
  const std::int64_t* ids;
  std::uint64_t seed;
  index_t experts;
  std::int32_t* out;
  G* gates;
  SMOE_HOST_DEVICE void operator()(index_t t) const {
    out[t] = HashRouter<float>::expert_of(ids[t], seed, experts);
    gates[t] = G(1);
  }
};
}  // namespace cuda_kernels

template <class T>
class HashRouter<T, cuda> {
 public:
  using scalar_type = T;
  using gate_type = acc_t<T>;
  using backend = cuda;
  using G = gate_type;
  static constexpr const char* name = "HashRouter<cuda>";

  explicit HashRouter(HashRouterConfig config, cuda_stream stream = {}) : config_((config.validate(name), config)) {
    set_stream(stream);
  }

  index_t experts() const { return config_.experts; }
  index_t k() const { return 1; }
  index_t d_model() const { return config_.d_model; }
  const HashRouterConfig& config() const { return config_; }
  cuda_stream stream() const { return stream_; }
  void set_stream(cuda_stream s) {
    stream_ = s;
    ids_.set_stream(s);
  }

  template <class F>
  void for_each_parameter(F&&) {}  // no parameters

  // The token ids of the next forward(s), one per row of x (device int64 [T]); copied.
  void set_token_ids(const Tensor<std::int64_t, cuda>& ids) {
    ids_.resize(ids.shape());
    cuda_kernels::copy_bytes(ids_.data(), ids.data(), sizeof(std::int64_t) * ids.size(), stream_);
    has_ids_ = true;
  }

  void forward(ConstMatrixView<T, cuda> x, Routing<G, cuda>& out, Mode) {
    expect_shape(name, "x", x, x.rows, d_model());
    const index_t tokens = x.rows;
    if (!has_ids_) fail(name, ": token ids: expected ", tokens, ", got none (call set_token_ids before forward)");
    if (ids_.size() != tokens) fail(name, ": token ids: expected ", tokens, ", got ", ids_.size());
    prepare_routing(out, tokens, 0, 1, stream_);
    cuda_kernels::for_each_index(stream_, tokens,
                                 cuda_kernels::HashRoute<G>{ids_.data(), config_.seed, experts(), out.experts.data(),
                                                            out.gates.data()});
  }

  // No gradient: the gates are constants and the choice does not depend on x.
  void backward(ConstMatrixView<T, cuda> x, const Routing<G, cuda>&, ConstMatrixView<G, cuda> d_gates,
                MatrixView<G, cuda> d_logits, MatrixView<T, cuda> dx) const {
    const index_t tokens = x.rows;
    expect_shape(name, "d_gates", d_gates, tokens, 1);
    expect_equal(name, "d_logits rows", tokens, d_logits.rows);
    expect_shape(name, "dx", dx, tokens, d_model());
  }

 private:
  HashRouterConfig config_;
  cuda_stream stream_{};
  Tensor<std::int64_t, cuda> ids_;
  bool has_ids_ = false;
};

}  // namespace smoe
