// smoe_eval's "expert_parallel": true (docs/smoe_eval.md): run under mpirun, every rank reads the
// same SPEC and IN, takes its contiguous token block [r·T/P, (r+1)·T/P) (the first T % P ranks one
// token more), runs the layer as smoe::ExpertParallel (rank r owns experts [r·E/P, (r+1)·E/P)), and
// rank 0 writes OUT with the tensors of the single-process mode: y, routing.* and grad.x gathered
// over all tokens, aux_loss and the gradients of the global objective Σ(y ⊙ dy) + aux_loss (router
// gradients summed over ranks by the layer, expert gradients gathered from their owners).
// Every loss coef means the global-scope loss: Switch, importance and entropy run with
// LossScope::global; the z-loss (a mean over tokens) runs with coef · T_r / T on each rank, whose
// sum over ranks is the z-loss of the global batch.
// Built only with SMOE_WITH_MPI; examples/smoe_eval_expert_parallel_no_mpi.cpp refuses the flag.
#include <smoe/dist/mpi_communicator.hpp>
#include <smoe/layers/expert_parallel.hpp>

#include <cstdint>
#include <cstring>
#include <map>
#include <set>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "mpi_session.hpp"
#include "smoe_eval_layer.hpp"

namespace smoe_eval {

namespace {

// The first token of every rank's block, [P + 1] (the first T % P ranks one token more).
std::vector<index_t> token_blocks(index_t tokens, index_t P) {
  std::vector<index_t> first(static_cast<std::size_t>(P + 1), 0);
  for (index_t r = 0; r < P; ++r) first[r + 1] = first[r] + tokens / P + (r < tokens % P ? 1 : 0);
  return first;
}

// Rank 0 receives every rank's rows (row_elems elements each) in rank order; other ranks get {}.
template <class V>
std::vector<V> gather_rows(MPI_Comm comm, std::span<const V> local, const std::vector<index_t>& rows_first,
                           index_t row_elems) {
  int rank = 0, P = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &P);
  std::vector<int> counts(static_cast<std::size_t>(P)), displs(static_cast<std::size_t>(P));
  for (int r = 0; r < P; ++r) {
    counts[r] = int((rows_first[r + 1] - rows_first[r]) * row_elems * index_t(sizeof(V)));
    displs[r] = int(rows_first[r] * row_elems * index_t(sizeof(V)));
  }
  std::vector<V> all(rank == 0 ? std::size_t(rows_first[P] * row_elems) : 0);
  if (MPI_Gatherv(local.data(), int(local.size() * sizeof(V)), MPI_BYTE, all.data(), counts.data(), displs.data(),
                  MPI_BYTE, 0, comm) != MPI_SUCCESS)
    MPI_Abort(comm, 1);  // the communicator returns errors: take the job down rather than hang
  return all;
}

template <class V>
smoe::Tensor<V> tensor_of(std::vector<index_t> shape, const std::vector<V>& values) {
  smoe::Tensor<V> t(std::move(shape));
  if (!values.empty()) std::memcpy(t.data(), values.data(), sizeof(V) * values.size());
  return t;
}

// Checks that do not depend on the ranks: the routers and options expert parallelism supports.
void expect_expert_parallel_spec(const Spec& s) {
  const std::string router = "router \"" + std::string(name_of(s.router)) + "\"";
  switch (s.router) {
    case RouterKind::softmax_topk:
    case RouterKind::sigmoid_topk:
    case RouterKind::noisy_topk:
    case RouterKind::hash:
    case RouterKind::group_topk: break;
    default:
      fail("SPEC: \"expert_parallel\": true needs a token-choice router (softmax_topk, sigmoid_topk, noisy_topk, "
           "hash, group_topk), got ",
           router, " (its assignment needs the whole batch)");
  }
  if (s.backend != BackendKind::cpu) fail("SPEC: \"expert_parallel\": true needs \"backend\": \"cpu\"");
  if (s.router == RouterKind::noisy_topk && s.load_coef != 0.0)
    fail("SPEC: \"expert_parallel\": true: noisy_topk's \"load_coef\" must be 0 (its load loss has no global "
         "scope yet), got ",
         s.load_coef);
  if (s.router == RouterKind::noisy_topk && s.mode == smoe::Mode::train)
    fail("SPEC: \"expert_parallel\": true: noisy_topk needs \"mode\": \"eval\" (its training noise is drawn by "
         "the local token index, so a rank's block would draw other noise than one process), got \"train\"");
}

template <class T, class Full>
smoe::io::SafetensorsWriter evaluate_sharded(smoe::MpiCommunicator& comm, Full& full, const Spec& spec,
                                             const smoe::io::SafetensorsFile& in) {
  using R = std::remove_reference_t<decltype(full.router())>;
  using X = std::remove_reference_t<decltype(full.experts())>;
  constexpr bool group_topk = std::is_same_v<R, smoe::GroupTopKRouter<T>>;
  constexpr bool hash = std::is_same_v<R, smoe::HashRouter<T>>;
  const index_t d = spec.d_model, E = spec.n_experts, K = spec.k;
  const index_t P = comm.size(), rank = comm.rank();
  if (E % P != 0)
    fail("SPEC: \"expert_parallel\": \"n_experts\" must be a multiple of the ranks P = ", P, ", got ", E);

  // The full layer's parameters from IN (the same checks as one process), then this rank's shard.
  std::set<std::string> data = {"x", "dy"};
  if constexpr (group_topk) data.insert("router.bias");
  if constexpr (hash) data.insert("ids");
  load_parameters<T>(in, full, std::move(data));
  if constexpr (group_topk)
    if (in.contains("router.bias")) full.router().bias().values = load<T>(in, "router.bias", {E});
  const auto x = load_x<T>(in, d);
  const index_t tokens = x.dim(0);
  smoe::Tensor<T> dy;
  if (in.contains("dy")) dy = load<T>(in, "dy", x.shape());
  std::vector<std::int64_t> ids;
  if constexpr (hash) {
    if (!in.contains("ids"))
      fail(in.source(), ": missing tensor 'ids' (I64 [", tokens,
           "], the token id of each row of x, which router \"hash\" routes by)");
    const auto all_ids = load<std::int64_t>(in, "ids", {tokens}, " (int64 token ids)");
    ids.assign(all_ids.data(), all_ids.data() + tokens);
  }

  const index_t El = E / P;
  X local(smoe::FeedForwardConfig{.d_model = d, .experts = El, .hidden = spec.expert_size, .bias = spec.bias});
  std::map<std::string, smoe::Parameter<T>*, std::less<>> full_experts;
  full.experts().for_each_parameter(
      [&](std::string_view name, smoe::Parameter<T>& p) { full_experts[std::string(name)] = &p; });
  local.for_each_parameter([&](std::string_view name, smoe::Parameter<T>& p) {
    const smoe::Parameter<T>& f = *full_experts.at(std::string(name));  // leading dimension E: rows of experts
    std::memcpy(p.value.data(), f.value.data() + rank * p.value.size(), sizeof(T) * std::size_t(p.value.size()));
  });

  const std::vector<index_t> first = token_blocks(tokens, P);
  const index_t mine = first[rank + 1] - first[rank];
  const double share = tokens == 0 ? 0.0 : double(mine) / double(tokens);  // the z-loss's T_r / T

  auto run = [&](auto& layer) {
    layer.validate_inputs = true;
    layer.capacity.capacity_factor = spec.capacity_factor;  // per expert over the global batch
    if constexpr (hash)
      layer.router().set_token_ids(std::span<const std::int64_t>(ids.data() + first[rank], std::size_t(mine)));
    smoe::Tensor<T> x_mine({mine, d}), y_mine({mine, d});
    if (mine > 0) std::memcpy(x_mine.data(), x.data() + first[rank] * d, sizeof(T) * std::size_t(mine * d));
    const auto result = layer.forward(std::as_const(x_mine).matrix(), y_mine.matrix(), spec.mode);

    // aux_loss: the global-scope losses are the same on every rank; the z-loss parts add up.
    T global_part = 0, summed_part[1] = {0};
    if constexpr (!hash) {
      global_part = T(spec.coef_switch) * result.loss_values[0] + T(spec.coef_entropy) * result.loss_values[2] +
                    T(spec.coef_importance) * result.loss_values[3];
      summed_part[0] = T(spec.coef_z * share) * result.loss_values[1];
    } else {
      global_part = T(spec.coef_importance) * result.loss_values[0];
    }
    comm.all_reduce_sum(std::span<T>(summed_part));
    std::vector<std::int64_t> counts(static_cast<std::size_t>(E));
    for (index_t e = 0; e < E; ++e) counts[e] = std::int64_t(result.stats.tokens_per_expert[std::size_t(e)]);
    MPI_Allreduce(MPI_IN_PLACE, counts.data(), int(E), MPI_INT64_T, MPI_SUM, comm.comm());

    std::vector<index_t> zero_to_p(static_cast<std::size_t>(P + 1));
    for (index_t r = 0; r <= P; ++r) zero_to_p[r] = r;  // one "row" per rank: its expert shard
    // The dispatched routing, as one process writes it: capacity-dropped ids −1, their gates 0.
    const smoe::Tensor<std::int32_t>& routed = layer.dispatched_experts();
    smoe::Tensor<T> gates = layer.routing().gates;
    for (index_t i = 0; i < gates.size(); ++i)
      if (routed[i] < 0) gates[i] = T(0);
    const auto y_all = gather_rows<T>(comm.comm(), std::span<const T>(y_mine.data(), std::size_t(y_mine.size())),
                                      first, d);
    const auto ids_all = gather_rows<std::int32_t>(
        comm.comm(), std::span<const std::int32_t>(routed.data(), std::size_t(routed.size())), first, K);
    const auto gates_all = gather_rows<T>(
        comm.comm(), std::span<const T>(gates.data(), std::size_t(gates.size())), first, K);

    smoe::io::SafetensorsWriter out;
    out.set_metadata("producer", "smoe_eval");
    out.add("y", tensor_of<T>({tokens, d}, y_all));
    smoe::Tensor<T> aux(std::vector<index_t>{});
    aux[0] = global_part + summed_part[0];
    out.add("aux_loss", aux);
    const auto counts_tensor = tensor_of<std::int64_t>({E}, counts);
    out.add("expert_counts", counts_tensor);
    out.add("routing.tokens_per_expert", counts_tensor);
    out.add("routing.experts", tensor_of<std::int32_t>({tokens, K}, ids_all));
    out.add("routing.gates", tensor_of<T>({tokens, K}, gates_all));

    if (dy.rank() == 2) {
      smoe::Tensor<T> dy_mine({mine, d}), dx_mine({mine, d});
      if (mine > 0) std::memcpy(dy_mine.data(), dy.data() + first[rank] * d, sizeof(T) * std::size_t(mine * d));
      smoe::zero_grad(layer);
      layer.backward(std::as_const(dy_mine).matrix(), dx_mine.matrix());
      out.add("grad.x", tensor_of<T>({tokens, d}, gather_rows<T>(comm.comm(),
                                                                 std::span<const T>(dx_mine.data(),
                                                                                    std::size_t(dx_mine.size())),
                                                                 first, d)));
      layer.for_each_parameter([&](std::string_view name, smoe::Parameter<T>& p) {
        std::vector<index_t> shape = p.grad.shape();
        if (!layer.sharded(name)) {  // the router: already summed over ranks by backward
          out.add("grad." + std::string(name), p.grad);
          return;
        }
        shape[0] *= P;  // the full [E, ...] from the owners' [E/P, ...], in rank order
        const auto all = gather_rows<T>(comm.comm(), std::span<const T>(p.grad.data(), std::size_t(p.grad.size())),
                                        zero_to_p, p.grad.size());
        out.add("grad." + std::string(name), tensor_of<T>(std::move(shape), all));
      });
    }
    return out;
  };

  if constexpr (hash) {
    smoe::ImportanceLoss<T> importance(spec.coef_importance);
    importance.scope = smoe::LossScope::global;
    smoe::ExpertParallel layer(comm, full.router(), std::move(local), smoe::WeightedSum<T>{}, importance);
    return run(layer);
  } else {
    smoe::SwitchBalanceLoss<T> balance(spec.coef_switch);
    balance.scope = smoe::LossScope::global;
    smoe::EntropyLoss<T> entropy(spec.coef_entropy);
    entropy.scope = smoe::LossScope::global;
    smoe::ImportanceLoss<T> importance(spec.coef_importance);
    importance.scope = smoe::LossScope::global;
    smoe::ExpertParallel layer(comm, full.router(), std::move(local), smoe::WeightedSum<T>{}, balance,
                               smoe::RouterZLoss<T>(spec.coef_z * share), entropy, importance);
    return run(layer);
  }
}

}  // namespace

void evaluate_expert_parallel(const Spec& spec, const smoe::io::SafetensorsFile& in, const std::string& out_path) {
  expect_expert_parallel_spec(spec);
  MpiSession session("SPEC: \"expert_parallel\"");
  {
    smoe::MpiCommunicator comm(MPI_COMM_WORLD);
    with_scalar(spec.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      with_layer<T, smoe::cpu>(spec, [&](auto& full) {
        if constexpr (std::is_same_v<std::remove_cvref_t<decltype(full.router())>,
                                     smoe::ProductKeyRouter<T, smoe::cpu>>) {
          fail("SPEC: \"expert_parallel\": router \"pkm\" is not supported");
        } else {
          auto out = evaluate_sharded<T>(comm, full, spec, in);
          if (comm.rank() == 0) out.save(out_path);
        }
      });
    });
  }
}

}  // namespace smoe_eval
