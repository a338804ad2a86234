// Expert parallelism over MPI (layers/expert_parallel.hpp), run by ctest with 1, 2, 3 and 4 ranks.
// Every rank also runs the single-process MoE on the concatenated global batch (same weights), and
// the expert-parallel layer must give its rows of y and dx, the aux loss of the global batch, the
// router gradients (summed over ranks) and its slice of the expert gradients: float64 within 1e-12,
// float32 within 1e-5, relative to each tensor's largest magnitude. Token splits leave a rank
// empty and are uneven; every token-choice router; global-scope losses; bitwise reruns; a
// configuration mismatch and a bad input throw on every rank instead of hanging.
#include <mpi.h>

#ifdef SMOE_CATCH3
#include <catch2/catch_all.hpp>
#else
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#endif

#include <smoe/dist/data_parallel.hpp>
#include <smoe/dist/mpi_communicator.hpp>
#ifndef SMOE_TEST_NO_JSON
#include <smoe/dist/sharded_checkpoint.hpp>
#endif
#include <smoe/layers/expert_parallel.hpp>
#include <smoe/smoe.hpp>

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "helpers.hpp"

using namespace smoe;

namespace {

MpiCommunicator* world = nullptr;

constexpr index_t d = 8, G = 6, E = 12;  // E divisible by 1, 2, 3 and 4 ranks

// Tokens per rank for a global batch of `total`: proportional to {5, 0, 11, 7} (rank 1 is empty
// when P > 1, the others uneven), the remainder to the last rank.
std::vector<index_t> split(index_t total, int P) {
  const index_t w[] = {5, 0, 11, 7};
  index_t sum = 0;
  for (int p = 0; p < P; ++p) sum += w[p];
  std::vector<index_t> counts(static_cast<std::size_t>(P));
  index_t given = 0;
  for (int p = 0; p < P; ++p) given += counts[p] = total * w[p] / sum;
  counts.back() += total - given;
  return counts;
}

template <class T>
Tensor<T> rows_of(const Tensor<T>& all, index_t first, index_t n) {
  Tensor<T> out({n, all.dim(1)});
  if (n > 0) std::memcpy(out.data(), all.data() + first * all.dim(1), sizeof(T) * std::size_t(n * all.dim(1)));
  return out;
}

// |a − b| <= tol · max|b| over the whole tensor (b the single-process reference).
template <class A, class B>
void check_close(const A* a, const B* b, index_t n, double tol, const std::string& what) {
  double scale = 0;
  for (index_t i = 0; i < n; ++i) scale = std::max(scale, std::abs(double(b[i])));
  double worst = 0;
  index_t at = 0;
  for (index_t i = 0; i < n; ++i)
    if (const double e = std::abs(double(a[i]) - double(b[i])); e > worst) worst = e, at = i;
  INFO(what << ": rank " << world->rank() << " of " << world->size() << ", worst element " << at << " off by "
            << worst << ", scale " << scale);
  CHECK(worst <= tol * std::max(scale, 1e-300));
}

template <class Router>
void set_ids(Router& router, index_t first, index_t n) {
  if constexpr (requires { router.set_token_ids(std::span<const std::int64_t>{}); }) {
    std::vector<std::int64_t> ids(static_cast<std::size_t>(n));
    for (index_t t = 0; t < n; ++t) ids[t] = 1000 + 7 * (first + t);
    router.set_token_ids(ids);
  }
}

// Everything one expert-parallel run gives this rank, for the comparisons and the bitwise rerun.
template <class T>
struct RunResult {
  std::vector<T> y, dx, grads;
  double aux = 0;
};

// The capacity factor of the cases run while a WithCapacity is alive (0: dropless).
double case_capacity_factor = 0;
struct WithCapacity {
  explicit WithCapacity(double factor) { case_capacity_factor = factor; }
  ~WithCapacity() { case_capacity_factor = 0; }
};

// One case: the single-process MoE on the global batch against ExpertParallel on this rank's rows.
template <class T, class Router, class... Losses>
RunResult<T> check_case(Router router, index_t total, double tol, Mode mode, Losses... losses) {
  using Experts = FeedForwardExperts<T, Gelu>;
  const int P = world->size(), rank = world->rank();
  const index_t El = E / P;
  router.for_each_parameter([](std::string_view, auto& p) { test::randomize(p.value, 11, 0.8); });
  Experts full({d, E, G, true});
  std::uint64_t seed = 20;
  full.for_each_parameter([&](std::string_view, auto& p) { test::randomize(p.value, seed++, 0.5); });
  // This rank's shard: experts [rank·E/P, (rank+1)·E/P) of every parameter (leading dimension E).
  Experts local({d, El, G, true});
  std::vector<Parameter<T>*> full_params;
  full.for_each_parameter([&](std::string_view, auto& p) { full_params.push_back(&p); });
  std::size_t i = 0;
  local.for_each_parameter([&](std::string_view, auto& p) {
    const index_t per = p.value.size() / El;
    std::memcpy(p.value.data(), full_params[i++]->value.data() + rank * El * per, sizeof(T) * std::size_t(El * per));
  });

  const auto counts = split(total, P);
  index_t first = 0;
  for (int p = 0; p < rank; ++p) first += counts[p];
  const index_t n = counts[rank];
  const auto x_all = test::random_matrix<T>(total, d, 31), dy_all = test::random_matrix<T>(total, d, 32);

  MoE reference(router, full, WeightedSum<T>{}, losses...);
  reference.capacity.capacity_factor = case_capacity_factor;
  set_ids(reference.router(), 0, total);
  Tensor<T> y_ref({total, d}), dx_ref({total, d});
  const auto out_ref = reference.forward(x_all.matrix(), y_ref.matrix(), mode);
  reference.backward(dy_all.matrix(), dx_ref.matrix());

  ExpertParallel layer(*world, router, local, WeightedSum<T>{}, losses...);
  layer.capacity.capacity_factor = case_capacity_factor;
  set_ids(layer.router(), first, n);
  const auto x = rows_of(x_all, first, n), dy = rows_of(dy_all, first, n);
  Tensor<T> y({n, d}), dx({n, d});
  const auto out = layer.forward(x.matrix(), y.matrix(), mode);
  layer.backward(dy.matrix(), dx.matrix());

  check_close(y.data(), y_ref.data() + first * d, n * d, tol, "y");
  check_close(dx.data(), dx_ref.data() + first * d, n * d, tol, "dx");
  check_close(&out.aux_loss, &out_ref.aux_loss, 1, tol, "aux_loss");
  // The same assignments dropped: this rank's rows of the dispatched ids, and the total count.
  const index_t K = layer.k();
  const Tensor<std::int32_t>& kept = layer.dispatched_experts();
  REQUIRE(kept.size() == n * K);
  for (index_t a = 0; a < n * K; ++a) {
    INFO("rank " << rank << ", assignment " << a);
    CHECK(kept[a] == reference.dispatched_experts()[first * K + a]);
  }
  double dropped[1] = {double(layer.routing().dropped)};
  world->all_reduce_sum(std::span<double>(dropped));
  CHECK(index_t(dropped[0]) == reference.routing().dropped);
  // The received rows are the assignments of this rank's experts in the global batch.
  CHECK(layer.received_rows() == reference.dispatch().expert_begin(rank * El + El) -
                                     reference.dispatch().expert_begin(rank * El));
  RunResult<T> result{{y.data(), y.data() + y.size()}, {dx.data(), dx.data() + dx.size()}, {}, double(out.aux_loss)};
  // Reference gradients by name: "router.*" whole, "experts.*" this rank's slice.
  std::vector<std::pair<std::string, Parameter<T>*>> ref_params;
  reference.for_each_parameter([&](std::string_view name, auto& p) { ref_params.emplace_back(std::string(name), &p); });
  using Layer = std::remove_cvref_t<decltype(layer)>;
  layer.for_each_parameter([&](std::string_view name, auto& p) {
    result.grads.insert(result.grads.end(), p.grad.data(), p.grad.data() + p.grad.size());
    const auto it = std::find_if(ref_params.begin(), ref_params.end(), [&](auto& q) { return q.first == name; });
    REQUIRE(it != ref_params.end());
    const index_t offset = Layer::sharded(name) ? rank * p.grad.size() : 0;
    check_close(p.grad.data(), it->second->grad.data() + offset, p.grad.size(), tol, "grad." + std::string(name));
  });
  return result;
}

}  // namespace
namespace {

template <class T>
auto softmax_router(index_t k) {
  return SoftmaxTopK<T>({.d_model = d, .experts = E, .k = k});
}

template <class T>
auto global_losses() {
  SwitchBalanceLoss<T> s(0.3);
  ImportanceLoss<T> i(0.2);
  EntropyLoss<T> h(0.1);
  s.scope = i.scope = h.scope = LossScope::global;
  return std::tuple{s, i, h};
}

}  // namespace

TEST_CASE("expert parallel equals one process: softmax top-k, k = 1 and k > 1", "[mpi][ep]") {
  SECTION("k = 1") { check_case<double>(softmax_router<double>(1), 23, 1e-12, Mode::eval); }
  SECTION("k = 2") { check_case<double>(softmax_router<double>(2), 23, 1e-12, Mode::train); }
  SECTION("k = E") { check_case<double>(softmax_router<double>(E), 9, 1e-12, Mode::eval); }
}

TEST_CASE("expert parallel equals one process: every token-choice router", "[mpi][ep]") {
  SECTION("sigmoid top-k") {
    check_case<double>(SigmoidTopK<double>({.d_model = d, .experts = E, .k = 3}), 23, 1e-12, Mode::train);
  }
  SECTION("noisy top-k (eval: the noise depends on the token's position in its batch)") {
    check_case<double>(NoisyTopK<double>({.d_model = d, .experts = E, .k = 2}), 23, 1e-12, Mode::eval);
  }
  SECTION("hash") {
    ImportanceLoss<double> importance(0.2);
    importance.scope = LossScope::global;
    check_case<double>(HashRouter<double>({.d_model = d, .experts = E, .seed = 3}), 23, 1e-12, Mode::train,
                       importance);
  }
  SECTION("group top-k") {
    check_case<double>(
        GroupTopKRouter<double>({.d_model = d, .experts = E, .k = 3, .n_groups = 4, .topk_groups = 2}), 23,
        1e-12, Mode::train);
  }
}

TEST_CASE("expert parallel: global-scope losses are the losses of the whole batch", "[mpi][ep][losses]") {
  SECTION("float64") {
    std::apply([](auto... l) { check_case<double>(softmax_router<double>(2), 23, 1e-12, Mode::train, l...); },
               global_losses<double>());
  }
  SECTION("float32") {
    std::apply([](auto... l) { check_case<float>(softmax_router<float>(2), 23, 1e-5, Mode::train, l...); },
               global_losses<float>());
  }
  SECTION("sigmoid top-k with Switch and entropy") {
    SwitchBalanceLoss<double> s(0.5);
    EntropyLoss<double> h(0.2);
    s.scope = h.scope = LossScope::global;
    check_case<double>(SigmoidTopK<double>({.d_model = d, .experts = E, .k = 2}), 17, 1e-12, Mode::train, s, h);
  }
}

TEST_CASE("expert parallel: capacity per expert over the global batch equals one process", "[mpi][ep][capacity]") {
  SECTION("k = 2, factor 0.5: many drops, at both choices") {
    const WithCapacity cap(0.5);
    check_case<double>(softmax_router<double>(2), 29, 1e-12, Mode::eval);
  }
  SECTION("k = 3, factor 1, global losses, float32") {
    const WithCapacity cap(1.0);
    std::apply([](auto... l) { check_case<float>(softmax_router<float>(3), 31, 1e-5, Mode::train, l...); },
               global_losses<float>());
  }
  SECTION("gate priority is refused on every rank") {
    ExpertParallel layer(*world, softmax_router<double>(2), FeedForwardExperts<double, Gelu>({d, E / world->size(), G}));
    layer.capacity = {.capacity_factor = 1.0, .priority = CapacityPolicy::Priority::gate};
    Tensor<double> x({3, d}), y({3, d});
    x.zero();
    REQUIRE_THROWS_WITH(layer.forward(x.matrix(), y.matrix()), Catch::Contains("capacity needs position priority"));
  }
}

TEST_CASE("expert parallel: experts and ranks with no tokens", "[mpi][ep][empty]") {
  SECTION("3 tokens, 12 experts, k = 1: most experts get none") {
    std::apply([](auto... l) { check_case<double>(softmax_router<double>(1), 3, 1e-12, Mode::train, l...); },
               global_losses<double>());
  }
  SECTION("no token at all") {
    std::apply([](auto... l) { check_case<double>(softmax_router<double>(2), 0, 1e-12, Mode::train, l...); },
               global_losses<double>());
  }
}

TEST_CASE("expert parallel: two runs with the same inputs are bitwise identical", "[mpi][ep][determinism]") {
  const auto run = [] {
    return std::apply([](auto... l) { return check_case<double>(softmax_router<double>(2), 23, 1e-12, Mode::train, l...); },
                      global_losses<double>());
  };
  const auto a = run(), b = run();
  CHECK(a.y == b.y);
  CHECK(a.dx == b.dx);
  CHECK(a.grads == b.grads);
  CHECK(a.aux == b.aux);
}

TEST_CASE("expert parallel: a mismatch throws on every rank without hanging", "[mpi][ep][errors]") {
  using Experts = FeedForwardExperts<double, Gelu>;
  const int P = world->size(), rank = world->rank();
  SECTION("k differs on the last rank") {
    if (P == 1) return;  // one rank cannot disagree with itself
    const index_t k = rank == P - 1 ? 3 : 2;
    auto make = [&] { ExpertParallel layer(*world, softmax_router<double>(k), Experts({d, E / P, G, false})); };
    CHECK_THROWS_WITH(make(), Catch::Matchers::Contains("configuration differs across ranks: k"));
  }
  SECTION("expert size differs on rank 0") {
    if (P == 1) return;
    auto make = [&] {
      ExpertParallel layer(*world, softmax_router<double>(2), Experts({d, rank == 0 ? E : E / P, G, false}));
    };
    CHECK_THROWS_WITH(make(), Catch::Matchers::Contains("local experts"));
  }
  SECTION("expert hidden size differs on rank 1") {
    if (P == 1) return;
    auto make = [&] {
      ExpertParallel layer(*world, softmax_router<double>(2), Experts({d, E / P, rank == 1 ? G + 1 : G, false}));
    };
    CHECK_THROWS_WITH(make(), Catch::Matchers::Contains("expert hidden size"));
  }
  SECTION("E not a multiple of P") {
    if (P == 1) return;
    const index_t odd = 2 * P + 1;
    auto make = [&] {
      ExpertParallel layer(*world, SoftmaxTopK<double>({.d_model = d, .experts = odd, .k = 1}),
                           Experts({d, 2, G, false}));
    };
    CHECK_THROWS_WITH(make(), Catch::Matchers::Contains("must be a multiple of the ranks"));
  }
  SECTION("local experts not E / P") {
    auto make = [&] { ExpertParallel layer(*world, softmax_router<double>(2), Experts({d, E / P + 1, G, false})); };
    CHECK_THROWS_WITH(make(), Catch::Matchers::Contains("local experts (= E / P) must be"));
  }
  SECTION("a router that throws on rank 0 only (hash router without token ids)") {
    ExpertParallel layer(*world, HashRouter<double>({.d_model = d, .experts = E, .seed = 1}),
                         Experts({d, E / P, G, false}));
    if (rank != 0) set_ids(layer.router(), 0, 3);
    Tensor<double> x({3, d}), y({3, d});
    x.zero();
    CHECK_THROWS_WITH(layer.forward(x.matrix(), y.matrix()),
                      Catch::Matchers::Contains(rank == 0 ? "set_token_ids" : "another rank"));
  }
  SECTION("bad input on rank 0: every rank throws, rank 0 with the reason") {
    ExpertParallel layer(*world, softmax_router<double>(2), Experts({d, E / P, G, false}));
    const index_t cols = rank == 0 ? d + 1 : d;
    Tensor<double> x({4, cols}), y({4, cols});
    x.zero();
    if (rank == 0)
      CHECK_THROWS_WITH(layer.forward(x.matrix(), y.matrix()), Catch::Matchers::Contains("ExpertParallel: x"));
    else
      CHECK_THROWS_WITH(layer.forward(x.matrix(), y.matrix()), Catch::Matchers::Contains("another rank"));
    // The group is still usable afterwards: a correct forward on every rank.
    Tensor<double> x2({2, d}), y2({2, d});
    x2.zero();
    CHECK_NOTHROW(layer.forward(x2.matrix(), y2.matrix()));
  }
}

TEST_CASE("MpiCommunicator: counts and rows reach the right ranks", "[mpi][comm]") {
  const int P = world->size(), rank = world->rank();
  std::vector<std::int32_t> send(static_cast<std::size_t>(P)), recv(static_cast<std::size_t>(P));
  for (int p = 0; p < P; ++p) send[p] = (rank + 2 * p) % 3;  // rows rank → p
  world->all_to_all(send, recv);
  for (int p = 0; p < P; ++p) CHECK(recv[p] == (p + 2 * rank) % 3);
  std::vector<double> rows, got;
  for (int p = 0; p < P; ++p)
    for (int i = 0; i < send[p]; ++i) rows.insert(rows.end(), {double(rank), double(p), double(i)});
  index_t total = 0;
  for (int p = 0; p < P; ++p) total += recv[p];
  got.assign(std::size_t(3 * total), -1.0);
  world->all_to_all_rows(rows.data(), send, got.data(), recv, 3);
  std::size_t at = 0;
  for (int p = 0; p < P; ++p)
    for (int i = 0; i < recv[p]; ++i, at += 3) {
      CHECK(got[at] == p);
      CHECK(got[at + 1] == rank);
      CHECK(got[at + 2] == i);
    }
  std::vector<float> v{float(rank), 1.0f};
  world->all_reduce_sum(std::span<float>(v));
  CHECK(v[0] == float(P * (P - 1) / 2));
  CHECK(v[1] == float(P));
  CHECK(world->all_agree(true));
  CHECK(!world->all_agree(rank != P - 1));
}

TEST_CASE("allreduce_gradients: replicated averaged, expert shards and the router left as they are", "[mpi][dp]") {
  const int P = world->size(), rank = world->rank();
  using Experts = FeedForwardExperts<double, Gelu>;
  SECTION("a replicated model") {
    Experts model({d, 2, G, false});
    double v = rank + 1;
    model.for_each_parameter([&](std::string_view, auto& p) {
      for (index_t i = 0; i < p.grad.size(); ++i) p.grad[i] = v * double(i + 1);
    });
    allreduce_gradients(model, *world);
    const double mean = (P + 1) / 2.0;  // mean of 1..P
    model.for_each_parameter([&](std::string_view, auto& p) {
      for (index_t i = 0; i < p.grad.size(); ++i) CHECK(p.grad[i] == Approx(mean * double(i + 1)).epsilon(1e-15));
    });
  }
  SECTION("an expert-parallel layer") {
    ExpertParallel layer(*world, softmax_router<double>(2), Experts({d, E / P, G, false}));
    std::vector<double> before;
    layer.for_each_parameter([&](std::string_view, auto& p) {
      for (index_t i = 0; i < p.grad.size(); ++i) before.push_back(p.grad[i] = rank * 10.0 + double(i));
    });
    CHECK(decltype(layer)::sharding("experts.w1") == GradientSharding::sharded);
    CHECK(decltype(layer)::sharding("router.weight") == GradientSharding::reduced);
    allreduce_gradients(layer, *world);
    std::vector<double> after;
    layer.for_each_parameter(
        [&](std::string_view, auto& p) { after.insert(after.end(), p.grad.data(), p.grad.data() + p.grad.size()); });
    CHECK(after == before);
  }
}

TEST_CASE("grad_norm and clip_grad_norm over ranks: the norm of the whole layer", "[mpi][dp][clip]") {
  using Experts = FeedForwardExperts<double, Gelu>;
  const int P = world->size(), rank = world->rank();
  // Gradients that are a function of the global parameter element: the router's the same on every
  // rank (replicated after the reduction), each expert shard its slice of the whole layer's.
  ExpertParallel layer(*world, softmax_router<double>(2), Experts({d, E / P, G, true}));
  MoE<decltype(softmax_router<double>(2)), Experts> full(softmax_router<double>(2), Experts({d, E, G, true}));
  const auto fill = [](auto& model, index_t first_expert, index_t experts) {
    model.for_each_parameter([&](std::string_view name, auto& p) {
      const index_t per = name.starts_with("experts.") ? p.grad.size() / experts : 0;
      for (index_t i = 0; i < p.grad.size(); ++i)
        p.grad[i] = std::sin(double(i + first_expert * per) * 0.37 + double(name.size()));
    });
  };
  fill(layer, index_t(rank) * (E / P), E / P);
  fill(full, 0, E);
  const double expected = grad_norm(full);
  CHECK(grad_norm(layer, *world) == Approx(expected).epsilon(1e-13));
  const ClipResult clip = clip_grad_norm(layer, expected / 4, *world);
  const ClipResult reference = clip_grad_norm(full, expected / 4);
  CHECK(clip.norm == Approx(reference.norm).epsilon(1e-13));
  CHECK(clip.scale == Approx(reference.scale).epsilon(1e-13));
  CHECK(grad_norm(layer, *world) == Approx(expected / 4).epsilon(1e-5));
  CHECK_THROWS_WITH(clip_grad_norm(layer, 0.0, *world), Catch::Matchers::Contains("max_norm must be > 0"));
  // Gradients whose squares overflow double: measured again in a common unit, still finite.
  fill(layer, index_t(rank) * (E / P), E / P);
  fill(full, 0, E);
  scale_gradients(layer, 1e200);
  scale_gradients(full, 1e200);
  const double huge = grad_norm(full);
  REQUIRE(std::isfinite(huge));
  CHECK(grad_norm(layer, *world) == Approx(huge).epsilon(1e-12));
}

TEST_CASE("Model::sharding: an expert-parallel block's experts sharded, its router reduced, the rest replicated",
          "[mpi][dp]") {
  using Experts = FeedForwardExperts<double, Gelu>;
  using Layer = ExpertParallel<MpiCommunicator, decltype(softmax_router<double>(2)), Experts>;
  using Block = TransformerBlock<CausalSelfAttention<double>, Layer>;
  const int P = world->size();
  Model<Block> model({.vocab = 11, .d_model = d, .layers = 2}, [&](index_t) {
    return Block(CausalSelfAttention<double>({.d_model = d, .heads = 2}),
                 Layer(*world, softmax_router<double>(2), Experts({d, E / P, G, true})));
  });
  CHECK(model.sharding("blocks.1.ffn.experts.w1") == GradientSharding::sharded);
  CHECK(model.sharding("blocks.0.ffn.router.weight") == GradientSharding::reduced);
  CHECK(model.sharding("blocks.0.attn.qkv.weight") == GradientSharding::replicated);
  CHECK(model.sharding("blocks.0.ffn_norm.weight") == GradientSharding::replicated);
  CHECK(model.sharding("embed.weight") == GradientSharding::replicated);
  CHECK(model.sharding("blocks.2.ffn.experts.w1") == GradientSharding::replicated);  // no block 2
  CHECK(model.sharding("blocks.x.ffn.experts.w1") == GradientSharding::replicated);
  index_t sharded = 0;
  model.for_each_parameter(
      [&](std::string_view name, auto&) { sharded += gradient_sharding(model, name) == GradientSharding::sharded; });
  CHECK(sharded == 2 * 4);  // w1, b1, w2, b2 of 2 blocks
}

#ifndef SMOE_TEST_NO_JSON
TEST_CASE("sharded checkpoint: written with P ranks, loaded with P, 2 and 1", "[mpi][checkpoint]") {
  using Experts = FeedForwardExperts<double, Gelu>;
  const int P = world->size(), rank = world->rank();
  // The full layer's weights, the same on every rank; each writer holds its slice.
  auto router = softmax_router<double>(2);
  router.for_each_parameter([](std::string_view, auto& p) { test::randomize(p.value, 5, 1.0); });
  Experts full({d, E, G, true});
  std::uint64_t seed = 50;
  full.for_each_parameter([&](std::string_view, auto& p) { test::randomize(p.value, seed++, 1.0); });
  const auto slice_of = [&](int r, int ranks) {
    Experts local({d, E / ranks, G, true});
    std::vector<Tensor<double>*> src;
    full.for_each_parameter([&](std::string_view, auto& p) { src.push_back(&p.value); });
    std::size_t i = 0;
    local.for_each_parameter([&](std::string_view, auto& p) {
      const index_t n = p.value.size();
      std::copy(src[i]->data() + r * n, src[i]->data() + (r + 1) * n, p.value.data());
      ++i;
    });
    return local;
  };
  // One directory for all ranks: rank 0's pid, shared by a sum.
  std::vector<double> pid{rank == 0 ? double(::getpid()) : 0.0};
  world->all_reduce_sum(std::span<double>(pid));
  const auto dir = std::filesystem::temp_directory_path() /
                   ("smoe_ep_checkpoint_" + std::to_string(std::int64_t(pid[0])) + "_" + std::to_string(P));
  {
    ExpertParallel writer(*world, router, slice_of(rank, P));
    io::save_sharded_checkpoint(dir, writer, *world);
  }
  MPI_Barrier(world->comm());  // every shard is on disk before anyone reads (the test's own sync)
  for (int readers : {P, 2, 1}) {
    if (readers > P) continue;
    MPI_Comm sub;
    MPI_Comm_split(world->comm(), rank < readers ? 0 : MPI_UNDEFINED, rank, &sub);
    if (sub == MPI_COMM_NULL) continue;
    {
      MpiCommunicator comm(sub);
      auto blank = softmax_router<double>(2);
      ExpertParallel reader(comm, blank, Experts({d, E / readers, G, true}));
      io::load_sharded_checkpoint(dir, reader, comm);
      ExpertParallel expected(comm, router, slice_of(rank, readers));
      std::vector<double> got, want;
      reader.for_each_parameter(
          [&](std::string_view, auto& p) { got.insert(got.end(), p.value.data(), p.value.data() + p.value.size()); });
      expected.for_each_parameter(
          [&](std::string_view, auto& p) { want.insert(want.end(), p.value.data(), p.value.data() + p.value.size()); });
      INFO("written with " << P << " ranks, read with " << readers << ", rank " << rank);
      CHECK(got == want);
      // A layer of another E: every reader throws, nobody hangs.
      if (E % (readers * 2) == 0) {
        ExpertParallel wrong(comm, SoftmaxTopK<double>({.d_model = d, .experts = E / 2, .k = 1}),
                             Experts({d, E / 2 / readers, G, true}));
        CHECK_THROWS_WITH(io::load_sharded_checkpoint(dir, wrong, comm), Catch::Matchers::Contains("experts"));
      }
    }
    MPI_Comm_free(&sub);
  }
  MPI_Barrier(world->comm());
  if (rank == 0) std::filesystem::remove_all(dir);
}
#endif

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  int result = 0;
  {
    MpiCommunicator comm(MPI_COMM_WORLD);
    world = &comm;
    result = Catch::Session().run(argc, argv);
    world = nullptr;
  }
  MPI_Finalize();
  return result;
}
