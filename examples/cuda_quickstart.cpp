// CUDA quick start: a sigma-MoE layer on the CUDA backend — built from smoe::cuda components,
// initialized on the CPU and copied over by name, checked against its CPU twin, then trained for a
// few AdamW steps on the device. Built by nvcc as cuda_quickstart (cuda_quickstart.cu; needs a GPU)
// and by the host compiler as cuda_quickstart_emulated (the host-emulated device build: the same
// device code, run on the CPU).
#include <smoe/cuda.cuh>
#include <smoe/smoe.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

int main() {
  std::string why;
  if (!smoe::cuda_device_available(&why)) {
    std::printf("cuda_quickstart: no usable CUDA device (%s)\n", why.c_str());
    return 0;
  }
  using T = float;  // smoe::bf16 / smoe::fp16 for the experts work the same way
  const smoe::index_t d = 64, experts = 16, G = 32, K = 4, tokens = 256;
  const smoe::TopKRouterConfig rc{.d_model = d, .experts = experts, .k = K, .expert_dropout = {.rate = 0.05, .seed = 1}};
  smoe::Tensor<float> x_host({tokens, d});
  smoe::fill_normal(x_host, 1.0, /*seed=*/7, /*stream=*/0);

  // example-begin cuda_quickstart
  using dev = smoe::cuda;  // write smoe::cuda in full: a bare `cuda` clashes with libcu++'s ::cuda
  smoe::MoE layer(smoe::SigmoidTopK<T, dev>(rc), smoe::ReluExperts<T, dev>({d, experts, G}),
                  smoe::WeightedSum<T, dev>{}, smoe::EntropyLoss<float, dev>(0.001));
  smoe::MoE host(smoe::SigmoidTopK<float>(rc), smoe::ReluExperts<float>({d, experts, G}),
                 smoe::WeightedSum<float>{}, smoe::EntropyLoss<float>(0.001));  // the CPU twin
  smoe::sigma_moe_init(host, {.seed = 42});
  smoe::copy_parameters_to_device(host, layer);  // by name, converting to T

  const auto x = smoe::to_device<T>(x_host);  // transfers between memory spaces are explicit
  smoe::Tensor<T, dev> y({tokens, d}), dy({tokens, d}), dx({tokens, d});
  layer.forward(x.matrix(), y.matrix(), smoe::Mode::train);  // no host synchronization inside
  dy.zero();  // ... dy = ∂loss/∂y from the rest of the model ...
  smoe::zero_grad(layer);
  layer.backward(dy.matrix(), dx.matrix());         // dx, and every parameter's .grad on the device
  const float aux = layer.read_losses().aux_loss;  // waits for the stream: read it when you log
  // example-end cuda_quickstart
  std::printf("aux loss %.5f\n", double(aux));

  layer.forward(x.matrix(), y.matrix(), smoe::Mode::eval);
  smoe::Tensor<float> y_host({tokens, d});
  host.forward(x_host.matrix(), y_host.matrix(), smoe::Mode::eval);
  const auto y_back = smoe::to_host<float>(y);  // waits for the layer's stream
  double worst = 0;
  for (smoe::index_t i = 0; i < y_back.size(); ++i) worst = std::max(worst, std::abs(double(y_back[i]) - y_host[i]));
  std::printf("device vs CPU forward: max |difference| %.2e\n", worst);

  // Toy task: learn y = tanh(x)·0.5. The squared error and its gradient are computed on the host
  // here for brevity; a model computes dy on the device.
  smoe::Tensor<float> target({tokens, d}), dy_host({tokens, d});
  for (smoe::index_t i = 0; i < x_host.size(); ++i) target[i] = float(0.5 * std::tanh(x_host[i]));
  smoe::AdamW<float, smoe::cuda> optimizer({.lr = 3e-3, .weight_decay = 0.0});
  for (int step = 0; step <= 60; ++step) {
    layer.forward(x.matrix(), y.matrix(), smoe::Mode::train);
    const auto yh = smoe::to_host<float>(y);
    double loss = 0;  // mean over tokens of ||y_t - target_t||²
    for (smoe::index_t i = 0; i < yh.size(); ++i) {
      const double diff = double(yh[i]) - target[i];
      loss += diff * diff / double(tokens);
      dy_host[i] = float(2 * diff / double(tokens));
    }
    smoe::copy(dy_host, dy);
    smoe::zero_grad(layer);
    layer.backward(dy.matrix(), dx.matrix());
    optimizer.step(layer);
    if (step % 10 == 0)
      std::printf("step %2d  loss %.4f  aux %.5f\n", step, loss, double(layer.read_losses().aux_loss));
  }
  return 0;
}
