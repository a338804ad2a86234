// Uses the library as a downstream project would: one include, one layer, forward and backward.
#include <smoe/smoe.hpp>

#include <cmath>
#include <cstdio>

int main() {
  smoe::MoE layer(smoe::SoftmaxTopK<float>({.d_model = 16, .experts = 4, .k = 2}, smoe::SoftmaxGate{.renormalize = true}),
                  smoe::SwiGluExperts<float>({.d_model = 16, .experts = 4, .hidden = 8}), smoe::WeightedSum<float>{},
                  smoe::SwitchBalanceLoss<float>(0.01));
  smoe::sigma_moe_init(layer, {.seed = 1});
  smoe::Tensor<float> x({10, 16}), y({10, 16}), dx({10, 16});
  smoe::fill_normal(x, 1.0, 2, 0);
  const auto out = layer.forward(x.matrix(), y.matrix(), smoe::Mode::train);
  layer.backward(x.matrix(), dx.matrix());
  if (!std::isfinite(out.aux_loss) || out.stats.assignments != 20) return 1;
  std::printf("consumer: aux loss %.4f, %lld assignments\n", double(out.aux_loss),
              static_cast<long long>(out.stats.assignments));
  return 0;
}
