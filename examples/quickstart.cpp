// Quick start: a sigma-MoE feed-forward layer (Csordás et al. 2023) on the CPU backend —
// build it, run forward and backward, and take a few plain SGD steps on a toy regression task.
#include <smoe/smoe.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>

int main() {
  using T = float;
  const smoe::index_t d = 64, experts = 16, G = 32, K = 4, tokens = 256;

  // example-begin quickstart
  smoe::MoE layer(smoe::SigmoidTopK<T>({.d_model = d, .experts = experts, .k = K,
                                        .expert_dropout = {.rate = 0.05, .seed = 1}}),
                  smoe::ReluExperts<T>({.d_model = d, .experts = experts, .hidden = G}),
                  smoe::WeightedSum<T>{}, smoe::EntropyLoss<T>(0.001));
  smoe::sigma_moe_init(layer, {.seed = 42});

  smoe::Tensor<T> x({tokens, d}), y({tokens, d}), dy({tokens, d}), dx({tokens, d});
  smoe::fill_normal(x, 1.0, /*seed=*/7, /*stream=*/0);

  auto out = layer.forward(x.matrix(), y.matrix(), smoe::Mode::train);  // y, aux loss, routing stats
  // ... dy = ∂loss/∂y from the rest of the model ...
  smoe::zero_grad(layer);
  layer.backward(dy.matrix(), dx.matrix());  // dx, and every parameter's .grad
  // example-end quickstart
  std::printf("aux loss %.5f, tokens on expert 0: %lld\n", double(out.aux_loss),
              static_cast<long long>(out.stats.tokens_per_expert[0]));

  // Toy task: learn y = tanh(x)·0.5 with the MoE layer alone, to show a training loop.
  smoe::Tensor<T> target({tokens, d});
  for (smoe::index_t i = 0; i < x.size(); ++i) target[i] = T(0.5 * std::tanh(x[i]));
  const T lr = 0.5;
  for (int step = 0; step <= 60; ++step) {
    out = layer.forward(x.matrix(), y.matrix(), smoe::Mode::train);
    double loss = 0;  // mean over tokens of the squared error ||y_t - target_t||²
    for (smoe::index_t i = 0; i < y.size(); ++i) {
      const T diff = y[i] - target[i];
      loss += double(diff) * diff / double(tokens);
      dy[i] = T(2) * diff / T(tokens);
    }
    smoe::zero_grad(layer);
    layer.backward(dy.matrix(), dx.matrix());
    layer.for_each_parameter([&](std::string_view, auto& p) {
      for (smoe::index_t i = 0; i < p.value.size(); ++i) p.value[i] -= lr * p.grad[i];
    });
    if (step % 10 == 0)
      std::printf("step %2d  loss %.4f  entropy reg %.4f  max tokens/expert %lld of %lld\n", step, loss,
                  double(out.loss_values[0]),
                  static_cast<long long>(*std::max_element(out.stats.tokens_per_expert.begin(),
                                                           out.stats.tokens_per_expert.end())),
                  static_cast<long long>(tokens));
  }
  return 0;
}
