// The extension examples of docs/extending.md, each plugged into a whole MoE layer whose gradients
// (every parameter and dx) are checked against central differences. Exit status 0: all pass, and
// the check fails, as it must, on a gate whose backward is off by 10 %.
#include <cstdio>
#include <string_view>

#include <smoe/experts/feed_forward_experts.hpp>
#include <smoe/layers/accounting.hpp>
#include <smoe/layers/moe.hpp>
#include <smoe/losses/switch_balance.hpp>
#include <smoe/routing/softmax_topk.hpp>
#include <smoe/train/gradient_check.hpp>
#include <smoe/train/init.hpp>

#include "cosine_router.hpp"
#include "low_rank_experts.hpp"
#include "renormalized_sum.hpp"
#include "sequence_balance_loss.hpp"
#include "temperature_gate.hpp"

namespace {

using T = double;  // gradient checks in double: float's rounding swamps central differences
constexpr smoe::index_t d = 6, E = 5, K = 2, G = 4, tokens = 8;
constexpr double tolerance = 1e-7;

template <class Layer>
void randomize(Layer& layer, std::uint64_t seed) {
  layer.for_each_parameter([&](std::string_view, auto& p) {
    if (p.value.size() > 1) smoe::fill_normal(p.value, 0.6, seed++, 0);  // "scale" keeps its value
  });
}

// example-begin check
// The whole layer against central differences: every parameter's gradient and dx.
template <class Layer>
bool gradients_match(const char* what, Layer& layer) {
  smoe::Tensor<T> x({tokens, d}), dy({tokens, d});
  smoe::fill_normal(x, 1.0, /*seed=*/31, /*stream=*/0);
  smoe::fill_normal(dy, 1.0, /*seed=*/32, /*stream=*/0);
  const smoe::LayerGradientCheckResult r = smoe::check_layer_gradients(layer, x, dy);
  std::printf("%-40s worst error %.2e (parameter %s[%lld]: %.2e, dx: %.2e)\n", what, r.worst_error(),
              r.parameters.worst_parameter.c_str(), static_cast<long long>(r.parameters.worst_index),
              r.parameters.worst_error, r.input_error);
  return r.worst_error() < tolerance;
}
// example-end check

// example-begin static-checks
// Each type against its concept, with the message MoE<> would give (compile time only).
static_assert(smoe::check_gate_policy<extending::TemperatureGate, T>());
static_assert(smoe::check_router<extending::CosineRouter<T>>());
static_assert(smoe::check_experts<extending::LowRankExperts<T>>());
static_assert(smoe::check_balance_loss<extending::SequenceBalanceLoss<T>>());
static_assert(smoe::check_combiner<extending::RenormalizedSum<T>>());
// example-end static-checks

// A wrong backward the check must catch.
struct WrongGate : extending::TemperatureGate {
  template <class U>
  void backward(const U* s, smoe::index_t E_, const std::int32_t* ids, smoe::index_t K_, const U* gates,
                const U* d_gates, U* d_logits) const {
    U scaled[16];
    for (smoe::index_t j = 0; j < K_; ++j) scaled[j] = U(1.1) * d_gates[j];
    TemperatureGate::backward(s, E_, ids, K_, gates, scaled, d_logits);
  }
};

}  // namespace

int main() {
  using namespace extending;
  bool ok = true;
  {
    // example-begin gate-use
    smoe::MoE layer(smoe::TopKRouter<T, TemperatureGate>({.d_model = d, .experts = E, .k = K}, {.tau = 0.5}),
                    smoe::GeluExperts<T>({.d_model = d, .experts = E, .hidden = G}));
    // example-end gate-use
    randomize(layer, 1);
    ok &= gradients_match("gate policy: TemperatureGate", layer);
  }
  {
    // example-begin router-use
    smoe::MoE layer(CosineRouter<T>(d, E, K, /*dim=*/3, /*seed=*/5),
                    smoe::GeluExperts<T>({.d_model = d, .experts = E, .hidden = G}), smoe::WeightedSum<T>{},
                    smoe::SwitchBalanceLoss<T>(0.1));
    // example-end router-use
    randomize(layer, 2);
    ok &= gradients_match("router: CosineRouter (+ Switch loss)", layer);
  }
  {
    // example-begin experts-use
    smoe::MoE layer(smoe::SoftmaxTopK<T>({.d_model = d, .experts = E, .k = K}),
                    LowRankExperts<T>(d, E, /*rank=*/2, /*hidden=*/G));
    // example-end experts-use
    randomize(layer, 3);
    ok &= gradients_match("experts: LowRankExperts", layer);
    // The pool's accounting: the layer's total is the router's E·d plus the experts' own count.
    const smoe::index_t total = smoe::total_parameters(layer);
    std::printf("%-40s total parameters %lld (counted %lld)\n", "experts: accounting", static_cast<long long>(total),
                static_cast<long long>(smoe::parameter_count(layer)));
    ok &= total == smoe::parameter_count(layer);
  }
  {
    // example-begin loss-use
    smoe::MoE layer(smoe::SoftmaxTopK<T>({.d_model = d, .experts = E, .k = K}),
                    smoe::GeluExperts<T>({.d_model = d, .experts = E, .hidden = G}), smoe::WeightedSum<T>{},
                    SequenceBalanceLoss<T>(/*coef=*/0.5, /*sequence=*/4));
    // example-end loss-use
    randomize(layer, 4);
    ok &= gradients_match("loss: SequenceBalanceLoss", layer);
  }
  {
    // example-begin combiner-use
    smoe::MoE layer(smoe::SoftmaxTopK<T>({.d_model = d, .experts = E, .k = K}),
                    smoe::GeluExperts<T>({.d_model = d, .experts = E, .hidden = G}), RenormalizedSum<T>{});
    layer.capacity = {.capacity_factor = 0.75};  // drops assignments: the renormalization matters
    // example-end combiner-use
    randomize(layer, 5);
    ok &= gradients_match("combiner: RenormalizedSum (capacity)", layer);
    smoe::Tensor<T> x({tokens, d}), y({tokens, d});
    smoe::fill_normal(x, 1.0, 31, 0);
    const smoe::index_t dropped = layer.forward(x.matrix(), y.matrix()).stats.dropped;
    std::printf("%-40s %lld assignments dropped\n", "combiner: capacity", static_cast<long long>(dropped));
    ok &= dropped > 0;
  }
  {
    smoe::MoE layer(smoe::TopKRouter<T, WrongGate>({.d_model = d, .experts = E, .k = K}, {}),
                    smoe::GeluExperts<T>({.d_model = d, .experts = E, .hidden = G}));
    randomize(layer, 1);
    const bool caught = !gradients_match("negative control: gate backward x1.1", layer);
    std::printf("%-40s %s\n", "negative control", caught ? "caught (as it must be)" : "NOT CAUGHT");
    ok &= caught;
  }
  std::printf("%s\n", ok ? "all extension examples pass" : "FAILED");
  return ok ? 0 : 1;
}
