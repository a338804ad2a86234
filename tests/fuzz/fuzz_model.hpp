#pragma once
// The model of the checkpoint harness and of its seeds: two parameters and a buffer.
#include <smoe/core/parameter.hpp>
#include <smoe/core/tensor.hpp>
#include <smoe/train/adamw.hpp>

#include <vector>

namespace smoe_fuzz {

struct Model {
  smoe::Parameter<float> w{std::vector<smoe::index_t>{2, 3}}, b{std::vector<smoe::index_t>{3}};
  smoe::Tensor<float> running{std::vector<smoe::index_t>{3}};
  template <class F>
  void for_each_parameter(F&& f) {
    f("layer.w", w);
    f("layer.b", b);
  }
  template <class F>
  void for_each_buffer(F&& f) {
    f("layer.running", running);
  }
};

// A state that is not the default, so a partial load would show.
inline void prepare(Model& m, smoe::AdamW<float>& opt) {
  float v = 0.5f;
  m.for_each_parameter([&](auto, smoe::Parameter<float>& p) {
    for (smoe::index_t i = 0; i < p.value.size(); ++i) p.value[i] = v, p.grad[i] = v / 2, v += 0.25f;
  });
  m.running.fill(-1.0f);
  opt.step(m);
}

}  // namespace smoe_fuzz
