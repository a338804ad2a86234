#pragma once
// The single-layer SPEC of smoe_eval (examples/smoe_eval.cpp parses it) and the layers it
// describes, built on a backend: smoe::cpu here, smoe::cuda in examples/smoe_eval_cuda.cpp.
#include <smoe/experts/value_experts.hpp>
#include <smoe/io/safetensors.hpp>
#include <smoe/routing/base_router.hpp>
#include <smoe/routing/expert_choice.hpp>
#include <smoe/routing/group_topk.hpp>
#include <smoe/routing/hash_router.hpp>
#include <smoe/routing/noisy_topk.hpp>
#include <smoe/routing/product_key_router.hpp>
#include <smoe/routing/sbase_router.hpp>
#include <smoe/smoe.hpp>

#include <cstdint>
#include <string_view>
#include <type_traits>
#include <utility>

#include "smoe_eval_common.hpp"

namespace smoe_eval {

enum class RouterKind { softmax_topk, sigmoid_topk, noisy_topk, sbase, base, expert_choice, hash, group_topk, pkm };

constexpr std::pair<std::string_view, RouterKind> router_names[] = {
    {"softmax_topk", RouterKind::softmax_topk},
    {"sigmoid_topk", RouterKind::sigmoid_topk},
    {"noisy_topk", RouterKind::noisy_topk},
    {"sbase", RouterKind::sbase},
    {"base", RouterKind::base},
    {"expert_choice", RouterKind::expert_choice},
    {"hash", RouterKind::hash},
    {"group_topk", RouterKind::group_topk},
    {"pkm", RouterKind::pkm},
};

inline std::string_view name_of(RouterKind r) {
  for (const auto& [n, kind] : router_names)
    if (kind == r) return n;
  return "?";
}

struct Spec {
  BackendKind backend = BackendKind::cpu;
  index_t d_model = 0, n_experts = 0, expert_size = 0, k = 0;
  RouterKind router = RouterKind::softmax_topk;
  bool renormalize = false;
  ActivationKind activation = ActivationKind::relu;
  smoe::PkmActivation pkm_activation = smoe::PkmActivation::relu;
  bool bias = false;
  double coef_switch = 0, coef_z = 0, coef_entropy = 0, coef_importance = 0;
  ScalarKind dtype = ScalarKind::float32;
  smoe::Mode mode = smoe::Mode::eval;
  double capacity_factor = 0;  // token choice: MoE's CapacityPolicy (0 = dropless); expert_choice: its own
  index_t n_groups = 1, topk_groups = 1;
  double route_scale = 1;
  index_t sinkhorn_iters = 3;
  index_t pkm_heads = 4, pkm_keys = 0;
  std::uint64_t seed = 0;
  double load_coef = 0;
  bool expert_parallel = false;  // the layer's experts sharded over the MPI ranks
};

// Runtime SPEC choices to template arguments: each helper calls `f` with the chosen type or object.
template <class T>
struct Tag {
  using type = T;
};

template <class F>
void with_scalar(ScalarKind kind, F&& f) {
  if (kind == ScalarKind::float64)
    f(Tag<double>{});
  else
    f(Tag<float>{});
}

// Routers that feed FeedForwardExperts (all but pkm), on Backend.
template <class T, class Backend, class F>
void with_router(const Spec& s, F&& f) {
  const index_t d = s.d_model, E = s.n_experts, K = s.k;
  const smoe::TopKRouterConfig c{.d_model = d, .experts = E, .k = K};
  if constexpr (!std::is_same_v<Backend, smoe::cpu>) {
    switch (s.router) {
      case RouterKind::softmax_topk:
        f(smoe::TopKRouter<T, smoe::SoftmaxGate, Backend>(c, smoe::SoftmaxGate{.renormalize = s.renormalize}));
        return;
      case RouterKind::sigmoid_topk: f(smoe::SigmoidTopK<T, Backend>(c)); return;
      case RouterKind::noisy_topk:
        f(smoe::NoisyTopK<T, Backend>({.d_model = d, .experts = E, .k = K, .load_coef = s.load_coef, .seed = s.seed}));
        return;
      case RouterKind::sbase:
        f(smoe::SBaseRouter<T, Backend>({.d_model = d, .experts = E, .k = K, .sinkhorn_iters = int(s.sinkhorn_iters)}));
        return;
      case RouterKind::base: f(smoe::BaseRouter<T, Backend>({.d_model = d, .experts = E})); return;
      case RouterKind::expert_choice:
        f(smoe::ExpertChoiceRouter<T, Backend>({.d_model = d, .experts = E, .capacity_factor = s.capacity_factor}));
        return;
      case RouterKind::hash: f(smoe::HashRouter<T, Backend>({.d_model = d, .experts = E, .seed = s.seed})); return;
      case RouterKind::group_topk:
        f(smoe::GroupTopKRouter<T, Backend>({.d_model = d,
                                             .experts = E,
                                             .k = K,
                                             .n_groups = s.n_groups,
                                             .topk_groups = s.topk_groups,
                                             .route_scale = s.route_scale}));
        return;
      case RouterKind::pkm: break;  // with value experts: with_layer
    }
    fail("smoe_eval: pkm has no feed-forward experts");
  } else {
    switch (s.router) {
      case RouterKind::softmax_topk: f(smoe::SoftmaxTopK<T>(c, smoe::SoftmaxGate{.renormalize = s.renormalize})); break;
      case RouterKind::sigmoid_topk: f(smoe::SigmoidTopK<T>(c)); break;
      case RouterKind::noisy_topk:
        f(smoe::NoisyTopK<T>({.d_model = d, .experts = E, .k = K, .load_coef = s.load_coef, .seed = s.seed}));
        break;
      case RouterKind::sbase:
        f(smoe::SBaseRouter<T>({.d_model = d, .experts = E, .k = K, .sinkhorn_iters = int(s.sinkhorn_iters)}));
        break;
      case RouterKind::base: f(smoe::BaseRouter<T>({.d_model = d, .experts = E})); break;
      case RouterKind::expert_choice:
        f(smoe::ExpertChoiceRouter<T>({.d_model = d, .experts = E, .capacity_factor = s.capacity_factor}));
        break;
      case RouterKind::hash: f(smoe::HashRouter<T>({.d_model = d, .experts = E, .seed = s.seed})); break;
      case RouterKind::group_topk:
        f(smoe::GroupTopKRouter<T>({.d_model = d,
                                    .experts = E,
                                    .k = K,
                                    .n_groups = s.n_groups,
                                    .topk_groups = s.topk_groups,
                                    .route_scale = s.route_scale}));
        break;
      case RouterKind::pkm: fail("smoe_eval: pkm has no feed-forward experts");  // handled by with_layer
    }
  }
}

template <class T, class Backend, class F>
void with_experts(const Spec& s, F&& f) {
  const smoe::FeedForwardConfig c{
      .d_model = s.d_model, .experts = s.n_experts, .hidden = s.expert_size, .bias = s.bias};
  switch (s.activation) {
    case ActivationKind::relu: f(smoe::ReluExperts<T, Backend>(c)); break;
    case ActivationKind::gelu: f(smoe::GeluExperts<T, Backend>(c)); break;
    case ActivationKind::swiglu: f(smoe::SwiGluExperts<T, Backend>(c)); break;
  }
}

// The layer of the spec. Routers without logits (hash, pkm) get only the gate-based importance
// loss: the logit-based losses refuse them.
template <class T, class Backend, class F>
void with_layer(const Spec& s, F&& f) {
  if (s.router == RouterKind::pkm) {
    smoe::MoE layer(smoe::ProductKeyRouter<T, Backend>({.d_model = s.d_model,
                                                        .n_keys = s.pkm_keys,
                                                        .heads = s.pkm_heads,
                                                        .k = s.k,
                                                        .activation = s.pkm_activation}),
                    smoe::ValueExperts<T, Backend>({.d_model = s.d_model, .values = s.n_experts}),
                    smoe::WeightedSum<T, Backend>{}, smoe::ImportanceLoss<T, Backend>(s.coef_importance));
    f(layer);
    return;
  }
  with_router<T, Backend>(s, [&](auto router) {
    with_experts<T, Backend>(s, [&](auto experts) {
      if constexpr (std::is_same_v<decltype(router), smoe::HashRouter<T, Backend>>) {
        smoe::MoE layer(std::move(router), std::move(experts), smoe::WeightedSum<T, Backend>{},
                        smoe::ImportanceLoss<T, Backend>(s.coef_importance));
        f(layer);
      } else {
        smoe::MoE layer(std::move(router), std::move(experts), smoe::WeightedSum<T, Backend>{},
                        smoe::SwitchBalanceLoss<T, Backend>(s.coef_switch), smoe::RouterZLoss<T, Backend>(s.coef_z),
                        smoe::EntropyLoss<T, Backend>(s.coef_entropy), smoe::ImportanceLoss<T, Backend>(s.coef_importance));
        f(layer);
      }
    });
  });
}

// The layer of `spec` on the CUDA backend, its parameters and inputs from `in`: the same outputs as
// the CPU run (examples/smoe_eval_cuda.cpp; examples/smoe_eval_no_cuda.cpp where smoe_eval is built
// without a CUDA backend, refusing "backend": "cuda").
smoe::io::SafetensorsWriter evaluate_on_device(const Spec& spec, const smoe::io::SafetensorsFile& in);

// "expert_parallel": true: the layer of `spec` run expert-parallel over MPI_COMM_WORLD, each rank on
// its token block; rank 0 writes OUT (examples/smoe_eval_expert_parallel.cpp; without MPI,
// examples/smoe_eval_expert_parallel_no_mpi.cpp refuses the flag).
void evaluate_expert_parallel(const Spec& spec, const smoe::io::SafetensorsFile& in, const std::string& out_path);

}  // namespace smoe_eval
