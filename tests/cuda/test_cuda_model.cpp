// A whole sigma-MoE transformer language model training on the device against the same model on
// the CPU: embedding → blocks (causal self-attention, sigma-MoE FFN with expert dropout, RMSNorm) →
// final norm → tied head → cross-entropy, then AdamW, for 10 steps; the losses, aux losses and every
// parameter agree within 1e-4; two device runs are bitwise equal.
#include "device_test_support.hpp"

namespace model_test {

template <class B>
using SigmaMoE = MoE<SigmoidTopK<float, B>, ReluExperts<float, B>, WeightedSum<float, B>, EntropyLoss<float, B>,
                     RouterZLoss<float, B>>;
template <class B>
using Block = TransformerBlock<CausalSelfAttention<float, B>, SigmaMoE<B>, RMSNorm<float, B>>;

constexpr index_t V = 23, d = 16, E = 8, G = 8, K = 2, heads = 4;

// The same model with 16-bit activations and weights on the device (routing, losses and AdamW's
// master weights in fp32).
template <class T>
using SigmaMoE16 = MoE<SigmoidTopK<T, dev>, ReluExperts<T, dev>, WeightedSum<T, dev>, EntropyLoss<float, dev>,
                       RouterZLoss<float, dev>>;
template <class T>
using Block16 = TransformerBlock<CausalSelfAttention<T, dev>, SigmaMoE16<T>, RMSNorm<T, dev>>;

template <class B>
std::unique_ptr<Model<Block<B>>> make_model(bool tied) {
  return std::make_unique<Model<Block<B>>>(
      ModelConfig{.vocab = V, .d_model = d, .layers = 2, .tie_embeddings = tied}, [](index_t l) {
        const TopKRouterConfig rc{
            .d_model = d, .experts = E, .k = K, .expert_dropout = {.rate = 0.1, .seed = std::uint64_t(l + 1)}};
        return Block<B>(CausalSelfAttention<float, B>({.d_model = d, .heads = heads, .kv_heads = 2, .block = 3}),
                        SigmaMoE<B>(SigmoidTopK<float, B>(rc), ReluExperts<float, B>({d, E, G, true}),
                                    WeightedSum<float, B>{}, EntropyLoss<float, B>(0.01), RouterZLoss<float, B>(0.001)));
      });
}

template <class T>
std::unique_ptr<Model<Block16<T>>> make_model_16bit() {
  return std::make_unique<Model<Block16<T>>>(ModelConfig{.vocab = V, .d_model = d, .layers = 2}, [](index_t l) {
    const TopKRouterConfig rc{
        .d_model = d, .experts = E, .k = K, .expert_dropout = {.rate = 0.1, .seed = std::uint64_t(l + 1)}};
    return Block16<T>(CausalSelfAttention<T, dev>({.d_model = d, .heads = heads, .kv_heads = 2, .block = 3}),
                      SigmaMoE16<T>(SigmoidTopK<T, dev>(rc), ReluExperts<T, dev>({d, E, G, true}), WeightedSum<T, dev>{},
                                    EntropyLoss<float, dev>(0.01), RouterZLoss<float, dev>(0.001)));
  });
}

// Token ids and next-token targets of step `step` (B sequences of length L; a few targets ignored).
struct Batch {
  std::vector<std::int32_t> ids, targets;
};
Batch batch(int step, index_t B, index_t L) {
  Batch b;
  for (index_t i = 0; i < B * L; ++i) {
    b.ids.push_back(std::int32_t((i * 7 + step * 3 + i * i) % V));
    b.targets.push_back(i % 11 == 5 ? -100 : std::int32_t((i * 5 + step) % V));
  }
  return b;
}

template <class M>
std::vector<double> train(M& model, int steps, index_t B, index_t L) {
  using Backend = typename M::backend;
  AdamW<float, Backend> optimizer({.lr = 3e-3, .weight_decay = 0.01});
  std::vector<double> objectives;
  for (int step = 0; step < steps; ++step) {
    const Batch b = batch(step, B, L);
    zero_grad(model);
    const ModelOutput out = model.forward(std::span<const std::int32_t>(b.ids), std::span<const std::int32_t>(b.targets),
                                          B, Mode::train);
    model.backward();
    optimizer.step(model);
    objectives.push_back(out.loss);
    objectives.push_back(out.aux_loss);
  }
  return objectives;
}

}  // namespace model_test

TEST_CASE("cuda Model: 10 training steps on the device equal the CPU's", "[cuda][model]") {
  using namespace model_test;
  for (const bool tied : {true, false}) {
    INFO("tied " << tied);
    auto host = make_model<cpu>(tied);
    auto device = make_model<dev>(tied);
    std::uint64_t s = 3;
    host->for_each_parameter([&](std::string_view, Parameter<float>& p) { smoe::test::randomize(p.value, ++s, 0.2); });
    copy_parameters_to_device(*host, *device);
    const auto want = train(*host, 10, 3, 8);
    const auto got = train(*device, 10, 3, 8);
    REQUIRE(got.size() == want.size());
    for (std::size_t i = 0; i < want.size(); ++i) {
      INFO((i % 2 ? "aux loss" : "loss") << " of step " << i / 2);
      CHECK(got[i] == Approx(want[i]).epsilon(1e-4).margin(1e-6));
    }
    for_each_parameter_pair(*host, *device, [&](std::string_view name, auto& hp, auto& dp) {
      require_close_scaled(to_host(dp.value), hp.value, 1e-4, std::string(name));
    });
  }
  SECTION("two device runs are bitwise equal") {
    auto run = [] {
      auto model = make_model<dev>(true);
      std::uint64_t s = 3;
      model->for_each_parameter([&](std::string_view, Parameter<float, dev>& p) { fill_normal(p.value, 0.2, ++s); });
      train(*model, 3, 2, 6);
      std::vector<float> all;
      model->for_each_parameter([&](std::string_view, Parameter<float, dev>& p) {
        const auto v = to_host(p.value);
        all.insert(all.end(), v.data(), v.data() + v.size());
      });
      return all;
    };
    const auto a = run(), b = run();
    REQUIRE(a.size() == b.size());
    CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("cuda grad_norm, clip_grad_norm and scale_gradients on a device model equal the CPU's", "[cuda][model][clip]") {
  using namespace model_test;
  auto host = make_model<cpu>(false);
  auto device = make_model<dev>(false);
  std::uint64_t s = 7;
  host->for_each_parameter([&](std::string_view, Parameter<float>& p) {
    smoe::test::randomize(p.value, ++s, 0.2);
    smoe::test::randomize(p.grad, ++s, 0.5);
  });
  for_each_parameter_pair(*host, *device, [](std::string_view, auto& hp, auto& dp) {
    copy(hp.value, dp.value);
    copy(hp.grad, dp.grad);
  });
  CHECK(grad_norm(*device) == Approx(grad_norm(*host)).epsilon(1e-12));
  scale_gradients(*host, 0.75);
  scale_gradients(*device, 0.75);
  const ClipResult h = clip_grad_norm(*host, 0.5), d = clip_grad_norm(*device, 0.5);
  CHECK(d.norm == Approx(h.norm).epsilon(1e-12));
  CHECK(d.scale == Approx(h.scale).epsilon(1e-12));
  CHECK(d.clipped());
  for_each_parameter_pair(*host, *device, [&](std::string_view name, auto& hp, auto& dp) {
    require_close_scaled(to_host(dp.grad), hp.grad, 1e-6, std::string(name) + ".grad");
  });
  SECTION("a non-finite gradient is reported and nothing is scaled") {
    device->embedding().weight().grad.fill(std::numeric_limits<float>::infinity());
    const auto before = to_host(device->head().weight().grad);
    CHECK_FALSE(clip_grad_norm(*device, 0.5).finite());
    const auto after = to_host(device->head().weight().grad);
    CHECK(std::memcmp(after.data(), before.data(), sizeof(float) * std::size_t(before.size())) == 0);
  }
}

TEST_CASE("cuda AdamW: host_state and restore continue the run exactly (checkpoints)", "[cuda][model][adamw]") {
  using namespace model_test;
  auto run = [](int steps, bool restart) {
    auto model = make_model<dev>(true);
    std::uint64_t s = 3;
    model->for_each_parameter([&](std::string_view, Parameter<float, dev>& p) { fill_normal(p.value, 0.2, ++s); });
    AdamW<float, dev> optimizer({.lr = 3e-3, .weight_decay = 0.01});
    for (int step = 0; step < steps; ++step) {
      if (restart && step == steps / 2) {  // through the host, as a checkpoint saves and loads it
        AdamW<float> host({.lr = 3e-3, .weight_decay = 0.01});
        host.restore(optimizer.steps(), optimizer.host_state());
        AdamW<float, dev> fresh({.lr = 3e-3, .weight_decay = 0.01});
        fresh.restore(host.steps(), host.state());
        optimizer = std::move(fresh);
      }
      const Batch b = batch(step, 2, 6);
      zero_grad(*model);
      model->forward(std::span<const std::int32_t>(b.ids), std::span<const std::int32_t>(b.targets), 2, Mode::train);
      model->backward();
      optimizer.step(*model);
    }
    std::vector<float> all;
    model->for_each_parameter([&](std::string_view, Parameter<float, dev>& p) {
      const auto v = to_host(p.value);
      all.insert(all.end(), v.data(), v.data() + v.size());
    });
    return all;
  };
  const auto straight = run(6, false), restarted = run(6, true);
  REQUIRE(straight.size() == restarted.size());
  CHECK(std::memcmp(straight.data(), restarted.data(), straight.size() * sizeof(float)) == 0);
}

TEST_CASE("cuda Model: a bf16 / fp16 model trains on the device as the fp32 CPU model", "[cuda][model]") {
  using namespace model_test;
  auto run = [](auto device) {
    using T = std::remove_cvref_t<decltype(*device->embedding().weight().value.data())>;
    INFO(dtype_name<T>());
    auto host = make_model<cpu>(false);
    std::uint64_t s = 3;
    host->for_each_parameter([&](std::string_view name, Parameter<float>& p) {
      smoe::test::randomize(p.value, ++s, 0.2);
      if (!name.ends_with("router.weight")) p.value = rounded<T>(p.value);  // what the 16-bit model holds
    });
    copy_parameters_to_device(*host, *device);
    const auto want = train(*host, 4, 3, 8);
    const auto got = train(*device, 4, 3, 8);
    REQUIRE(got.size() == want.size());
    for (std::size_t i = 0; i < want.size(); i += 2) {
      INFO("loss of step " << i / 2);
      CHECK(got[i] == Approx(want[i]).epsilon(2e-2));
    }
    // AdamW moves every weight by about lr per step whatever its gradient's size, so an element
    // whose tiny gradient differs in sign (16-bit rounding, a flipped expert choice) may differ by
    // a few lr; the mean difference shows that the two models took the same steps.
    for_each_parameter_pair(*host, *device, [&](std::string_view name, auto& hp, auto& dp) {
      const Tensor<float> v = to_host<float>(dp.value);
      double sum = 0;
      for (index_t i = 0; i < v.size(); ++i) {
        const double diff = std::abs(double(v[i]) - double(hp.value[i]));
        CHECK(diff <= 10 * 3e-3);
        sum += diff;
      }
      INFO(name << ": mean |device - CPU| " << sum / double(v.size()));
      CHECK(sum / double(v.size()) <= 2e-3);
    });
  };
  run(make_model_16bit<bf16>());
  run(make_model_16bit<fp16>());
}
