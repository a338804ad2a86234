// smoe_eval's "backend": "cuda": the SPEC's layer, or stack of layers, built from the CUDA backend's
// components, run on the device, with the CPU run's outputs (examples/smoe_eval.cpp's evaluate and
// smoe_eval_stack_impl.hpp's). Compiled by nvcc (smoe_eval_cuda.cu: the GPU) or by the host
// compiler as the host-emulated device build.
#include <smoe/cuda.cuh>

#include <set>
#include <span>
#include <string>
#include <type_traits>
#include <utility>

#include "smoe_eval_layer.hpp"
#include "smoe_eval_stack_impl.hpp"

namespace smoe_eval {

// A device layer's forward returns device pointers to its losses.
template <class T>
struct stack_detail::LayerOutput<T, smoe::cuda> {
  using type = smoe::MoEDeviceOutput<T>;
};

namespace {

template <class Layer>
smoe::io::SafetensorsWriter evaluate_device(Layer& layer, const Spec& spec, const smoe::io::SafetensorsFile& in) {
  using T = typename Layer::scalar_type;
  using G = typename Layer::gate_type;
  using R = std::remove_reference_t<decltype(layer.router())>;
  constexpr bool group_topk = std::is_same_v<R, smoe::GroupTopKRouter<T, smoe::cuda>>;
  constexpr bool hash = std::is_same_v<R, smoe::HashRouter<T, smoe::cuda>>;
  constexpr bool expert_choice = std::is_same_v<R, smoe::ExpertChoiceRouter<T, smoe::cuda>>;
  const index_t d = layer.d_model(), E = layer.n_experts();
  std::set<std::string> data = {"x", "dy"};
  if constexpr (group_topk) data.insert("router.bias");
  if constexpr (hash) data.insert("ids");
  load_parameters<T>(in, layer, std::move(data));
  if constexpr (group_topk)
    if (in.contains("router.bias")) copy(load<G>(in, "router.bias", {E}), layer.router().bias());

  const auto x = load_x<T>(in, d);
  const index_t tokens = x.shape()[0];
  if constexpr (hash) {
    if (!in.contains("ids"))
      fail(in.source(), ": missing tensor 'ids' (I64 [", tokens,
           "], the token id of each row of x, which router \"hash\" routes by)");
    layer.router().set_token_ids(smoe::to_device(load<std::int64_t>(in, "ids", {tokens}, " (int64 token ids)")));
  }
  smoe::Tensor<T> dy;
  if (in.contains("dy")) dy = load<T>(in, "dy", x.shape());  // checked before anything runs

  const auto xd = smoe::to_device(x);
  smoe::Tensor<T, smoe::cuda> yd({tokens, d});
  if constexpr (!expert_choice) layer.capacity.capacity_factor = spec.capacity_factor;
  layer.validate_inputs = true;
  layer.forward(xd.matrix(), yd.matrix(), spec.mode);

  smoe::io::SafetensorsWriter out;
  out.set_metadata("producer", "smoe_eval");
  out.add("y", smoe::to_host(yd));
  smoe::Tensor<T> aux(std::vector<index_t>{});
  aux[0] = T(layer.read_losses().aux_loss);
  out.add("aux_loss", aux);
  const smoe::RoutingStats stats = layer.routing_stats();
  smoe::Tensor<std::int64_t> counts({E});
  for (index_t e = 0; e < E; ++e) counts[e] = stats.tokens_per_expert[static_cast<std::size_t>(e)];
  out.add("expert_counts", counts);
  out.add("routing.tokens_per_expert", counts);
  if constexpr (!expert_choice) {
    // The dispatched routing: the router's ids with capacity-dropped assignments set to −1, and
    // their gates (0 at −1), as the CPU run writes them.
    const auto ids = smoe::to_host(layer.dispatched_experts());
    auto gates = smoe::to_host<T>(layer.routing().gates);
    for (index_t i = 0; i < gates.size(); ++i)
      if (ids[i] < 0) gates[i] = T(0);
    out.add("routing.experts", ids);
    out.add("routing.gates", gates);
  }

  if (dy.rank() == 2) {
    smoe::Tensor<T, smoe::cuda> dxd({tokens, d});
    smoe::zero_grad(layer);
    layer.backward(smoe::to_device(dy).matrix(), dxd.matrix());
    out.add("grad.x", smoe::to_host(dxd));
    layer.for_each_parameter([&](std::string_view name, smoe::Parameter<T, smoe::cuda>& p) {
      out.add("grad." + std::string(name), smoe::to_host(p.grad));
    });
  }
  return out;
}

}  // namespace

smoe::io::SafetensorsWriter evaluate_on_device(const Spec& spec, const smoe::io::SafetensorsFile& in) {
  std::string why;
  if (!smoe::cuda_device_available(&why)) fail("\"backend\": \"cuda\": no usable CUDA device (", why, ")");
  smoe::io::SafetensorsWriter out;
  with_scalar(spec.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    with_layer<T, smoe::cuda>(spec, [&](auto& layer) { out = evaluate_device(layer, spec, in); });
  });
  return out;
}

smoe::io::SafetensorsWriter evaluate_stack_on_device(const StackSpec& spec, const smoe::io::SafetensorsFile& in) {
  std::string why;
  if (!smoe::cuda_device_available(&why)) fail("\"backend\": \"cuda\": no usable CUDA device (", why, ")");
  const auto evaluate = [&]<class T>() {
    switch (spec.pool) {
      case PoolKind::per_layer: return evaluate_stack<T, PoolKind::per_layer, smoe::cuda>(spec, in);
      case PoolKind::tied: return evaluate_stack<T, PoolKind::tied, smoe::cuda>(spec, in);
      case PoolKind::samoe_weight: return evaluate_stack<T, PoolKind::samoe_weight, smoe::cuda>(spec, in);
      case PoolKind::samoe_output: break;
    }
    return evaluate_stack<T, PoolKind::samoe_output, smoe::cuda>(spec, in);
  };
  return spec.dtype == ScalarKind::float64 ? evaluate.template operator()<double>() : evaluate.template operator()<float>();
}

}  // namespace smoe_eval
