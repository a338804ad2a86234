// smoe_eval: runs one MoE layer described by a JSON spec on tensors from a safetensors file, so an
// independent implementation (another framework, a reference script) can check smoe's numbers.
//
//   smoe_eval SPEC.json IN.safetensors OUT.safetensors
//   smoe_eval hf MODEL_DIR IN.safetensors OUT.safetensors --layer L   (examples/smoe_eval_hf.cpp)
//
// SPEC  {"d_model", "n_experts", "expert_size", "k", "router", "activation": "relu" | "gelu" | "swiglu",
//        "bias": false, "coef": {"switch": 0, "z": 0, "entropy": 0, "importance": 0},
//        "dtype": "float32" | "float64", "mode": "eval" | "train", "capacity_factor": 0,
//        "expert_parallel": false (true: run under mpirun, experts sharded over the ranks), ...}
//       router: softmax_topk ("renormalize"), sigmoid_topk, noisy_topk ("seed", "load_coef"),
//       sbase ("sinkhorn_iters"), base (k = 1), expert_choice (no "k"; "capacity_factor" is its own),
//       hash (k = 1, "seed"), group_topk ("n_groups", "topk_groups", "route_scale"),
//       pkm ("pkm_keys", "pkm_heads", k per head, "activation": "relu" | "softmax" |
//       "softmax_across_heads", value experts: no "expert_size"). A key that does not apply to the
//       chosen router is an error. docs/smoe_eval.md has the full table.
// IN    x [T, d], optional dy [T, d], the layer's parameters by name (router.weight [E, d],
//       router.noise_weight [E, d] (noisy_topk), router.keys_a / router.keys_b [H, N, d/2] (pkm),
//       experts.w1 [E, d, G] ([E, d, 2G] for swiglu: gate half first, then up half), experts.w2
//       [E, G, d], with bias experts.b1 [E, G] ([E, 2G]) and experts.b2 [E, d]; experts.values
//       [N², d] (pkm)), optional router.bias [E] (group_topk's selection bias), ids [T] (I64 token
//       ids, hash). Every floating tensor has the SPEC dtype.
// OUT   y [T, d], aux_loss [] (Σ coef · loss, plus noisy_topk's load_coef · load loss),
//       expert_counts [E] and routing.tokens_per_expert [E] (I64, dispatched assignments per expert),
//       for every router but expert_choice routing.experts [T, K] (I32, the dispatched ids: −1 where
//       a capacity limit dropped the assignment) and routing.gates [T, K] (0 at −1), and when dy is
//       given the gradients of sum(y ⊙ dy) + aux_loss: grad.x and grad.<name> of every parameter.
// A bad spec, a missing, unexpected or mis-shaped tensor or a wrong dtype prints one line to stderr
// and exits with status 1.
// With "layers": L in the SPEC it runs a stack of L layers over an expert pool instead ("pool":
// per_layer | tied | samoe_weight | samoe_output, "residual_expert_size", "shared_experts", ...;
// tensors layers.{l}.router.weight, pool.w1, layers.{l}.combine, ...): smoe_eval_stack.hpp.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <fstream>
#include <iostream>
#include <iterator>
#include <limits>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "smoe_eval_common.hpp"
#include "smoe_eval_layer.hpp"
#include "smoe_eval_stack.hpp"

namespace {

using namespace smoe_eval;

constexpr const char* usage =
    "usage: smoe_eval SPEC.json IN.safetensors OUT.safetensors\n"
    "  runs one MoE layer (forward, and backward when IN holds dy) and writes y, aux_loss,\n"
    "  expert_counts, routing.* and the gradients grad.* to OUT; see the header of examples/smoe_eval.cpp\n"
    "  (\"layers\": L in the SPEC: a stack of L layers over an expert pool, docs/smoe_eval.md)\n";

// Keys that only some routers read: present with another router, they are an error (never ignored).
struct RouterOnlyKey {
  std::string_view key;
  std::initializer_list<RouterKind> routers;
};
const RouterOnlyKey router_only_keys[] = {
    {"seed", {RouterKind::noisy_topk, RouterKind::hash}},
    {"load_coef", {RouterKind::noisy_topk}},
    {"sinkhorn_iters", {RouterKind::sbase}},
    {"n_groups", {RouterKind::group_topk}},
    {"topk_groups", {RouterKind::group_topk}},
    {"route_scale", {RouterKind::group_topk}},
    {"pkm_heads", {RouterKind::pkm}},
    {"pkm_keys", {RouterKind::pkm}},
    {"capacity_factor",
     {RouterKind::softmax_topk, RouterKind::sigmoid_topk, RouterKind::noisy_topk, RouterKind::sbase,
      RouterKind::expert_choice, RouterKind::hash, RouterKind::group_topk, RouterKind::pkm}},
    {"expert_size",
     {RouterKind::softmax_topk, RouterKind::sigmoid_topk, RouterKind::noisy_topk, RouterKind::sbase, RouterKind::base,
      RouterKind::expert_choice, RouterKind::hash, RouterKind::group_topk}},
};

void expect_applicable_keys(const json& j, RouterKind router) {
  for (const auto& rule : router_only_keys) {
    if (!j.contains(rule.key)) continue;
    if (std::find(rule.routers.begin(), rule.routers.end(), router) != rule.routers.end()) continue;
    std::string list;
    for (RouterKind r : rule.routers) list += (list.empty() ? "\"" : ", \"") + std::string(name_of(r)) + "\"";
    fail("SPEC: \"", rule.key, "\" does not apply to router \"", name_of(router), "\" (it applies to ", list, ")");
  }
}

Spec parse_spec(const json& j) {
  if (!j.is_object()) fail("SPEC: must be a JSON object, got ", j.type_name());
  expect_known_keys(j, "SPEC", {"d_model",        "n_experts",       "expert_size", "k",           "router",
                                "renormalize",    "activation",      "bias",        "coef",        "dtype",
                                "mode",           "capacity_factor", "n_groups",    "topk_groups", "route_scale",
                                "sinkhorn_iters", "pkm_heads",       "pkm_keys",    "seed",        "load_coef",
                                "backend",        "expert_parallel"});
  Spec s;
  s.expert_parallel = optional_bool(j, "expert_parallel");
  s.backend = choice<BackendKind>(j, "backend", backend_names, "cpu");
  s.router = choice<RouterKind>(j, "router", router_names);
  const RouterKind r = s.router;
  const std::string router = "router \"" + std::string(name_of(r)) + "\"";
  expect_applicable_keys(j, r);
  s.d_model = positive_int(j, "d_model");

  if (r == RouterKind::pkm) {
    s.pkm_keys = positive_int(j, "pkm_keys");
    s.pkm_heads = optional_int(j, "pkm_heads", s.pkm_heads, 1);
    constexpr index_t max_keys = smoe::ProductKeyRouterConfig::max_keys;
    if (s.pkm_keys > max_keys)
      fail("SPEC: \"pkm_keys\" must be <= ", max_keys, " (the pkm_keys² value ids are int32), got ", s.pkm_keys);
    s.n_experts = s.pkm_keys * s.pkm_keys;
    if (j.contains("n_experts") && integer(j, "n_experts") != s.n_experts)
      fail("SPEC: \"n_experts\" must be pkm_keys² = ", s.n_experts, " for ", router, ", got ", integer(j, "n_experts"));
  } else {
    s.n_experts = positive_int(j, "n_experts");
  }

  if (r == RouterKind::base || r == RouterKind::hash) {
    s.k = optional_int(j, "k", 1, 1);
    if (s.k != 1) fail("SPEC: ", router, " routes each token to one expert: \"k\" must be 1, got ", s.k);
  } else if (r == RouterKind::expert_choice) {
    if (j.contains("k"))
      fail("SPEC: \"k\" does not apply to ", router,
           " (each expert takes min(T, max(1, floor(T · capacity_factor / E))) tokens; set \"capacity_factor\")");
    s.k = s.n_experts;  // the router's row width
  } else {
    s.k = positive_int(j, "k");  // pkm: per head
  }

  s.renormalize = optional_bool(j, "renormalize");
  if (s.renormalize && r != RouterKind::softmax_topk)
    fail("SPEC: \"renormalize\": true needs router \"softmax_topk\", got ", router);

  if (r == RouterKind::pkm) {
    constexpr std::pair<std::string_view, smoe::PkmActivation> pkm_gates[] = {
        {"relu", smoe::PkmActivation::relu},
        {"softmax", smoe::PkmActivation::softmax},
        {"softmax_across_heads", smoe::PkmActivation::softmax_across_heads}};
    s.pkm_activation = choice<smoe::PkmActivation>(j, "activation", pkm_gates, "relu");
    if (optional_bool(j, "bias"))
      fail("SPEC: \"bias\": true does not apply to ", router, " (its value experts have no biases)");
  } else {
    s.expert_size = positive_int(j, "expert_size");
    s.activation = parse_activation(j);
    s.bias = optional_bool(j, "bias");
  }

  s.dtype = parse_dtype(j);
  s.mode = parse_mode(j);

  const Coefficients coef = parse_coefficients(j, r != RouterKind::hash && r != RouterKind::pkm, router);
  s.coef_switch = coef.switch_balance;
  s.coef_z = coef.z;
  s.coef_entropy = coef.entropy;
  s.coef_importance = coef.importance;

  if (r == RouterKind::expert_choice) {
    s.capacity_factor = optional_number(j, "capacity_factor", 2.0);
    if (!(s.capacity_factor > 0.0))
      fail("SPEC: \"capacity_factor\" of ", router, " must be > 0 (average experts per token), got ",
           s.capacity_factor);
  } else {
    s.capacity_factor = optional_number(j, "capacity_factor", 0.0);
    if (s.capacity_factor < 0.0) fail("SPEC: \"capacity_factor\" must be >= 0 (0 = dropless), got ", s.capacity_factor);
  }
  s.load_coef = optional_number(j, "load_coef", 0.0);
  if (s.load_coef < 0.0) fail("SPEC: \"load_coef\" must be >= 0, got ", s.load_coef);
  s.sinkhorn_iters = optional_int(j, "sinkhorn_iters", s.sinkhorn_iters, 0);
  if (s.sinkhorn_iters > std::numeric_limits<int>::max())
    fail("SPEC: \"sinkhorn_iters\" must be <= ", std::numeric_limits<int>::max(), ", got ", s.sinkhorn_iters);
  s.n_groups = optional_int(j, "n_groups", s.n_groups, 1);
  s.topk_groups = optional_int(j, "topk_groups", s.topk_groups, 1);
  s.route_scale = optional_number(j, "route_scale", s.route_scale);
  if (!(s.route_scale > 0.0)) fail("SPEC: \"route_scale\" must be > 0, got ", s.route_scale);
  if (j.contains("seed")) {
    const json& v = j["seed"];
    if (!v.is_number_unsigned()) fail("SPEC: \"seed\" must be an integer in [0, 2^64), got ", shown(v));
    s.seed = v.get<std::uint64_t>();
  }
  return s;
}

// Every parameter of the layer is read from IN: its sizes are checked against IN before building.
void expect_spec_backed(const Spec& s, const smoe::io::SafetensorsFile& in) {
  const std::size_t bytes = s.dtype == ScalarKind::float64 ? 8 : 4;
  if (s.router == RouterKind::pkm) {
    expect_backed(in, bytes, "experts.values", {{"pkm_keys²", s.n_experts}, {"d_model", s.d_model}});
    expect_backed(in, bytes, "router.keys_a",
                  {{"pkm_heads", s.pkm_heads}, {"pkm_keys", s.pkm_keys}, {"d_model / 2", s.d_model / 2}});
    return;
  }
  expect_backed(in, bytes, "experts.w1",
                {{"n_experts", s.n_experts},
                 {"d_model", s.d_model},
                 {"expert_size", s.expert_size},
                 {"halves (2 for swiglu)", s.activation == ActivationKind::swiglu ? 2 : 1}});
}

template <class Layer>
smoe::io::SafetensorsWriter evaluate(Layer& layer, const Spec& spec, const smoe::io::SafetensorsFile& in) {
  using T = typename Layer::scalar_type;
  using R = std::remove_reference_t<decltype(layer.router())>;
  constexpr bool group_topk = std::is_same_v<R, smoe::GroupTopKRouter<T>>;
  constexpr bool hash = std::is_same_v<R, smoe::HashRouter<T>>;
  constexpr bool expert_choice = std::is_same_v<R, smoe::ExpertChoiceRouter<T>>;
  const index_t d = layer.d_model(), E = layer.n_experts();
  std::set<std::string> data = {"x", "dy"};
  if constexpr (group_topk) data.insert("router.bias");
  if constexpr (hash) data.insert("ids");
  load_parameters<T>(in, layer, std::move(data));
  if constexpr (group_topk)
    if (in.contains("router.bias")) layer.router().bias().values = load<T>(in, "router.bias", {E});

  const auto x = load_x<T>(in, d);
  const std::vector<index_t> x_shape = x.shape();
  const index_t tokens = x_shape[0];
  if constexpr (hash) {
    if (!in.contains("ids"))
      fail(in.source(), ": missing tensor 'ids' (I64 [", tokens,
           "], the token id of each row of x, which router \"hash\" routes by)");
    const auto ids = load<std::int64_t>(in, "ids", {tokens}, " (int64 token ids)");
    layer.router().set_token_ids(std::span<const std::int64_t>(ids.data(), static_cast<std::size_t>(tokens)));
  }
  smoe::Tensor<T> dy;
  if (in.contains("dy")) dy = load<T>(in, "dy", x_shape);  // checked before anything runs

  if constexpr (!expert_choice) layer.capacity.capacity_factor = spec.capacity_factor;
  smoe::Tensor<T> y({tokens, d});
  layer.validate_inputs = true;
  const auto result = layer.forward(x.matrix(), y.matrix(), spec.mode);

  smoe::io::SafetensorsWriter out;
  out.set_metadata("producer", "smoe_eval");
  out.add("y", y);
  smoe::Tensor<T> aux(std::vector<index_t>{});
  aux[0] = result.aux_loss;
  out.add("aux_loss", aux);
  smoe::Tensor<std::int64_t> counts({E});
  for (index_t e = 0; e < E; ++e) counts[e] = result.stats.tokens_per_expert[static_cast<std::size_t>(e)];
  out.add("expert_counts", counts);
  out.add("routing.tokens_per_expert", counts);
  if constexpr (!expert_choice) {
    // The dispatched routing: the router's ids with capacity-dropped assignments set to −1, and
    // their gates (0 at −1), so that y_t = Σ_k gates[t, k] · expert_{experts[t, k]}(x_t).
    const smoe::Tensor<std::int32_t>& ids = layer.dispatched_experts();
    smoe::Tensor<T> gates = layer.routing().gates;
    for (index_t i = 0; i < gates.size(); ++i)
      if (ids[i] < 0) gates[i] = T(0);
    out.add("routing.experts", ids);
    out.add("routing.gates", gates);
  }

  if (dy.rank() == 2) {
    smoe::Tensor<T> dx({tokens, d});
    smoe::zero_grad(layer);
    layer.backward(dy.matrix(), dx.matrix());
    out.add("grad.x", dx);
    layer.for_each_parameter(
        [&](std::string_view name, smoe::Parameter<T>& p) { out.add("grad." + std::string(name), p.grad); });
  }
  return out;
}

}  // namespace

namespace smoe_eval {

void run(const std::string& spec_path, const std::string& in_path, const std::string& out_path) {
  const json j = read_spec_file(spec_path);
  if (is_stack_spec(j)) {
    run_stack(j, in_path, out_path);  // "layers": the multi-layer mode (smoe_eval_stack.hpp)
    return;
  }
  reject_stack_keys(j);
  const Spec spec = parse_spec(j);
  const auto in = smoe::io::SafetensorsFile::load(in_path);
  expect_spec_backed(spec, in);
  if (spec.expert_parallel) {
    evaluate_expert_parallel(spec, in, out_path);  // under mpirun: smoe_eval_expert_parallel.cpp
    return;
  }
  if (spec.backend == BackendKind::cuda) {
    evaluate_on_device(spec, in).save(out_path);
    return;
  }
  with_scalar(spec.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    with_layer<T, smoe::cpu>(spec, [&](auto& layer) { evaluate(layer, spec, in).save(out_path); });
  });
}

int run_hf(int argc, char** argv);  // smoe_eval_hf.cpp: `smoe_eval hf MODEL_DIR IN OUT --layer L`

// main's body (examples/smoe_eval_main.cpp), apart so the fuzz harness links the rest.
int run_main(int argc, char** argv) {
  if (argc >= 2 && std::string_view(argv[1]) == "hf") return run_hf(argc, argv);
  if (argc == 2 && (std::string_view(argv[1]) == "--help" || std::string_view(argv[1]) == "-h")) {
    std::cout << usage;
    return 0;
  }
  if (argc != 4) {
    std::cerr << "smoe_eval: expected 3 arguments, got " << argc - 1 << "\n" << usage;
    return 1;
  }
  try {
    run(argv[1], argv[2], argv[3]);
  } catch (const smoe::error& e) {
    std::cerr << "smoe_eval: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "smoe_eval: unexpected failure: " << e.what() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace smoe_eval
