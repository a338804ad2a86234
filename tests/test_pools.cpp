// Parameter-efficient expert pools on 3-layer stacks: per-layer experts, tied (WideNet), SaMoE's
// global pool in weight and output space, PR-MoE's residual expert (with a pyramid) and
// DeepSeekMoE's shared experts. Forward against a naive reference that reads the parameters by
// their checkpoint names, finite-difference gradients (combination logits included), the
// identities between the pools, materialization, accounting, names, edge cases, bad input and
// determinism.
#include <smoe/smoe.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <string_view>
#include <vector>

#include "catch.hpp"
#include "helpers.hpp"
#include "reference.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

using namespace smoe;
namespace ref = smoe::test::ref;

namespace {

// A linear expert activation, h = pre (for the weight- vs output-space identity).
struct Identity {
  static constexpr index_t fan = 1;
  [[maybe_unused]] static constexpr const char* name = "identity";  // the activation concept's; clang sees no use
  template <class T>
  static void forward(const T* pre, T* h, index_t G) {
    std::copy_n(pre, G, h);
  }
  template <class T>
  static void backward(const T*, const T* dh, T* dpre, index_t G) {
    std::copy_n(dh, G, dpre);
  }
};

constexpr double kEntropy = 0.05;

template <class T>
using TestRouter = SoftmaxTopK<T>;
template <class T, class X>
using Layer = MoE<TestRouter<T>, X, WeightedSum<T>, EntropyLoss<T>>;

struct Spec {
  index_t d = 5, G = 3, K = 2, M = 3;
  std::vector<index_t> E = {4, 4, 4};  // experts of each layer (pools use E[0])
  bool bias = false;
  double tau = 1.0;
  index_t top_r = 0;
  CombineInit init = CombineInit::uniform;
  index_t Gr = 4;  // residual MLP
  bool mix_bias = false;
  index_t Ns = 2, Gs = 3;  // shared experts
  index_t layers() const { return index_t(E.size()); }
};

template <class T>
TestRouter<T> make_router(const Spec& s, index_t l) {
  return TestRouter<T>({.d_model = s.d, .experts = s.E[static_cast<std::size_t>(l)], .k = s.K});
}
template <class T, class X>
Layer<T, X> make_layer(const Spec& s, index_t l, X experts) {
  return Layer<T, X>(make_router<T>(s, l), std::move(experts), WeightedSum<T>{}, EntropyLoss<T>(kEntropy));
}
template <class T, class Act>
FeedForwardExperts<T, Act> own_experts(const Spec& s, index_t l) {
  return FeedForwardExperts<T, Act>({s.d, s.E[static_cast<std::size_t>(l)], s.G, s.bias});
}
template <class T, class Act>
ExpertPool<T, Act> make_pool(const Spec& s) {
  return ExpertPool<T, Act>({.d_model = s.d, .experts = s.E[0], .hidden = s.G, .members = s.M, .bias = s.bias});
}
template <class T, class Act, class Space>
SaMoEExperts<T, Act, Space> samoe_experts(const Spec& s, ExpertPool<T, Act>& pool, index_t l) {
  return SaMoEExperts<T, Act, Space>(pool, {.layer = l, .temperature = s.tau, .top_members = s.top_r, .init = s.init});
}

template <class T, class Act>
auto per_layer_stack(const Spec& s) {
  using L = Layer<T, FeedForwardExperts<T, Act>>;
  return MoEStack<L>(s.layers(), [&](index_t l) { return make_layer<T>(s, l, own_experts<T, Act>(s, l)); });
}
template <class T, class Act>
auto tied_stack(const Spec& s) {
  using Set = FeedForwardExperts<T, Act>;
  using L = Layer<T, TiedExperts<T, Act>>;
  return MoEStack<L, Set>(Set({s.d, s.E[0], s.G, s.bias}), s.layers(),
                          [&](Set& set, index_t l) { return make_layer<T>(s, l, TiedExperts<T, Act>(set)); });
}
template <class T, class Act, class Space>
auto samoe_stack(const Spec& s) {
  using Pool = ExpertPool<T, Act>;
  using L = Layer<T, SaMoEExperts<T, Act, Space>>;
  return MoEStack<L, Pool>(make_pool<T, Act>(s), s.layers(), [&](Pool& pool, index_t l) {
    return make_layer<T>(s, l, samoe_experts<T, Act, Space>(s, pool, l));
  });
}
template <class T, class Act>
auto residual_stack(const Spec& s) {
  using L = ResidualMoE<Layer<T, FeedForwardExperts<T, Act>>, Act>;
  return MoEStack<L>(s.layers(), [&](index_t l) {
    return L(make_layer<T>(s, l, own_experts<T, Act>(s, l)), {.hidden = s.Gr, .bias = s.bias, .mix_bias = s.mix_bias});
  });
}
template <class T, class Act>
auto shared_stack(const Spec& s) {
  using L = SharedExpertsMoE<Layer<T, FeedForwardExperts<T, Act>>, Act>;
  return MoEStack<L>(s.layers(), [&](index_t l) {
    return L(make_layer<T>(s, l, own_experts<T, Act>(s, l)), {.experts = s.Ns, .hidden = s.Gs, .bias = s.bias});
  });
}
// SaMoE (weight space) inside PR-MoE's residual composite: the pool, "combine" and "residual.…".
template <class T, class Act>
auto residual_samoe_stack(const Spec& s) {
  using Pool = ExpertPool<T, Act>;
  using L = ResidualMoE<Layer<T, SaMoEExperts<T, Act, WeightSpace>>, Act>;
  return MoEStack<L, Pool>(make_pool<T, Act>(s), s.layers(), [&](Pool& pool, index_t l) {
    return L(make_layer<T>(s, l, samoe_experts<T, Act, WeightSpace>(s, pool, l)),
             {.hidden = s.Gr, .bias = s.bias, .mix_bias = s.mix_bias});
  });
}

template <HasParameters C>
void randomize_parameters(C& c, double std, std::uint64_t seed = 100) {
  c.for_each_parameter([&](std::string_view, auto& p) { test::randomize(p.value, seed++, std); });
}

struct NamedTensor {
  std::vector<index_t> shape;
  std::vector<double> value, grad;
};
using Named = std::map<std::string, NamedTensor>;

// Every parameter by name; names must be unique (each tensor visited once).
template <HasParameters C>
Named parameters_of(C& c) {
  Named out;
  c.for_each_parameter([&](std::string_view name, auto& p) {
    NamedTensor t{p.value.shape(), {p.value.data(), p.value.data() + p.value.size()},
                  {p.grad.data(), p.grad.data() + p.grad.size()}};
    INFO(name);
    REQUIRE(out.emplace(std::string(name), std::move(t)).second);
  });
  return out;
}

template <HasParameters C>
void set_parameter(C& c, const std::string& name, const std::vector<double>& values) {
  bool found = false;
  c.for_each_parameter([&](std::string_view n, auto& p) {
    if (n != name) return;
    REQUIRE(std::size_t(p.value.size()) == values.size());
    for (index_t i = 0; i < p.value.size(); ++i) p.value[i] = static_cast<std::remove_reference_t<decltype(p.value[i])>>(values[i]);
    found = true;
  });
  INFO(name);
  REQUIRE(found);
}

template <class A>
constexpr ref::Act ref_act() {
  if constexpr (std::is_same_v<A, Relu>) return ref::Act::relu;
  if constexpr (std::is_same_v<A, Gelu>) return ref::Act::gelu;
  return ref::Act::swiglu;
}

// ---------------------------------------------------------------------------------------------
// Naive double reference of a stack, from the parameters' checkpoint names (plain loops).

enum class Pooling { own, tied, weight_space, output_space };
enum class Wrapper { none, residual, shared };

// α over the pool from logits a: the r largest (ties to the smaller index), softmax(a/τ) over them.
std::vector<double> ref_alpha(const std::vector<double>& a, index_t r, double tau) {
  const int M = int(a.size());
  const auto keep = ref::topk(a, r == 0 ? M : int(r));
  std::vector<double> alpha(a.size(), 0.0);
  double top = -INFINITY, z = 0;
  for (int m : keep) top = std::max(top, a[m] / tau);
  for (int m : keep) z += std::exp(a[m] / tau - top);
  for (int m : keep) alpha[m] = std::exp(a[m] / tau - top) / z;
  return alpha;
}

struct RefResult {
  std::vector<double> y;
  double aux = 0;
};

RefResult ref_stack(const Named& P, const Spec& s, Pooling pooling, Wrapper wrapper, ref::Act act,
                    std::vector<double> x) {
  const int d = int(s.d), G = int(s.G), K = int(s.K), H = ref::fan(act) * G, T = int(x.size()) / d;
  auto get = [&](const std::string& n) -> const std::vector<double>& {
    INFO("reference needs parameter " << n);
    REQUIRE(P.count(n) == 1);
    return P.at(n).value;
  };
  auto opt = [&](const std::string& n) -> const double* { return P.count(n) ? P.at(n).value.data() : nullptr; };
  RefResult out;
  for (index_t l = 0; l < s.layers(); ++l) {
    const std::string pre = "layers." + std::to_string(l) + ".";
    const int E = int(s.E[static_cast<std::size_t>(l)]);
    const auto& router = get(pre + "router.weight");
    // The experts of this layer as (w1, w2, b1, b2) per member with a coefficient.
    struct Member {
      double alpha;
      const double *w1, *w2, *b1, *b2;
    };
    std::vector<Member> members;
    std::vector<double> cw1, cw2, cb1, cb2;  // weight space: the combined experts
    if (pooling == Pooling::own) {
      members.push_back({1.0, get(pre + "experts.w1").data(), get(pre + "experts.w2").data(), opt(pre + "experts.b1"),
                         opt(pre + "experts.b2")});
    } else if (pooling == Pooling::tied) {
      members.push_back({1.0, get("experts.w1").data(), get("experts.w2").data(), opt("experts.b1"), opt("experts.b2")});
    } else {
      const auto alpha = ref_alpha(get(pre + "combine"), s.top_r, s.tau);
      const int M = int(alpha.size());
      const std::size_t n1 = std::size_t(E) * d * H, n2 = std::size_t(E) * G * d, nb1 = std::size_t(E) * H,
                        nb2 = std::size_t(E) * d;
      const auto &w1 = get("pool.w1"), &w2 = get("pool.w2");
      const double *b1 = opt("pool.b1"), *b2 = opt("pool.b2");
      if (pooling == Pooling::output_space) {
        for (int m = 0; m < M; ++m)
          if (alpha[m] > 0)
            members.push_back({alpha[m], w1.data() + m * n1, w2.data() + m * n2, b1 ? b1 + m * nb1 : nullptr,
                               b2 ? b2 + m * nb2 : nullptr});
      } else {
        cw1.assign(n1, 0.0), cw2.assign(n2, 0.0), cb1.assign(b1 ? nb1 : 0, 0.0), cb2.assign(b2 ? nb2 : 0, 0.0);
        for (int m = 0; m < M; ++m) {
          for (std::size_t i = 0; i < n1; ++i) cw1[i] += alpha[m] * w1[m * n1 + i];
          for (std::size_t i = 0; i < n2; ++i) cw2[i] += alpha[m] * w2[m * n2 + i];
          for (std::size_t i = 0; i < cb1.size(); ++i) cb1[i] += alpha[m] * b1[m * nb1 + i];
          for (std::size_t i = 0; i < cb2.size(); ++i) cb2[i] += alpha[m] * b2[m * nb2 + i];
        }
        members.push_back({1.0, cw1.data(), cw2.data(), b1 ? cb1.data() : nullptr, b2 ? cb2.data() : nullptr});
      }
    }
    std::vector<double> next = x, p_mean(E, 0.0);
    for (int t = 0; t < T; ++t) {
      const double* xt = &x[std::size_t(t) * d];
      std::vector<double> logits(E, 0.0);
      for (int e = 0; e < E; ++e)
        for (int i = 0; i < d; ++i) logits[e] += router[std::size_t(e) * d + i] * xt[i];
      double z = 0, top = *std::max_element(logits.begin(), logits.end());
      for (int e = 0; e < E; ++e) z += std::exp(logits[e] - top);
      for (int e = 0; e < E; ++e) p_mean[e] += std::exp(logits[e] - top) / z / T;
      const auto ids = ref::topk(logits, K);
      const auto gates = ref::gates(ref::Gate::softmax, logits, ids);
      std::vector<double> moe(d, 0.0);
      for (int j = 0; j < K; ++j)
        for (const Member& m : members) {
          const int e = ids[j];
          const auto o = ref::expert(act, d, G, xt, m.w1 + std::size_t(e) * d * H, m.w2 + std::size_t(e) * G * d,
                                     m.b1 ? m.b1 + std::size_t(e) * H : nullptr, m.b2 ? m.b2 + std::size_t(e) * d : nullptr);
          for (int c = 0; c < d; ++c) moe[c] += gates[j] * m.alpha * o[c];
        }
      std::vector<double> f = moe;
      if (wrapper == Wrapper::residual) {
        const auto mlp = ref::expert(act, d, int(s.Gr), xt, get(pre + "residual.w1").data(),
                                     get(pre + "residual.w2").data(), opt(pre + "residual.b1"), opt(pre + "residual.b2"));
        const auto& mix = get(pre + "residual.mix");
        const double* mb = opt(pre + "residual.mix_bias");
        double zz[2];
        for (int j = 0; j < 2; ++j) {
          zz[j] = mb ? mb[j] : 0.0;
          for (int i = 0; i < d; ++i) zz[j] += mix[std::size_t(j) * d + i] * xt[i];
        }
        const double c0 = 1 / (1 + std::exp(zz[1] - zz[0])), c1 = 1 - c0;
        for (int c = 0; c < d; ++c) f[c] = c0 * moe[c] + c1 * mlp[c];
      } else if (wrapper == Wrapper::shared) {
        const int Gs = int(s.Gs), Hs = ref::fan(act) * Gs;
        const auto &w1 = get(pre + "shared.w1"), &w2 = get(pre + "shared.w2");
        const double *b1 = opt(pre + "shared.b1"), *b2 = opt(pre + "shared.b2");
        for (int j = 0; j < int(s.Ns); ++j) {
          const auto o = ref::expert(act, d, Gs, xt, w1.data() + std::size_t(j) * d * Hs, w2.data() + std::size_t(j) * Gs * d,
                                     b1 ? b1 + std::size_t(j) * Hs : nullptr, b2 ? b2 + std::size_t(j) * d : nullptr);
          for (int c = 0; c < d; ++c) f[c] += o[c];
        }
      }
      for (int c = 0; c < d; ++c) next[std::size_t(t) * d + c] += f[c];
    }
    if (T > 0) {
      double entropy = 0;  // Σ_e p_e log p_e of the batch-mean softmax
      for (int e = 0; e < E; ++e) entropy += p_mean[e] > 0 ? p_mean[e] * std::log(p_mean[e]) : 0.0;
      out.aux += kEntropy * entropy;
    }
    x = std::move(next);
  }
  out.y = std::move(x);
  return out;
}

// ---------------------------------------------------------------------------------------------

// A weight-space stack that freezes its layers' combined weights before every forward.
template <class Stack>
struct Refreezing {
  Stack& inner;
  index_t d_model() const { return inner.d_model(); }
  template <class F>
  void for_each_parameter(F&& f) {
    inner.for_each_parameter(f);
  }
  StackOutput<double> forward(ConstMatrixView<double> x, MatrixView<double> y) {
    for (index_t l = 0; l < inner.layers(); ++l) inner.layer(l).experts().freeze();
    return inner.forward(x, y);
  }
  void backward(ConstMatrixView<double> dy, MatrixView<double> dx) { inner.backward(dy, dx); }
};

template <class Stack, class T>
double objective(Stack& stack, const Tensor<T>& x, const Tensor<T>& dy) {
  Tensor<T> y({x.dim(0), x.dim(1)});
  const auto out = stack.forward(x.matrix(), y.matrix());
  double s = double(out.aux_loss);
  for (index_t i = 0; i < y.size(); ++i) s += double(y[i]) * double(dy[i]);
  return s;
}

// Finite differences run thousands of tiny forwards; on one thread they skip the cost of parallel
// regions on a loaded machine (results do not depend on the thread count: see the determinism test).
struct SingleThread {
#if defined(_OPENMP)
  int saved = omp_get_max_threads();
  SingleThread() { omp_set_num_threads(1); }
  ~SingleThread() { omp_set_num_threads(saved); }
#endif
};

// Every parameter gradient (pool, combination logits, routers, residual, shared) and dx of a
// double stack against central differences of Σ y ⊙ dy + Σ aux.
template <class Stack>
void check_stack_gradients(Stack& stack, index_t tokens, double tol = 1e-7) {
  const SingleThread single;
  const index_t d = stack.d_model();
  auto x = test::random_matrix<double>(tokens, d, 31);
  const auto dy = test::random_matrix<double>(tokens, d, 32);
  Tensor<double> y({tokens, d}), dx({tokens, d});
  zero_grad(stack);
  stack.forward(x.matrix(), y.matrix());
  stack.backward(dy.matrix(), dx.matrix());
  const auto r = check_parameter_gradients(stack, [&] { return objective(stack, x, dy); }, 1e-6, 2000);
  INFO("worst parameter " << r.worst_parameter << "[" << r.worst_index << "], error " << r.worst_error);
  CHECK(r.worst_error < tol);
  CHECK(r.checked > 0);
  test::require_input_gradient(x, dx, [&] { return objective(stack, x, dy); }, tol);
}

// Runs forward + backward; returns y, dx and every gradient by name.
template <class Stack, class T>
std::pair<std::vector<double>, Named> run_step(Stack& stack, const Tensor<T>& x, const Tensor<T>& dy,
                                               std::vector<double>* dx_out = nullptr) {
  const index_t tokens = x.dim(0), d = x.dim(1);
  Tensor<T> y({tokens, d}), dx({tokens, d});
  zero_grad(stack);
  stack.forward(x.matrix(), y.matrix());
  stack.backward(dy.matrix(), dx.matrix());
  if (dx_out) dx_out->assign(dx.data(), dx.data() + dx.size());
  return {std::vector<double>(y.data(), y.data() + y.size()), parameters_of(stack)};
}

void require_close_vectors(const std::vector<double>& a, const std::vector<double>& b, double tol, const char* what) {
  test::require_close(a, b, tol, tol, what);
}

template <class T, class Act, class MakeStack>
void check_against_reference(MakeStack make, const Spec& s, Pooling pooling, Wrapper wrapper, index_t tokens) {
  auto stack = make(s);
  randomize_parameters(stack, 0.6);
  const auto x = test::random_matrix<T>(tokens, s.d, 4);
  Tensor<T> y({tokens, s.d});
  const auto out = stack.forward(x.matrix(), y.matrix());
  const auto r = ref_stack(parameters_of(stack), s, pooling, wrapper, ref_act<Act>(),
                           std::vector<double>(x.data(), x.data() + x.size()));
  test::require_close(y, r.y, 20 * test::tolerance<T>(), 20 * test::tolerance<T>(), "y");
  CHECK(double(out.aux_loss) == Approx(r.aux).epsilon(20 * test::tolerance<T>()).margin(20 * test::tolerance<T>()));
  CHECK(out.layers.size() == std::size_t(s.layers()));
}

}  // namespace

// ---------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("every pool type matches the naive reference built from its checkpoint names", "[pools][reference]",
                   float, double) {
  using T = TestType;
  Spec s;
  s.bias = GENERATE(false, true);
  const index_t tokens = 9;
  SECTION("per-layer experts") {
    check_against_reference<T, Gelu>(per_layer_stack<T, Gelu>, s, Pooling::own, Wrapper::none, tokens);
  }
  SECTION("tied experts") {
    check_against_reference<T, SwiGlu>(tied_stack<T, SwiGlu>, s, Pooling::tied, Wrapper::none, tokens);
  }
  SECTION("SaMoE weight space, all members") {
    check_against_reference<T, Gelu>(samoe_stack<T, Gelu, WeightSpace>, s, Pooling::weight_space, Wrapper::none, tokens);
  }
  SECTION("SaMoE weight space, top-2 members, tau 0.5, member init") {
    s.top_r = 2, s.tau = 0.5, s.init = CombineInit::member;
    check_against_reference<T, Relu>(samoe_stack<T, Relu, WeightSpace>, s, Pooling::weight_space, Wrapper::none, tokens);
  }
  SECTION("SaMoE output space, all members") {
    check_against_reference<T, SwiGlu>(samoe_stack<T, SwiGlu, OutputSpace>, s, Pooling::output_space, Wrapper::none,
                                       tokens);
  }
  SECTION("SaMoE output space, top-2 members, tau 2") {
    s.top_r = 2, s.tau = 2.0;
    check_against_reference<T, Gelu>(samoe_stack<T, Gelu, OutputSpace>, s, Pooling::output_space, Wrapper::none, tokens);
  }
  SECTION("PR-MoE residual expert, pyramid 2-2-4 experts") {
    s.E = {2, 2, 4}, s.mix_bias = true;
    check_against_reference<T, Gelu>(residual_stack<T, Gelu>, s, Pooling::own, Wrapper::residual, tokens);
  }
  SECTION("DeepSeekMoE shared experts") {
    check_against_reference<T, Relu>(shared_stack<T, Relu>, s, Pooling::own, Wrapper::shared, tokens);
  }
  SECTION("SaMoE inside a residual composite") {
    check_against_reference<T, Gelu>(residual_samoe_stack<T, Gelu>, s, Pooling::weight_space, Wrapper::residual, tokens);
  }
}

TEST_CASE("finite-difference gradients of every pool type on a 3-layer stack, combination logits included",
          "[pools][grad]") {
  Spec s;
  s.bias = GENERATE(false, true);
  const index_t tokens = 7;
  SECTION("per-layer experts") {
    auto stack = per_layer_stack<double, Gelu>(s);
    randomize_parameters(stack, 0.6);
    check_stack_gradients(stack, tokens);
  }
  SECTION("tied experts") {
    auto stack = tied_stack<double, SwiGlu>(s);
    randomize_parameters(stack, 0.6);
    check_stack_gradients(stack, tokens);
  }
  SECTION("SaMoE weight space") {
    s.tau = GENERATE(1.0, 0.7);
    s.top_r = GENERATE(0, 2);
    auto stack = samoe_stack<double, Gelu, WeightSpace>(s);
    randomize_parameters(stack, 0.6);
    check_stack_gradients(stack, tokens);
  }
  SECTION("SaMoE weight space, frozen materialization") {
    auto stack = samoe_stack<double, SwiGlu, WeightSpace>(s);
    randomize_parameters(stack, 0.6);
    // Freezing once, before the differences, would be stale after each perturbation: freeze in
    // every forward instead, which is what a training loop does after each optimizer step.
    Refreezing<decltype(stack)> refreezing{stack};
    check_stack_gradients(refreezing, tokens);
  }
  SECTION("SaMoE output space") {
    s.tau = GENERATE(1.0, 1.5);
    s.top_r = GENERATE(0, 2);
    auto stack = samoe_stack<double, Gelu, OutputSpace>(s);
    randomize_parameters(stack, 0.6);
    check_stack_gradients(stack, tokens);
  }
  SECTION("PR-MoE residual expert, pyramid 2-2-4 experts") {
    s.E = {2, 2, 4};
    s.mix_bias = GENERATE(false, true);
    auto stack = residual_stack<double, Gelu>(s);
    randomize_parameters(stack, 0.6);
    check_stack_gradients(stack, tokens);
  }
  SECTION("DeepSeekMoE shared experts") {
    auto stack = shared_stack<double, SwiGlu>(s);
    randomize_parameters(stack, 0.6);
    check_stack_gradients(stack, tokens);
  }
  SECTION("SaMoE inside a residual composite") {
    auto stack = residual_samoe_stack<double, Gelu>(s);
    randomize_parameters(stack, 0.6);
    check_stack_gradients(stack, tokens);
  }
}

TEMPLATE_TEST_CASE("tied experts equal a SaMoE pool with M = 1 in either policy", "[pools][identity]", float, double) {
  // With one member α = softmax(a) = 1 exactly, W_l = 1·W and ys = 1·ys_0 are exact copies, so the
  // forward and dx are bitwise equal. The pool's gradient sums the layers in another association
  // order than the tied set's (one product per layer added vs. accumulated in the GEMM), so it is
  // compared to 4 ulps-scale relative error: 1e-13 (double), 1e-6 (float) on O(1) values.
  using T = TestType;
  const double tol = sizeof(T) == 8 ? 1e-13 : 1e-6;
  Spec s;
  s.M = 1;
  s.bias = GENERATE(false, true);
  const index_t tokens = 11;
  auto tied = tied_stack<T, Gelu>(s);
  randomize_parameters(tied, 0.6);
  const Named p = parameters_of(tied);
  const auto x = test::random_matrix<T>(tokens, s.d, 8), dy = test::random_matrix<T>(tokens, s.d, 9);
  std::vector<double> dx_tied;
  // Named, not a structured binding: clang 14 cannot capture bindings in a lambda (C++20, clang 16).
  const auto tied_step = run_step(tied, x, dy, &dx_tied);
  const auto& y_tied = tied_step.first;
  const auto& g_tied = tied_step.second;
  auto compare = [&](auto& pooled) {
    pooled.pool().for_each_parameter([&](std::string_view name, auto&) {
      set_parameter(pooled, "pool." + std::string(name), p.at("experts." + std::string(name)).value);
    });
    for (index_t l = 0; l < s.layers(); ++l) {
      const std::string n = "layers." + std::to_string(l) + ".router.weight";
      set_parameter(pooled, n, p.at(n).value);
      set_parameter(pooled, "layers." + std::to_string(l) + ".combine", {0.37 * double(l + 1)});
    }
    std::vector<double> dx;
    const auto [y, g] = run_step(pooled, x, dy, &dx);
    CHECK(y == y_tied);
    CHECK(dx == dx_tied);
    for (const auto& [name, t] : g_tied) {
      const std::string pooled_name = name.rfind("experts.", 0) == 0 ? "pool." + name.substr(8) : name;
      INFO(name);
      require_close_vectors(g.at(pooled_name).grad, t.grad, tol, name.c_str());
    }
    for (index_t l = 0; l < s.layers(); ++l) CHECK(g.at("layers." + std::to_string(l) + ".combine").grad[0] == 0.0);
  };
  SECTION("weight space") {
    auto pooled = samoe_stack<T, Gelu, WeightSpace>(s);
    compare(pooled);
  }
  SECTION("output space") {
    auto pooled = samoe_stack<T, Gelu, OutputSpace>(s);
    compare(pooled);
  }
}

TEST_CASE("weight and output space agree when the expert output is linear in the combined weights",
          "[pools][identity]") {
  // Two-layer experts are bilinear in (W1, W2): Σ_m α_m x W1_m W2_m ≠ x (Σ α W1_m)(Σ α W2_m) in
  // general, even with a linear activation. The policies agree exactly when the activation is
  // linear AND the members differ only in W1 and b1 (W2, b2 shared across members): the output is
  // then affine in the varying weights. Same routers, so every layer routes each token to the same
  // experts (checked). Agreement to 1e-12 relative + absolute on O(1) values in double (the two
  // policies associate the same sums differently); the member gradients of the shared W2, b2 agree
  // in their sum over members, which is the gradient of the shared tensor.
  Spec s;
  s.bias = true;
  s.M = 3;
  const index_t tokens = 10;
  auto ws = samoe_stack<double, Identity, WeightSpace>(s);
  auto os = samoe_stack<double, Identity, OutputSpace>(s);
  randomize_parameters(ws, 0.6);
  for (const char* shared : {"pool.w2", "pool.b2"}) {  // member 0's W2, b2 for every member
    Named p = parameters_of(ws);
    auto v = p.at(shared).value;
    const std::size_t n = v.size() / std::size_t(s.M);
    for (std::size_t m = 1; m < std::size_t(s.M); ++m) std::copy_n(v.begin(), n, v.begin() + m * n);
    set_parameter(ws, shared, v);
  }
  const Named p = parameters_of(ws);
  for (const auto& [name, t] : p) set_parameter(os, name, t.value);
  const auto x = test::random_matrix<double>(tokens, s.d, 12), dy = test::random_matrix<double>(tokens, s.d, 13);
  std::vector<double> dx_w, dx_o;
  const auto [y_w, g_w] = run_step(ws, x, dy, &dx_w);
  const auto [y_o, g_o] = run_step(os, x, dy, &dx_o);
  for (index_t l = 0; l < s.layers(); ++l) {
    const auto &a = ws.layer(l).dispatched_experts(), &b = os.layer(l).dispatched_experts();
    CHECK(std::equal(a.data(), a.data() + a.size(), b.data(), b.data() + b.size()));
  }
  const double tol = 1e-12;
  require_close_vectors(y_o, y_w, tol, "y");
  require_close_vectors(dx_o, dx_w, tol, "dx");
  for (const auto& [name, t] : g_w) {
    INFO(name);
    if (name == "pool.w2" || name == "pool.b2") {
      const std::size_t n = t.grad.size() / std::size_t(s.M);
      std::vector<double> sum_w(n, 0.0), sum_o(n, 0.0);
      for (std::size_t m = 0; m < std::size_t(s.M); ++m)
        for (std::size_t i = 0; i < n; ++i) sum_w[i] += t.grad[m * n + i], sum_o[i] += g_o.at(name).grad[m * n + i];
      require_close_vectors(sum_o, sum_w, tol, name.c_str());
    } else {
      require_close_vectors(g_o.at(name).grad, t.grad, tol, name.c_str());
    }
  }
  SECTION("with members that differ in W2 the policies differ") {
    set_parameter(ws, "pool.w2", parameters_of(os).at("pool.w2").value);
    auto w2 = parameters_of(ws).at("pool.w2").value;
    for (std::size_t i = 0; i < w2.size(); ++i) w2[i] += 0.3 * std::sin(double(i));
    set_parameter(ws, "pool.w2", w2);
    set_parameter(os, "pool.w2", w2);
    const auto [y2_w, g2_w] = run_step(ws, x, dy);
    const auto [y2_o, g2_o] = run_step(os, x, dy);
    double worst = 0;
    for (std::size_t i = 0; i < y2_w.size(); ++i) worst = std::max(worst, std::abs(y2_w[i] - y2_o[i]));
    CHECK(worst > 1e-3);
  }
}

TEMPLATE_TEST_CASE("per-step and frozen materialization give identical outputs and gradients", "[pools][materialize]",
                   float, double) {
  using T = TestType;
  Spec s;
  s.bias = GENERATE(false, true);
  s.top_r = GENERATE(0, 2);
  const index_t tokens = 12;
  auto stack = samoe_stack<T, Gelu, WeightSpace>(s);
  randomize_parameters(stack, 0.6);
  const auto x = test::random_matrix<T>(tokens, s.d, 14), dy = test::random_matrix<T>(tokens, s.d, 15);
  std::vector<double> dx_step, dx_frozen;
  const auto [y_step, g_step] = run_step(stack, x, dy, &dx_step);
  const double per_step = stack.materialization_flops();
  CHECK(per_step == Approx(2.0 * s.layers() * double(s.top_r ? s.top_r : s.M) * double(s.E[0]) *
                           double(expert_parameters<Gelu>(s.d, s.G, s.bias))));
  for (index_t l = 0; l < s.layers(); ++l) stack.layer(l).experts().freeze();
  CHECK(stack.materialization_flops() == 0.0);
  const auto [y_frozen, g_frozen] = run_step(stack, x, dy, &dx_frozen);
  CHECK(y_frozen == y_step);
  CHECK(dx_frozen == dx_step);
  for (const auto& [name, t] : g_step) {
    INFO(name);
    CHECK(g_frozen.at(name).grad == t.grad);
  }
  SECTION("frozen weights stay frozen until unfreeze") {
    auto w1 = parameters_of(stack).at("pool.w1").value;
    for (double& v : w1) v *= 1.5;
    set_parameter(stack, "pool.w1", w1);
    const auto [y_still, g_still] = run_step(stack, x, dy);
    CHECK(y_still == y_step);
    for (index_t l = 0; l < s.layers(); ++l) stack.layer(l).experts().unfreeze();
    const auto [y_new, g_new] = run_step(stack, x, dy);
    CHECK(y_new != y_step);
  }
}

TEST_CASE("combination logits: uniform and member initialization, top-r selection", "[pools][combine]") {
  ExpertPool<double, Relu> pool({.d_model = 4, .experts = 3, .hidden = 2, .members = 4});
  SaMoEExperts<double, Relu, WeightSpace> uniform(pool);
  for (double a : uniform.coefficients()) CHECK(a == Approx(0.25).epsilon(1e-15));
  SaMoEExperts<double, Relu, OutputSpace> near(pool, {.layer = 6, .init = CombineInit::member, .init_scale = 3.0});
  CHECK(near.combine().value[2] == 3.0);  // 6 mod 4
  const auto alpha = near.coefficients();
  CHECK(alpha[2] == Approx(std::exp(3.0) / (std::exp(3.0) + 3.0)).epsilon(1e-14));
  CHECK(alpha[0] == Approx(1.0 / (std::exp(3.0) + 3.0)).epsilon(1e-14));
  // Top-2 with a tie for second place: the smaller index wins; the weights renormalize over the two.
  SaMoEExperts<double, Relu, OutputSpace> top2(pool, {.temperature = 2.0, .top_members = 2});
  top2.combine().value[0] = 0.5, top2.combine().value[1] = 1.0, top2.combine().value[3] = 0.5;
  const auto a2 = top2.coefficients();
  CHECK(a2[2] == 0.0);
  CHECK(a2[3] == 0.0);
  CHECK(a2[1] == Approx(std::exp(0.5) / (std::exp(0.5) + std::exp(0.25))).epsilon(1e-14));
  CHECK(a2[0] + a2[1] == Approx(1.0).epsilon(1e-15));
  CHECK(top2.members_used() == 2);
}

TEST_CASE("accounting: totals, active parameters and FLOPs per token, shared parameters counted once",
          "[pools][accounting]") {
  // d = 6, G = 4, E = 5, K = 2, M = 3, L = 3, ReLU, no bias: one expert P_e = 2·d·G = 48
  // parameters and F_e = 4·d·G = 96 FLOPs; a router E·d = 30 parameters, 2·E·d = 60 FLOPs.
  Spec s;
  s.d = 6, s.G = 4, s.E = {5, 5, 5}, s.K = 2, s.M = 3;
  const double Pe = 48, Fe = 96, R = 30, FR = 60, L = 3, E = 5, K = 2, M = 3;
  auto count = [](auto& stack) { return parameter_count(stack); };
  SECTION("per-layer experts") {
    auto st = per_layer_stack<double, Relu>(s);
    CHECK(st.total_parameters() == index_t(L * (R + E * Pe)));
    CHECK(st.total_parameters() == count(st));
    CHECK(st.active_parameters_per_token() == L * (R + K * Pe));
    CHECK(st.flops_per_token() == L * (FR + K * Fe));
    CHECK(total_parameters(st.layer(0)) == index_t(R + E * Pe));
  }
  SECTION("tied experts") {
    auto st = tied_stack<double, Relu>(s);
    CHECK(st.total_parameters() == index_t(E * Pe + L * R));
    CHECK(st.total_parameters() == count(st));
    CHECK(st.active_parameters_per_token() == L * (R + K * Pe));
    CHECK(st.flops_per_token() == L * (FR + K * Fe));
  }
  SECTION("SaMoE weight space") {
    auto st = samoe_stack<double, Relu, WeightSpace>(s);
    CHECK(st.pool().total_parameters() == index_t(M * E * Pe));
    CHECK(st.total_parameters() == index_t(M * E * Pe + L * (R + M)));
    CHECK(st.total_parameters() == count(st));
    CHECK(st.active_parameters_per_token() == L * (R + K * Pe));
    CHECK(st.flops_per_token() == L * (FR + K * Fe));
    CHECK(st.materialization_flops() == L * 2 * M * E * Pe);
    CHECK(flops_per_token(st.layer(0), 100) == FR + K * Fe + 2 * M * E * Pe / 100);
    CHECK(st.accounting().flops_per_token_amortized(100) == Approx(L * (FR + K * Fe + 2 * M * E * Pe / 100)));
  }
  SECTION("SaMoE output space, all members and top-2") {
    s.top_r = GENERATE(0, 2);
    const double r = s.top_r ? double(s.top_r) : M;
    auto st = samoe_stack<double, Relu, OutputSpace>(s);
    CHECK(st.total_parameters() == index_t(M * E * Pe + L * (R + M)));
    CHECK(st.total_parameters() == count(st));
    CHECK(st.active_parameters_per_token() == L * (R + K * r * Pe));
    CHECK(st.flops_per_token() == L * (FR + K * r * Fe));
    CHECK(st.materialization_flops() == 0.0);
  }
  SECTION("PR-MoE residual, pyramid 2-2-4, mixing bias") {
    s.E = {2, 2, 4}, s.Gr = 7, s.mix_bias = true;
    auto st = residual_stack<double, Relu>(s);
    const double res = 2 * 6 * 7 + 2 * 6 + 2;  // MLP 2·d·G_r, mix [2, d], mix bias [2]
    const double routers = 6 * (2 + 2 + 4), experts = Pe * (2 + 2 + 4);
    CHECK(st.total_parameters() == index_t(routers + experts + L * res));
    CHECK(st.total_parameters() == count(st));
    CHECK(st.active_parameters_per_token() == routers + L * (K * Pe + res));
    CHECK(st.flops_per_token() == 2 * routers + L * (K * Fe + 4 * 6 * 7 + 4 * 6));
  }
  SECTION("DeepSeekMoE shared experts") {
    s.Ns = 2, s.Gs = 3, s.bias = true;
    auto st = shared_stack<double, Relu>(s);
    const double Pb = Pe + 4 + 6, Ps = 2 * 6 * 3 + 3 + 6;  // with biases: + G + d
    CHECK(st.total_parameters() == index_t(L * (R + E * Pb + 2 * Ps)));
    CHECK(st.total_parameters() == count(st));
    CHECK(st.active_parameters_per_token() == L * (R + K * Pb + 2 * Ps));
    CHECK(st.flops_per_token() == L * (FR + K * Fe + 2 * 4 * 6 * 3));
  }
  SECTION("model-level sum over layers and pools") {
    ExpertPool<double, SwiGlu> pool({.d_model = 6, .experts = 5, .hidden = 4, .members = 2});
    CHECK(pool.parameters_per_expert() == 3 * 6 * 4);  // fan 2: d·2G + G·d
    CHECK(pool.flops_per_expert() == 6 * 6 * 4);
    ModelAccounting a;
    a.add_shared(pool);
    for (index_t l = 0; l < 2; ++l) {
      auto layer = MoE(TestRouter<double>({6, 5, 1}), SaMoEExperts<double, SwiGlu, WeightSpace>(pool));
      a.add_layer(layer);
    }
    a.add(4 * 36, 4 * 36, 8 * 36);  // attention, 4·d² once
    CHECK(a.total_parameters == 2 * 5 * 72 + 2 * (30 + 2) + 144);
    CHECK(a.active_parameters_per_token == 2 * (30 + 72) + 144);
    CHECK(a.flops_per_token == 2 * (60 + 144) + 288);
  }
}

TEST_CASE("parameter names and shapes follow the checkpoint contract", "[pools][names]") {
  Spec s;
  s.d = 4, s.G = 3, s.E = {5, 5}, s.M = 2, s.Gr = 6, s.Ns = 2, s.Gs = 3;
  using Shapes = std::map<std::string, std::vector<index_t>>;
  auto shapes = [](auto& stack) {
    Shapes out;
    for (const auto& [name, t] : parameters_of(stack)) out[name] = t.shape;
    return out;
  };
  auto per_layer = [&](Shapes m) {
    for (int l = 0; l < 2; ++l) m["layers." + std::to_string(l) + ".router.weight"] = {5, 4};
    return m;
  };
  SECTION("per-layer") {
    auto st = per_layer_stack<double, Relu>(s);
    Shapes want = per_layer({});
    for (int l = 0; l < 2; ++l) {
      want["layers." + std::to_string(l) + ".experts.w1"] = {5, 4, 3};
      want["layers." + std::to_string(l) + ".experts.w2"] = {5, 3, 4};
    }
    CHECK(shapes(st) == want);
  }
  SECTION("tied") {
    auto st = tied_stack<double, Relu>(s);
    CHECK(shapes(st) == per_layer({{"experts.w1", {5, 4, 3}}, {"experts.w2", {5, 3, 4}}}));
  }
  SECTION("SaMoE") {
    auto st = samoe_stack<double, SwiGlu, OutputSpace>(s);
    Shapes want = per_layer({{"pool.w1", {2, 5, 4, 6}}, {"pool.w2", {2, 5, 3, 4}}});
    for (int l = 0; l < 2; ++l) want["layers." + std::to_string(l) + ".combine"] = {2};
    CHECK(shapes(st) == want);
  }
  SECTION("PR-MoE residual") {
    auto st = residual_stack<double, Relu>(s);
    Shapes want = per_layer({});
    for (int l = 0; l < 2; ++l) {
      const std::string p = "layers." + std::to_string(l) + ".";
      want[p + "experts.w1"] = {5, 4, 3}, want[p + "experts.w2"] = {5, 3, 4};
      want[p + "residual.w1"] = {4, 6}, want[p + "residual.w2"] = {6, 4}, want[p + "residual.mix"] = {2, 4};
    }
    CHECK(shapes(st) == want);
  }
  SECTION("shared experts") {
    auto st = shared_stack<double, Relu>(s);
    Shapes want = per_layer({});
    for (int l = 0; l < 2; ++l) {
      const std::string p = "layers." + std::to_string(l) + ".";
      want[p + "experts.w1"] = {5, 4, 3}, want[p + "experts.w2"] = {5, 3, 4};
      want[p + "shared.w1"] = {2, 4, 3}, want[p + "shared.w2"] = {2, 3, 4};
    }
    CHECK(shapes(st) == want);
  }
}

namespace {
// The model pattern of docs/samoe.md: the model owns the pool, each layer points at it.
using DocPool = ExpertPool<float, Gelu>;
using DocX = SaMoEExperts<float, Gelu, WeightSpace>;
using DocLayer = MoE<SoftmaxTopK<float>, DocX>;
struct DocModel {
  std::unique_ptr<DocPool> pool;
  std::vector<DocLayer> moe;

  DocModel(index_t L, ExpertPoolConfig pc, index_t K) : pool(std::make_unique<DocPool>(pc)) {
    init_expert_pool(*pool, {.seed = 1});
    for (index_t l = 0; l < L; ++l)
      moe.emplace_back(SoftmaxTopK<float>({.d_model = pc.d_model, .experts = pc.experts, .k = K}),
                       DocX(*pool, {.layer = l, .init = CombineInit::member}));
  }
  template <class F>
  void for_each_parameter(F&& f) {
    pool->for_each_parameter(with_prefix("pool.", f));
    for (std::size_t l = 0; l < moe.size(); ++l)
      for_each_layer_parameter(moe[l], with_prefix("layers." + std::to_string(l) + ".", f));
  }
};
}  // namespace

TEST_CASE("a model that owns the pool (docs/samoe.md) sees each tensor once and sums the layers' gradients",
          "[pools][model]") {
  DocModel model(2, {.d_model = 8, .experts = 4, .hidden = 6, .members = 3}, 2);
  for (auto& layer : model.moe) test::randomize(layer.router().weight().value, 3, 0.5);
  std::vector<std::string> names;
  model.for_each_parameter([&](std::string_view n, auto&) { names.emplace_back(n); });
  CHECK(names == std::vector<std::string>{"pool.w1", "pool.w2", "layers.0.router.weight", "layers.0.combine",
                                          "layers.1.router.weight", "layers.1.combine"});
  const index_t tokens = 9, d = 8;
  const auto x = test::random_matrix<float>(tokens, d, 1), dy = test::random_matrix<float>(tokens, d, 2);
  Tensor<float> y0({tokens, d}), y1({tokens, d}), dx({tokens, d});
  model.moe[0].forward(x.matrix(), y0.matrix());
  model.moe[1].forward(y0.matrix(), y1.matrix());
  auto pool_grad = [&](bool layer0, bool layer1) {
    zero_grad(model);
    if (layer1) model.moe[1].backward(dy.matrix(), dx.matrix());
    if (layer0) model.moe[0].backward(dy.matrix(), dx.matrix());
    return std::vector<float>(model.pool->w1().grad.data(), model.pool->w1().grad.data() + model.pool->w1().grad.size());
  };
  const auto g0 = pool_grad(true, false), g1 = pool_grad(false, true), both = pool_grad(true, true);
  REQUIRE(both.size() == g0.size());
  for (std::size_t i = 0; i < both.size(); ++i) REQUIRE(both[i] == g1[i] + g0[i]);  // the scatter adds layer by layer
  CHECK(std::any_of(both.begin(), both.end(), [](float g) { return g != 0; }));
  // Moving the model keeps the pool's address (on the heap); bind re-points a layer at another pool.
  DocModel moved = std::move(model);
  CHECK(&moved.moe[0].experts().pool() == moved.pool.get());
  DocPool copy = *moved.pool;
  moved.moe[0].experts().bind(copy);
  CHECK(&moved.moe[0].experts().pool() == &copy);
}

TEST_CASE("edge cases: no tokens and one token", "[pools][edge]") {
  Spec s;
  const index_t tokens = GENERATE(0, 1);
  auto run = [&](auto stack) {
    randomize_parameters(stack, 0.6);
    const auto x = test::random_matrix<double>(tokens, s.d, 21), dy = test::random_matrix<double>(tokens, s.d, 22);
    Tensor<double> y({tokens, s.d}), dx({tokens, s.d});
    const auto out = stack.forward(x.matrix(), y.matrix());
    stack.backward(dy.matrix(), dx.matrix());
    CHECK(std::isfinite(double(out.aux_loss)));
    for (index_t i = 0; i < dx.size(); ++i) CHECK(std::isfinite(dx[i]));
    if (tokens == 0) {
      bool all_zero = true;
      stack.for_each_parameter([&](std::string_view, auto& p) {
        for (index_t i = 0; i < p.grad.size(); ++i) all_zero = all_zero && p.grad[i] == 0.0;
      });
      CHECK(all_zero);
    }
  };
  SECTION("weight space") { run(samoe_stack<double, Gelu, WeightSpace>(s)); }
  SECTION("output space") { run(samoe_stack<double, Gelu, OutputSpace>(s)); }
  SECTION("tied") { run(tied_stack<double, Gelu>(s)); }
  SECTION("residual") { run(residual_stack<double, Gelu>(s)); }
  SECTION("shared") { run(shared_stack<double, Gelu>(s)); }
  SECTION("one token: gradients") {
    if (tokens == 1) {
      auto st = samoe_stack<double, Gelu, OutputSpace>(s);
      randomize_parameters(st, 0.6);
      check_stack_gradients(st, 1);
    }
  }
}

TEST_CASE("bad configurations and calls throw smoe::error naming the argument", "[pools][errors]") {
  using P = ExpertPool<double, Relu>;
  REQUIRE_THROWS_WITH(P({.d_model = 4, .experts = 3, .hidden = 2, .members = 0}),
                      Catch::Contains("members (pool size M) must be >= 1, got 0"));
  REQUIRE_THROWS_WITH(P({.d_model = 4, .experts = 0, .hidden = 2}), Catch::Contains("experts must be >= 1, got 0"));
  P pool({.d_model = 4, .experts = 3, .hidden = 2, .members = 2});
  using W = SaMoEExperts<double, Relu, WeightSpace>;
  REQUIRE_THROWS_AS(W(pool, {.temperature = 0.0}), smoe::error);
  REQUIRE_THROWS_WITH(W(pool, {.temperature = 0.0}), Catch::Contains("temperature must be finite and > 0, got 0"));
  REQUIRE_THROWS_WITH(W(pool, {.top_members = 3}), Catch::Contains("top_members must be in [0, members = 2]"));
  REQUIRE_THROWS_WITH(W(pool, {.layer = -1}), Catch::Contains("layer must be >= 0, got -1"));
  REQUIRE_THROWS_WITH(MoE(TestRouter<double>({4, 5, 2}), W(pool)),
                      Catch::Contains("router.experts() (= experts.experts()) must be 3, got 5"));
  P other({.d_model = 4, .experts = 3, .hidden = 5, .members = 2});
  W handle(pool);
  REQUIRE_THROWS_WITH(handle.bind(other), Catch::Contains("bind needs a pool of the same shape"));
  REQUIRE(&handle.pool() == &pool);
  {
    // Experts backward before forward, and wrong shapes, leave the gradients untouched.
    Dispatch<double> dispatch;
    Tensor<std::int32_t> ids({2, 1});
    Tensor<double> gates({2, 1});
    ids[0] = 0, ids[1] = 2, gates[0] = gates[1] = 1;
    build_dispatch(std::as_const(ids).matrix(), std::as_const(gates).matrix(), 3, dispatch);
    Tensor<double> x({2, 4}), ys({2, 4}), dx({2, 4}), wrong({2, 3});
    x.fill(1), ys.fill(1);
    REQUIRE_THROWS_WITH(handle.backward(x.matrix(), dispatch, ys.matrix(), dx.matrix()),
                        Catch::Contains("backward needs the forward of the same dispatch first"));
    REQUIRE_THROWS_WITH(handle.forward(wrong.matrix(), dispatch, ys.matrix()), Catch::Contains("x must be [2, 4], got [2, 3]"));
    SaMoEExperts<double, Relu, OutputSpace> out_handle(pool);
    REQUIRE_THROWS_WITH(out_handle.forward(x.matrix(), dispatch, wrong.matrix()),
                        Catch::Contains("ys must be [2, 4], got [2, 3]"));
    CHECK(std::all_of(pool.w1().grad.data(), pool.w1().grad.data() + pool.w1().grad.size(), [](double g) { return g == 0; }));
    CHECK(handle.combine().grad[0] == 0.0);
  }
  Spec s;
  Spec none;
  none.E = {};
  REQUIRE_THROWS_WITH((per_layer_stack<double, Relu>(none)), Catch::Contains("layers must be >= 1, got 0"));
  using Inner = Layer<double, FeedForwardExperts<double, Relu>>;
  REQUIRE_THROWS_WITH(ResidualMoE<Inner>(make_layer<double>(s, 0, own_experts<double, Relu>(s, 0)), {.hidden = 0}),
                      Catch::Contains("residual hidden (G_r) must be >= 1, got 0"));
  REQUIRE_THROWS_WITH(
      SharedExpertsMoE<Inner>(make_layer<double>(s, 0, own_experts<double, Relu>(s, 0)), {.experts = 0, .hidden = 2}),
      Catch::Contains("shared experts (N_s) must be >= 1, got 0"));
  auto st = samoe_stack<double, Relu, WeightSpace>(s);
  Tensor<double> x({3, s.d}), y({3, s.d}), wrong({3, s.d + 1});
  REQUIRE_THROWS_WITH(st.backward(x.matrix(), y.matrix()), Catch::Contains("backward called before forward"));
  REQUIRE_THROWS_WITH(st.forward(wrong.matrix(), y.matrix()), Catch::Contains("x must be [3, 5], got [3, 6]"));
  auto rs = residual_stack<double, Relu>(s);
  REQUIRE_THROWS_WITH(rs.layer(0).backward(x.matrix(), y.matrix()), Catch::Contains("backward called before forward"));
  REQUIRE_THROWS_WITH(flops_per_token(st.layer(0), 0), Catch::Contains("tokens_per_step must be >= 1, got 0"));
}

#if defined(_OPENMP)
TEST_CASE("pool stacks give bitwise identical results for any thread count", "[pools][determinism]") {
  Spec s;
  // W1 of one member is E·d·G = 32768 elements: two blocks of the materialization and its backward.
  s.d = 64, s.G = 64, s.E = {8, 8, 8}, s.M = 3, s.bias = true;
  const index_t tokens = 150;
  const auto x = test::random_matrix<float>(tokens, s.d, 5), dy = test::random_matrix<float>(tokens, s.d, 6);
  auto check = [&](auto stack) {
    randomize_parameters(stack, 0.3);
    auto run = [&](int threads) {
      omp_set_num_threads(threads);
      std::vector<double> dx;
      auto [y, g] = run_step(stack, x, dy, &dx);
      y.insert(y.end(), dx.begin(), dx.end());
      for (const auto& [name, t] : g) y.insert(y.end(), t.grad.begin(), t.grad.end());
      return y;
    };
    const auto one = run(1), two = run(2), three = run(3);
    omp_set_num_threads(omp_get_num_procs());
    CHECK(one == two);
    CHECK(one == three);
  };
  SECTION("weight space") { check(samoe_stack<float, Gelu, WeightSpace>(s)); }
  SECTION("output space") { check(samoe_stack<float, Gelu, OutputSpace>(s)); }
  SECTION("tied") { check(tied_stack<float, Relu>(s)); }
  SECTION("residual") { check(residual_stack<float, Gelu>(s)); }
  SECTION("shared") { check(shared_stack<float, Gelu>(s)); }
}
#endif

// A checkpoint of a composite must hold its inner router's step counter, or a router with expert
// dropout would not resume on the same random sequence (train_lm --ffn pr-moe / shared-experts).
TEST_CASE("ResidualMoE and SharedExpertsMoE visit the inner layer's counters under the inner names", "[pools]") {
  Spec s;
  using Inner = Layer<double, FeedForwardExperts<double, Relu>>;
  ResidualMoE<Inner> residual(make_layer<double>(s, 0, own_experts<double, Relu>(s, 0)), {.hidden = 2});
  SharedExpertsMoE<Inner> shared(make_layer<double>(s, 0, own_experts<double, Relu>(s, 0)), {.experts = 1, .hidden = 2});
  auto counters = [](auto& layer) {
    std::map<std::string, std::uint64_t*> c;
    for_each_counter_of(layer, [&](std::string_view name, std::uint64_t& v) { c[std::string(name)] = &v; });
    return c;
  };
  const auto inner_residual = counters(residual.moe()), inner_shared = counters(shared.moe());
  REQUIRE(inner_residual.count("router.step") == 1);
  CHECK(counters(residual) == inner_residual);  // the same names and the same objects
  CHECK(counters(shared) == inner_shared);
  std::size_t buffers = 0, inner_buffers = 0;
  for_each_buffer_of(residual, [&](std::string_view, auto&) { ++buffers; });
  for_each_buffer_of(residual.moe(), [&](std::string_view, auto&) { ++inner_buffers; });
  CHECK(buffers == inner_buffers);
}
