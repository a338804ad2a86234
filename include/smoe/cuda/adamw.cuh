#pragma once
// AdamW<T, cuda>: train/adamw.hpp's optimizer (PyTorch's torch.optim.AdamW formula, decoupled
// decay first) for device parameters, elementwise on the device, in double arithmetic per element
// as on the CPU. T is the state precision (float or double): m and v are kept in T, and for 16-bit
// parameters (bf16, fp16) an fp32/fp64 master copy too, created from the parameter on the first
// step: the update runs on the master weight and the parameter receives its rounding, so small
// updates are not lost to bf16 rounding. One model may mix parameter types (an fp32 router and
// bf16 experts). Like the CPU's, step() checks names and shapes first and changes nothing on error.
#include <cmath>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <string_view>

#include "smoe/cuda/device_tensor.cuh"
#include "smoe/train/adamw.hpp"

namespace smoe {

namespace cuda_kernels {
template <class P, class T>
struct AdamWUpdate {
  P* value;
  const P* grad;
  T* m;
  T* v;
  T* master;  // null: the parameter is its own master (P = T)
  double decay, b1, b2, step_size, bc2_sqrt, eps;
  SMOE_HOST_DEVICE void operator()(index_t i) const {
    using std::sqrt;
    const double g = to_acc(grad[i]);
    const double x = (master ? double(master[i]) : double(to_acc(value[i]))) * decay;
    m[i] = T(b1 * double(m[i]) + (1.0 - b1) * g);
    v[i] = T(b2 * double(v[i]) + (1.0 - b2) * g * g);
    const double updated = x - step_size * double(m[i]) / (sqrt(double(v[i])) / bc2_sqrt + eps);
    if (master) master[i] = T(updated);
    value[i] = from_acc<P>(static_cast<acc_t<P>>(master ? double(master[i]) : updated));
  }
};
template <class P, class T>
struct ToMaster {
  const P* value;
  T* master;
  SMOE_HOST_DEVICE void operator()(index_t i) const { master[i] = T(to_acc(value[i])); }
};
}  // namespace cuda_kernels

template <class T>
class AdamW<T, cuda> {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "AdamW<T, cuda>: T must be float or double");

 public:
  using scalar_type = T;
  using backend = cuda;
  static constexpr const char* name = "AdamW<cuda>";

  struct State {
    Tensor<T, cuda> m, v;
    Tensor<T, cuda> master;  // 16-bit parameters only
  };

  explicit AdamW(AdamWConfig config = {}, NoDecayRule no_decay = {}, cuda_stream stream = {})
      : config_((config.validate(name), config)), no_decay_(std::move(no_decay)), stream_(stream) {}

  const AdamWConfig& config() const { return config_; }
  double lr() const { return config_.lr; }
  void set_lr(double lr) {
    if (!(lr >= 0.0) || !std::isfinite(lr)) fail(name, "::set_lr: lr must be finite and >= 0, got ", lr);
    config_.lr = lr;
  }
  bool decays(std::string_view parameter) const {
    return config_.weight_decay > 0.0 && !(no_decay_ && no_decay_(parameter));
  }
  std::uint64_t steps() const { return steps_; }
  const std::map<std::string, State, std::less<>>& state() const { return state_; }

  // The moments on the host, as AdamW<T>'s state (what io/checkpoint.hpp saves; waits for the
  // stream). A 16-bit parameter's master weight is not part of it: see restore.
  typename AdamW<T>::StateMap host_state() const {
    typename AdamW<T>::StateMap out;
    for (const auto& [pname, s] : state_) out.emplace(pname, typename AdamW<T>::State{to_host(s.m), to_host(s.v)});
    return out;
  }
  // Continues from host state (a loaded checkpoint's): the moments are copied to the device; a
  // 16-bit parameter's master weight starts again from the parameter at the next step.
  void restore(std::uint64_t steps, const typename AdamW<T>::StateMap& host) {
    std::map<std::string, State, std::less<>> state;
    for (const auto& [pname, s] : host) {
      State d;
      for (Tensor<T, cuda>* t : {&d.m, &d.v, &d.master}) t->set_stream(stream_);
      copy(s.m, d.m);
      copy(s.v, d.v);
      state.emplace(pname, std::move(d));
    }
    steps_ = steps;
    state_ = std::move(state);
  }

  template <HasParameters C>
  void step(C& model) {
    const bool fresh = state_.empty();
    std::set<std::string, std::less<>> seen;
    model.for_each_parameter([&](std::string_view pname, auto& p) {
      if (!seen.emplace(pname).second) fail(name, "::step: the model visits parameter '", pname, "' more than once");
      if (p.grad.shape() != p.value.shape()) fail(name, "::step: parameter '", pname, "' grad shape differs from its value's");
      if (fresh) return;
      const auto it = state_.find(pname);
      if (it == state_.end()) fail(name, "::step: parameter '", pname, "' has no optimizer state");
      if (it->second.m.shape() != p.value.shape()) fail(name, "::step: parameter '", pname, "' changed shape");
    });
    if (!fresh && seen.size() != state_.size())
      fail(name, "::step: the model visited ", seen.size(), " parameters, the optimizer holds state for ", state_.size());
    if (fresh)
      model.for_each_parameter([&](std::string_view pname, auto& p) {
        State s{Tensor<T, cuda>(p.value.shape(), stream_), Tensor<T, cuda>(p.value.shape(), stream_), {}};
        s.m.zero();
        s.v.zero();
        state_.emplace(std::string(pname), std::move(s));
      });
    // 16-bit parameters update an fp32/fp64 master copy, made from the parameter on its first step.
    model.for_each_parameter([&](std::string_view pname, auto& p) {
      using P = std::remove_cvref_t<decltype(*p.value.data())>;
      if constexpr (!std::is_same_v<P, T>) {
        State& s = state_.find(pname)->second;
        if (s.master.size() == 0) {
          s.master = Tensor<T, cuda>(p.value.shape(), stream_);
          cuda_kernels::for_each_index(stream_, p.value.size(), cuda_kernels::ToMaster<P, T>{p.value.data(), s.master.data()});
        }
      }
    });

    ++steps_;
    const double t = double(steps_), b1 = config_.beta1, b2 = config_.beta2, lr = config_.lr;
    const double step_size = lr / (1.0 - std::pow(b1, t)), bc2_sqrt = std::sqrt(1.0 - std::pow(b2, t));
    model.for_each_parameter([&](std::string_view pname, auto& p) {
      using P = std::remove_cvref_t<decltype(*p.value.data())>;
      State& s = state_.find(pname)->second;
      const double decay = decays(pname) ? 1.0 - lr * config_.weight_decay : 1.0;
      cuda_kernels::for_each_index(
          stream_, p.value.size(),
          cuda_kernels::AdamWUpdate<P, T>{p.value.data(), p.grad.data(), s.m.data(), s.v.data(),
                                          s.master.size() ? s.master.data() : nullptr, decay, b1, b2, step_size,
                                          bc2_sqrt, config_.eps});
    });
  }

 private:
  AdamWConfig config_;
  NoDecayRule no_decay_;
  cuda_stream stream_{};
  std::uint64_t steps_ = 0;
  std::map<std::string, State, std::less<>> state_;
};

}  // namespace smoe
