#pragma once
// BaseRouter<T, cuda>: BASE routing (routing/base_router.hpp) with the projection, gates and
// gradients on the device; the weight "weight" [E, d], logits and gates are fp32 (fp64 for
// T = double).
//   forward:  SigmoidTopK<T, cuda> in eval (logits, greedy top-1, sigmoid gate); in training the
//             balanced linear assignment runs ON THE HOST: the logits are copied to the host, the
//             CPU's LinearAssignment solver (a sequential min-cost flow) assigns the tokens, the ids
//             are copied back and the sigmoid gates of the assigned logits are computed on the
//             device. The same solver on the same fp32 logits: the CPU's assignment.
//   backward: SigmoidTopK's: no gradient through the assignment.
// Host synchronisation: the training forward waits for the stream once (the logits' copy to the
// host), the one documented synchronisation of this router; eval forward and backward never wait.
// The ids go back from a pageable host buffer kept by the router (cudaMemcpyAsync has consumed it
// when it returns), so the next forward may reuse it.
#include <cstdint>
#include <span>
#include <vector>

#include "smoe/cuda/topk_router.cuh"
#include "smoe/routing/base_router.hpp"
#include "smoe/routing/sigmoid_topk.hpp"

namespace smoe {

namespace cuda_kernels {
template <class G>
struct SigmoidGateOfId {
  const G* logits;
  const std::int32_t* ids;
  G* gates;
  index_t E;
  SMOE_HOST_DEVICE void operator()(index_t t) const { SigmoidGate{}.forward(logits + t * E, E, ids + t, 1, gates + t); }
};
}  // namespace cuda_kernels

template <class T>
class BaseRouter<T, cuda> {
 public:
  using scalar_type = T;
  using gate_type = acc_t<T>;
  using backend = cuda;
  using G = gate_type;
  static constexpr const char* name = "BaseRouter<cuda>";
  // Training balances the experts exactly by itself: MoE<> refuses a capacity limit on top.
  static constexpr bool token_choice = false;

  explicit BaseRouter(BaseRouterConfig config, cuda_stream stream = {})
      : config_((config.validate(name), config)),
        linear_({.d_model = config.d_model, .experts = config.experts, .k = 1}, {}, stream) {
    set_stream(stream);
  }

  index_t experts() const { return config_.experts; }
  index_t k() const { return 1; }
  index_t d_model() const { return config_.d_model; }
  const BaseRouterConfig& config() const { return config_; }
  Parameter<G, cuda>& weight() { return linear_.weight(); }
  cuda_stream stream() const { return stream_; }
  void set_stream(cuda_stream s) {
    stream_ = s;
    linear_.set_stream(s);
  }

  template <class F>
  void for_each_parameter(F&& f) {
    linear_.for_each_parameter(f);
  }

  void forward(ConstMatrixView<T, cuda> x, Routing<G, cuda>& out, Mode mode) {
    expect_shape(name, "x", x, x.rows, d_model());
    linear_.forward(x, out, Mode::eval);
    if (mode != Mode::train) return;
    const index_t tokens = x.rows, E = experts();
    if (tokens == 0) return;
    const Tensor<G> logits = to_host(out.logits);  // the synchronisation (see the header comment)
    ids_.resize(static_cast<std::size_t>(tokens));
    solver_.solve(logits.matrix(), std::span<std::int32_t>(ids_));
    cuda_kernels::copy_bytes(out.experts.data(), ids_.data(), sizeof(std::int32_t) * ids_.size(), stream_);
    cuda_kernels::for_each_index(stream_, tokens,
                                 cuda_kernels::SigmoidGateOfId<G>{out.logits.data(), out.experts.data(), out.gates.data(), E});
  }

  void backward(ConstMatrixView<T, cuda> x, const Routing<G, cuda>& r, ConstMatrixView<G, cuda> d_gates,
                MatrixView<G, cuda> d_logits, MatrixView<T, cuda> dx) {
    const index_t tokens = x.rows;
    expect_shape(name, "x", x, tokens, d_model());
    expect_shape(name, "d_gates", d_gates, tokens, 1);
    expect_shape(name, "d_logits", d_logits, tokens, experts());
    expect_shape(name, "dx", dx, tokens, d_model());
    linear_.backward(x, r, d_gates, d_logits, dx);
  }

 private:
  BaseRouterConfig config_;
  cuda_stream stream_{};
  SigmoidTopK<T, cuda> linear_;
  LinearAssignment solver_;
  std::vector<std::int32_t> ids_;  // the host's assignment, copied to the device
};

}  // namespace smoe
