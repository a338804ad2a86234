// libtorch_moe: a small libtorch language model whose transformer blocks are smoe blocks with
// sigma-MoE feed-forward layers (docs/interop.md). torch owns the embedding, the final norm, the
// head, the loss and the optimizer (torch::optim::AdamW); smoe runs the blocks through
// smoe::TorchLayer, their parameters shared with torch (no copies).
//
// Toy task: sequences where each token is the sum of the two before it, mod V (the first two are
// random), so the next token needs the current and the previous one: attention and the MoE both
// matter. Prints the loss and each block's routing statistics; exits 1 unless the loss falls to at
// most half its first value (the ctest smoke test).
//   libtorch_moe [steps = 300]
#include <smoe/interop/torch.hpp>

#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/optim/adamw.h>

#include <smoe/smoe.hpp>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace {

constexpr smoe::index_t V = 16, d = 32, heads = 4, E = 8, K = 2, G = 16, B = 16, L = 16;

using SigmaMoE = smoe::MoE<smoe::SigmoidTopK<float>, smoe::ReluExperts<float>, smoe::WeightedSum<float>,
                           smoe::EntropyLoss<float>>;
using Block = smoe::TransformerBlock<smoe::CausalSelfAttention<float>, SigmaMoE>;

Block make_block(std::uint64_t seed) {
  SigmaMoE moe(smoe::SigmoidTopK<float>({.d_model = d, .experts = E, .k = K}),
               smoe::ReluExperts<float>({.d_model = d, .experts = E, .hidden = G}), smoe::WeightedSum<float>{},
               smoe::EntropyLoss<float>(0.01));
  smoe::sigma_moe_init(moe, {.scale = 1.0, .seed = seed});
  return Block(smoe::CausalSelfAttention<float>({.d_model = d, .heads = heads}), std::move(moe));
}

struct ToyLMImpl : torch::nn::Module {
  torch::nn::Embedding embedding{nullptr};
  smoe::TorchLayer<Block> block1{nullptr}, block2{nullptr};
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Linear head{nullptr};

  ToyLMImpl() {
    embedding = register_module("embedding", torch::nn::Embedding(V, d));
    block1 = register_module("block1", smoe::TorchLayer<Block>(make_block(1)));
    block2 = register_module("block2", smoe::TorchLayer<Block>(make_block(2)));
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})));
    head = register_module("head", torch::nn::Linear(d, V));
    // smoe's attention weights start at zero: torch's init writes them in place (shared storage).
    torch::NoGradGuard no_grad;
    for (auto& p : named_parameters())
      if (p.key().find(".attn.") != std::string::npos) p.value().normal_(0.0, 1.0 / std::sqrt(double(d)));
  }

  // ids [B, L] → logits [B, L, V], and the blocks' aux losses summed (a 0-d tensor).
  std::pair<torch::Tensor, torch::Tensor> forward(const torch::Tensor& ids) {
    torch::Tensor h = embedding(ids);
    const smoe::TorchLayerOutput o1 = block1(h);
    const smoe::TorchLayerOutput o2 = block2(o1.y);
    return {head(norm(o2.y)), o1.aux_loss + o2.aux_loss};
  }
};
TORCH_MODULE(ToyLM);

// A batch of sequences x_t = (x_{t-1} + x_{t-2}) mod V; inputs [B, L], targets [B, L] (the next token).
std::pair<torch::Tensor, torch::Tensor> make_batch(torch::Generator& gen) {
  torch::Tensor seq = torch::empty({B, L + 1}, torch::kInt64);
  auto s = seq.accessor<std::int64_t, 2>();
  const torch::Tensor start = torch::randint(V, {B, 2}, gen, torch::kInt64);
  for (smoe::index_t b = 0; b < B; ++b) {
    s[b][0] = start[b][0].item<std::int64_t>();
    s[b][1] = start[b][1].item<std::int64_t>();
    for (smoe::index_t t = 2; t <= L; ++t) s[b][t] = (s[b][t - 1] + s[b][t - 2]) % V;
  }
  return {seq.slice(1, 0, L), seq.slice(1, 1, L + 1)};
}

}  // namespace

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 300;
  if (steps < 1) {
    std::fprintf(stderr, "usage: libtorch_moe [steps >= 1]\n");
    return 2;
  }
  torch::manual_seed(0);
  torch::Generator gen = at::detail::createCPUGenerator(7);
  ToyLM model;
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(3e-3).weight_decay(0.01));
  double first = 0, last = 0;
  for (int step = 0; step < steps; ++step) {
    const auto [inputs, targets] = make_batch(gen);
    optimizer.zero_grad();
    const auto [logits, aux] = model->forward(inputs);
    const torch::Tensor task = torch::nn::functional::cross_entropy(logits.reshape({-1, V}), targets.reshape({-1}));
    (task + aux).backward();
    optimizer.step();
    last = task.item<double>();
    if (step == 0) first = last;
    if (step % 50 == 0 || step == steps - 1) {
      const smoe::RoutingStats& r1 = model->block1->routing_stats().at(0);
      const smoe::RoutingStats& r2 = model->block2->routing_stats().at(0);
      std::printf("step %4d  loss %.4f  aux %.5f  routing entropy %.3f / %.3f (max %.3f)  load cv %.3f / %.3f\n", step,
                  last, aux.item<double>(), r1.routing_entropy, r2.routing_entropy, std::log(double(E)), r1.load_cv,
                  r2.load_cv);
    }
  }
  std::printf("tokens per expert, block 2, last batch:");
  for (const smoe::index_t n : model->block2->routing_stats().at(0).tokens_per_expert)
    std::printf(" %lld", static_cast<long long>(n));
  std::printf("\nloss %.4f -> %.4f (%s: at most half)\n", first, last, last <= 0.5 * first ? "ok" : "FAILED");
  return last <= 0.5 * first ? 0 : 1;
}
