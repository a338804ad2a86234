#pragma once
// smoe_eval's multi-layer mode, selected by "layers" in the SPEC: a MoEStack (layers/moe_stack.hpp)
// of L MoE layers over one expert pool,
//
//   x_0 = x,   x_{l+1} = x_l + Layer_l(x_l),   y = x_L,   aux_loss = Σ_l aux_l,
//
// with "pool": per_layer | tied | samoe_weight | samoe_output, optional PR-MoE residual experts
// ("residual_expert_size") and DeepSeekMoE shared experts ("shared_experts") around every layer.
// docs/smoe_eval.md lists the SPEC keys, the tensor names and what OUT holds.
//
// Translation units: this header parses the SPEC and picks the dtype and pool (in smoe_eval.cpp,
// which shares the JSON code with the single-layer mode); the stacks are built by
// smoe_eval_stack_impl.hpp, instantiated for float and double by smoe_eval_stack_float.cpp and
// smoe_eval_stack_double.cpp, which compile in parallel with smoe_eval.cpp.
#include <algorithm>
#include <string>
#include <string_view>
#include <utility>

#include <smoe/core/config.hpp>
#include <smoe/io/safetensors.hpp>

#include "smoe_eval_common.hpp"

namespace smoe_eval {

enum class PoolKind { per_layer, tied, samoe_weight, samoe_output };

struct StackSpec {
  BackendKind backend = BackendKind::cpu;
  index_t layers = 1, d_model = 0, n_experts = 0, expert_size = 0, k = 0;
  bool sigmoid = false;  // router "sigmoid_topk"; otherwise "softmax_topk"
  bool renormalize = false;
  ActivationKind activation = ActivationKind::relu;
  bool bias = false;  // biases of every feed-forward part: routed experts, residual MLP, shared experts
  Coefficients coef;
  ScalarKind dtype = ScalarKind::float32;
  smoe::Mode mode = smoe::Mode::eval;
  double capacity_factor = 0;  // each layer's CapacityPolicy (0 = dropless)
  PoolKind pool = PoolKind::per_layer;
  index_t members = 1;      // SaMoE: M
  index_t top_members = 0;  // SaMoE: r, 0 = all M
  double temperature = 1;   // SaMoE: τ
  index_t residual_size = 0;  // PR-MoE: G_r, 0 = no residual expert
  bool residual_mix_bias = false;
  index_t shared_experts = 0;  // DeepSeekMoE: N_s, 0 = none
};

// The stack of `s` on IN on the CPU: OUT's tensors. Defined in smoe_eval_stack_impl.hpp.
template <class T, PoolKind P, class Backend = smoe::cpu>
smoe::io::SafetensorsWriter evaluate_stack(const StackSpec& s, const smoe::io::SafetensorsFile& in);
// The same on the CUDA backend (examples/smoe_eval_cuda.cpp; smoe_eval_no_cuda.cpp refuses it).
smoe::io::SafetensorsWriter evaluate_stack_on_device(const StackSpec& s, const smoe::io::SafetensorsFile& in);

#define SMOE_EVAL_STACK_DECLARE(T, P) \
  extern template smoe::io::SafetensorsWriter evaluate_stack<T, P>(const StackSpec&, const smoe::io::SafetensorsFile&);
SMOE_EVAL_STACK_DECLARE(float, PoolKind::per_layer)
SMOE_EVAL_STACK_DECLARE(float, PoolKind::tied)
SMOE_EVAL_STACK_DECLARE(float, PoolKind::samoe_weight)
SMOE_EVAL_STACK_DECLARE(float, PoolKind::samoe_output)
SMOE_EVAL_STACK_DECLARE(double, PoolKind::per_layer)
SMOE_EVAL_STACK_DECLARE(double, PoolKind::tied)
SMOE_EVAL_STACK_DECLARE(double, PoolKind::samoe_weight)
SMOE_EVAL_STACK_DECLARE(double, PoolKind::samoe_output)
#undef SMOE_EVAL_STACK_DECLARE

namespace stack_spec_detail {

constexpr std::string_view stack_only_keys[] = {"layers",           "pool",
                                                "pool_members",     "temperature",
                                                "pool_top_members", "residual_expert_size",
                                                "residual_mix_bias", "shared_experts"};
// Keys of routers the multi-layer mode does not offer.
constexpr std::string_view single_layer_only_keys[] = {"n_groups", "topk_groups", "route_scale", "sinkhorn_iters",
                                                       "pkm_heads", "pkm_keys",   "seed",        "load_coef"};
// Keys that only the SaMoE pools read.
constexpr std::string_view samoe_only_keys[] = {"pool_members", "temperature", "pool_top_members"};

constexpr std::pair<std::string_view, PoolKind> pool_names[] = {{"per_layer", PoolKind::per_layer},
                                                                {"tied", PoolKind::tied},
                                                                {"samoe_weight", PoolKind::samoe_weight},
                                                                {"samoe_output", PoolKind::samoe_output}};

inline std::string_view name_of(PoolKind p) {
  for (const auto& [n, kind] : pool_names)
    if (kind == p) return n;
  return "?";
}

}  // namespace stack_spec_detail

inline bool is_stack_spec(const json& j) { return j.is_object() && j.contains("layers"); }

inline void reject_stack_keys(const json& j) {
  if (!j.is_object()) return;  // the single-layer parser reports it
  for (const std::string_view key : stack_spec_detail::stack_only_keys)
    if (j.contains(key)) fail("SPEC: \"", key, "\" needs the multi-layer mode (set \"layers\")");
}

inline StackSpec parse_stack_spec(const json& j) {
  for (const std::string_view key : stack_spec_detail::single_layer_only_keys)
    if (j.contains(key))
      fail("SPEC: \"", key,
           "\" does not apply to the multi-layer mode (\"layers\"), whose routers are \"softmax_topk\" and "
           "\"sigmoid_topk\"");
  expect_known_keys(j, "SPEC (multi-layer mode)",
                    {"layers", "pool", "pool_members", "temperature", "pool_top_members", "residual_expert_size",
                     "residual_mix_bias", "shared_experts", "d_model", "n_experts", "expert_size", "k", "router",
                     "renormalize", "activation", "bias", "coef", "dtype", "mode", "capacity_factor", "backend"});
  StackSpec s;
  s.backend = choice<BackendKind>(j, "backend", backend_names, "cpu");
  s.layers = positive_int(j, "layers");

  if (!j.contains("router")) fail("SPEC: missing required key \"router\"");
  if (!j["router"].is_string()) fail("SPEC: \"router\" must be a string, got ", shown(j["router"]));
  const std::string router = j["router"].get<std::string>();
  if (router != "softmax_topk" && router != "sigmoid_topk")
    fail("SPEC: \"router\" must be \"softmax_topk\" or \"sigmoid_topk\" in the multi-layer mode (\"layers\"), got \"",
         smoe::io::clip_text(router), "\"");
  s.sigmoid = router == "sigmoid_topk";
  s.d_model = positive_int(j, "d_model");
  s.n_experts = positive_int(j, "n_experts");
  s.expert_size = positive_int(j, "expert_size");
  s.k = positive_int(j, "k");  // k <= n_experts: checked by the router
  s.renormalize = optional_bool(j, "renormalize");
  if (s.renormalize && s.sigmoid)
    fail("SPEC: \"renormalize\": true needs router \"softmax_topk\", got router \"sigmoid_topk\"");
  s.activation = parse_activation(j);
  s.bias = optional_bool(j, "bias");
  s.dtype = parse_dtype(j);
  s.mode = parse_mode(j);
  s.coef = parse_coefficients(j, true, "router \"" + router + "\"");
  s.capacity_factor = optional_number(j, "capacity_factor", 0.0);
  if (s.capacity_factor < 0.0) fail("SPEC: \"capacity_factor\" must be >= 0 (0 = dropless), got ", s.capacity_factor);

  s.pool = choice<PoolKind>(j, "pool", stack_spec_detail::pool_names, "per_layer");
  const bool samoe = s.pool == PoolKind::samoe_weight || s.pool == PoolKind::samoe_output;
  if (!samoe)
    for (const std::string_view key : stack_spec_detail::samoe_only_keys)
      if (j.contains(key))
        fail("SPEC: \"", key, "\" does not apply to pool \"", stack_spec_detail::name_of(s.pool),
             "\" (it applies to \"samoe_weight\", \"samoe_output\")");
  if (samoe) {
    s.members = positive_int(j, "pool_members");
    s.temperature = optional_number(j, "temperature", 1.0);
    if (!(s.temperature > 0.0)) fail("SPEC: \"temperature\" must be > 0, got ", s.temperature);
    s.top_members = optional_int(j, "pool_top_members", 0, 0);
    if (s.top_members > s.members)
      fail("SPEC: \"pool_top_members\" must be in [0, pool_members = ", s.members, "] (0 = all), got ", s.top_members);
  }

  s.residual_size = optional_int(j, "residual_expert_size", 0, 0);
  if (j.contains("residual_mix_bias") && s.residual_size == 0)
    fail("SPEC: \"residual_mix_bias\" needs a residual expert (\"residual_expert_size\" >= 1)");
  s.residual_mix_bias = optional_bool(j, "residual_mix_bias");
  s.shared_experts = optional_int(j, "shared_experts", 0, 0);
  return s;
}

// Every parameter of the stack is read from IN: its sizes are checked against IN before building.
inline void expect_stack_backed(const StackSpec& s, const smoe::io::SafetensorsFile& in) {
  const std::size_t bytes = s.dtype == ScalarKind::float64 ? 8 : 4;
  const index_t halves = s.activation == ActivationKind::swiglu ? 2 : 1;
  const index_t pool_layers = s.pool == PoolKind::per_layer ? s.layers : 1;
  const index_t members = s.pool == PoolKind::samoe_weight || s.pool == PoolKind::samoe_output ? s.members : 1;
  expect_backed(in, bytes, "the routers' weights",
                {{"layers", s.layers}, {"n_experts", s.n_experts}, {"d_model", s.d_model}});
  expect_backed(in, bytes, "the experts' w1",
                {{"layers or 1", pool_layers}, {"pool_members or 1", members}, {"n_experts", s.n_experts},
                 {"d_model", s.d_model}, {"expert_size", s.expert_size}, {"halves (2 for swiglu)", halves}});
  expect_backed(in, bytes, "the residual experts' w1",
                {{"layers", s.layers}, {"d_model", s.d_model}, {"residual_expert_size", s.residual_size}});
  expect_backed(in, bytes, "the shared experts' w1",
                {{"layers", s.layers}, {"shared_experts", s.shared_experts}, {"d_model", s.d_model},
                 {"expert_size", s.expert_size}});
}

inline void run_stack(const json& j, const std::string& in_path, const std::string& out_path) {
  const StackSpec spec = parse_stack_spec(j);
  const auto in = smoe::io::SafetensorsFile::load(in_path);
  expect_stack_backed(spec, in);
  if (spec.backend == BackendKind::cuda) {
    evaluate_stack_on_device(spec, in).save(out_path);
    return;
  }
  const auto evaluate = [&]<class T>() {
    switch (spec.pool) {
      case PoolKind::per_layer: return evaluate_stack<T, PoolKind::per_layer>(spec, in);
      case PoolKind::tied: return evaluate_stack<T, PoolKind::tied>(spec, in);
      case PoolKind::samoe_weight: return evaluate_stack<T, PoolKind::samoe_weight>(spec, in);
      case PoolKind::samoe_output: break;
    }
    return evaluate_stack<T, PoolKind::samoe_output>(spec, in);
  };
  if (spec.dtype == ScalarKind::float64)
    evaluate.template operator()<double>().save(out_path);
  else
    evaluate.template operator()<float>().save(out_path);
}

}  // namespace smoe_eval
