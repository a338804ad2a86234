#pragma once
// AdamW: Adam with decoupled weight decay (Loshchilov & Hutter 2019, "Decoupled Weight Decay
// Regularization", Alg. 2), in the exact form of PyTorch's torch.optim.AdamW (amsgrad=False,
// maximize=False), so a run can be compared with PyTorch step by step. At step t = 1, 2, ...,
// for every parameter p with gradient g:
//   p ← p · (1 − lr·λ)                         decoupled decay, first, on the old p (λ = weight_decay;
//                                             skipped for parameters the no-decay rule excludes)
//   m ← β1·m + (1 − β1)·g                      v ← β2·v + (1 − β2)·g²
//   p ← p − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε)
// which is p −= lr·(m̂/(√v̂ + ε) + λ·p_old) with m̂ = m/(1 − β1^t), v̂ = v/(1 − β2^t). ε is added to
// √v̂ (not to v̂), as PyTorch does. lr may change between steps (a schedule calls set_lr); λ is
// multiplied by the current lr, as in PyTorch (not by lr/peak as in the paper's schedule
// multiplier η_t).
//
// State per parameter, keyed by its name: m and v (of the parameter's scalar type), plus one step
// count t shared by all parameters. Moments are created as zeros on the first step; after that
// the model must visit exactly the parameters (names and shapes) the state holds, or step throws
// before changing anything. Each element is updated in double from the stored T values and
// rounded once per stored quantity, so results are deterministic and independent of the thread
// count (the update is elementwise).
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "smoe/core/error.hpp"
#include "smoe/core/parameter.hpp"
#include "smoe/cpu/parallel.hpp"

namespace smoe {

struct AdamWConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;  // λ; PyTorch's default

  void validate(const char* context) const {
    if (!(lr >= 0.0) || !std::isfinite(lr)) fail(context, ": lr must be finite and >= 0, got ", lr);
    if (!(beta1 >= 0.0 && beta1 < 1.0)) fail(context, ": beta1 must be in [0, 1), got ", beta1);
    if (!(beta2 >= 0.0 && beta2 < 1.0)) fail(context, ": beta2 must be in [0, 1), got ", beta2);
    if (!(eps > 0.0) || !std::isfinite(eps)) fail(context, ": eps must be finite and > 0, got ", eps);
    if (!(weight_decay >= 0.0) || !std::isfinite(weight_decay))
      fail(context, ": weight_decay must be finite and >= 0, got ", weight_decay);
  }
};

// Says which parameters are NOT weight-decayed (true = exclude), from the parameter's full name.
using NoDecayRule = std::function<bool(std::string_view name)>;

// A rule excluding every parameter whose name ends with one of `suffixes`, e.g.
// {"b1", "b2", "bias", "norm.weight"} for biases and norm gains.
inline NoDecayRule no_decay_if_name_ends_with(std::vector<std::string> suffixes) {
  return [suffixes = std::move(suffixes)](std::string_view name) {
    for (const auto& s : suffixes)
      if (name.ends_with(s)) return true;
    return false;
  };
}

// AdamW<T, cuda> is the CUDA backend's (smoe/cuda/adamw.cuh).
template <class T, class Backend = cpu>
class AdamW {
  static_assert(std::is_floating_point_v<T>, "AdamW<T>: T must be float or double");
  static_assert(std::is_same_v<Backend, cpu>, "AdamW<T, cuda> needs <smoe/cuda/adamw.cuh>");

 public:
  using scalar_type = T;
  static constexpr const char* name = "AdamW";

  struct State {
    Tensor<T> m;  // first moment, the parameter's shape
    Tensor<T> v;  // second moment
  };
  using StateMap = std::map<std::string, State, std::less<>>;

  explicit AdamW(AdamWConfig config = {}, NoDecayRule no_decay = {})
      : config_((config.validate(name), config)), no_decay_(std::move(no_decay)) {}

  const AdamWConfig& config() const { return config_; }
  double lr() const { return config_.lr; }
  void set_lr(double lr) {
    if (!(lr >= 0.0) || !std::isfinite(lr)) fail(name, "::set_lr: lr must be finite and >= 0, got ", lr);
    config_.lr = lr;
  }
  // Whether the parameter of this name is weight-decayed.
  bool decays(std::string_view parameter) const {
    return config_.weight_decay > 0.0 && !(no_decay_ && no_decay_(parameter));
  }
  // Steps taken: the t of the bias corrections (PyTorch's state["step"]).
  std::uint64_t steps() const { return steps_; }
  const StateMap& state() const { return state_; }

  // One update of every parameter of `model` from its accumulated gradients. Gradients are not
  // cleared (call zero_grad). Throws, changing nothing, when the visited parameters differ from
  // the state's (a duplicate name, an unknown name, a changed shape, a missing parameter).
  template <HasParameters C>
  void step(C& model) {
    const bool fresh = state_.empty();
    std::set<std::string, std::less<>> seen;
    model.for_each_parameter([&](std::string_view pname, auto& p) {
      check_type(p);
      if (!seen.emplace(pname).second)
        fail(name, "::step: the model visits parameter '", pname, "' more than once");
      if (p.grad.shape() != p.value.shape())
        fail(name, "::step: parameter '", pname, "' grad shape ", shape_string(p.grad.shape()),
             " must equal its value shape ", shape_string(p.value.shape()));
      if (fresh) return;
      const auto it = state_.find(pname);
      if (it == state_.end())
        fail(name, "::step: parameter '", pname, "' has no optimizer state (the state holds ", state_.size(),
             " parameters from earlier steps or a checkpoint)");
      if (it->second.m.shape() != p.value.shape())
        fail(name, "::step: parameter '", pname, "' shape must be ", shape_string(it->second.m.shape()),
             " (its optimizer state's), got ", shape_string(p.value.shape()));
    });
    if (!fresh && seen.size() != state_.size())
      for (const auto& [sname, s] : state_)
        if (!seen.contains(sname))
          fail(name, "::step: the optimizer holds state for parameter '", sname, "', which the model did not visit");

    if (fresh)
      model.for_each_parameter([&](std::string_view pname, auto& p) {
        State s{Tensor<T>(p.value.shape()), Tensor<T>(p.value.shape())};
        s.m.zero();
        s.v.zero();
        state_.emplace(std::string(pname), std::move(s));
      });

    ++steps_;
    const double t = double(steps_);
    const double b1 = config_.beta1, b2 = config_.beta2, lr = config_.lr, eps = config_.eps;
    const double step_size = lr / (1.0 - std::pow(b1, t));
    const double bc2_sqrt = std::sqrt(1.0 - std::pow(b2, t));
    model.for_each_parameter([&](std::string_view pname, auto& p) {
      State& s = state_.find(pname)->second;
      const double decay = decays(pname) ? 1.0 - lr * config_.weight_decay : 1.0;
      T* value = p.value.data();
      const T* grad = p.grad.data();
      T* m = s.m.data();
      T* v = s.v.data();
      cpu_kernels::parallel_for_blocks(p.value.size(), block, [&](index_t first, index_t last) {
        for (index_t i = first; i < last; ++i) {
          const double g = grad[i];
          const double x = double(value[i]) * decay;
          m[i] = T(b1 * double(m[i]) + (1.0 - b1) * g);
          v[i] = T(b2 * double(v[i]) + (1.0 - b2) * g * g);
          const double denom = std::sqrt(double(v[i])) / bc2_sqrt + eps;
          value[i] = T(x - step_size * double(m[i]) / denom);
        }
      });
    });
  }

  // Replaces the step count and the whole state at once (a checkpoint's commit); cannot fail.
  void restore(std::uint64_t steps, StateMap state) noexcept {
    steps_ = steps;
    state_ = std::move(state);
  }
  // Back to the freshly constructed state (hyperparameters kept).
  void reset() noexcept { restore(0, {}); }

 private:
  static constexpr index_t block = 1 << 14;

  template <class P>
  static void check_type(const P&) {
    static_assert(std::is_same_v<P, Parameter<T>>, "AdamW<T>: every parameter of the model must be a Parameter<T>");
  }
  static std::string shape_string(const std::vector<index_t>& shape) {
    std::string s = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
  }

  AdamWConfig config_;
  NoDecayRule no_decay_;
  std::uint64_t steps_ = 0;
  StateMap state_;
};

}  // namespace smoe
