// Transformer block and model: one block's forward against a naive double reference (attention,
// norms and MoE / dense FFN written from the formulas), the whole model's forward against the
// naive composition, central finite differences of a 2-layer sigma-MoE model (every parameter,
// aux losses on) and of blocks over every FFN kind, a model over a shared object, names, buffers,
// counters, accounting, bitwise thread-count independence (model and DenseMLP), per-layer timing,
// and bad input.
#include <smoe/experts/value_experts.hpp>
#include <smoe/routing/group_topk.hpp>
#include <smoe/routing/product_key_router.hpp>
#include <smoe/smoe.hpp>

#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>

#include "catch.hpp"
#include "helpers.hpp"
#include "reference.hpp"
#include "transformer_reference.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

using namespace smoe;
namespace xref = smoe::test::xref;
namespace mref = smoe::test::ref;
using Vec = std::vector<double>;

namespace {

template <class X>
Vec as_double(const X& t) {
  Vec v(static_cast<std::size_t>(t.size()));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = double(t[static_cast<index_t>(i)]);
  return v;
}

// Random parameters; norm weights near 1 (names containing "norm").
template <HasParameters C>
void randomize_parameters(C& c, std::uint64_t seed, double std = 0.4) {
  c.for_each_parameter([&](std::string_view name, auto& p) {
    test::randomize(p.value, seed++, name.find("norm") != std::string_view::npos ? 0.2 : std);
    if (name.find("norm") != std::string_view::npos)
      for (index_t i = 0; i < p.value.size(); ++i) p.value[i] += 1;
  });
}

template <class T>
Vec view_values(ConstMatrixView<T> m) {
  Vec v;
  for (index_t r = 0; r < m.rows; ++r)
    for (index_t c = 0; c < m.cols; ++c) v.push_back(double(m(r, c)));
  return v;
}

template <class T>
std::vector<T> flatten_grads(auto& component) {
  std::vector<T> all;
  component.for_each_parameter(
      [&](std::string_view, auto& p) { all.insert(all.end(), p.grad.data(), p.grad.data() + p.grad.size()); });
  return all;
}

std::vector<std::string> parameter_names(auto& component) {
  std::vector<std::string> names;
  component.for_each_parameter([&](std::string_view name, auto&) { names.emplace_back(name); });
  return names;
}

std::vector<std::int32_t> random_ids(index_t n, index_t V, std::uint64_t seed) {
  std::vector<std::int32_t> ids(static_cast<std::size_t>(n));
  for (index_t t = 0; t < n; ++t) ids[t] = std::int32_t(uniform01(seed, std::uint64_t(t)) * double(V));
  return ids;
}

// Finite-difference checks run thousands of tiny forwards; on one thread they do not pay for a
// parallel region each (thread-count independence has its own test).
struct SingleThread {
#if defined(_OPENMP)
  int saved = omp_get_max_threads();
  SingleThread() { omp_set_num_threads(1); }
  ~SingleThread() { omp_set_num_threads(saved); }
#endif
};

// ---- The layers under test. ----
struct Sizes {
  index_t V = 11, d = 8, heads = 2, B = 2, L = 5, E = 4, K = 2, G = 4;
  index_t N() const { return B * L; }
};
constexpr double entropy_coef = 0.1, z_coef = 0.01;

template <class T>
using SigmaMoE = MoE<SigmoidTopK<T>, ReluExperts<T>, WeightedSum<T>, EntropyLoss<T>, RouterZLoss<T>>;
template <class T>
using SigmaBlock = TransformerBlock<CausalSelfAttention<T>, SigmaMoE<T>>;
template <class T>
using SigmaModel = Model<SigmaBlock<T>>;

template <class T>
CausalSelfAttention<T> make_attention(const Sizes& s, index_t block = 3) {
  return CausalSelfAttention<T>({.d_model = s.d, .heads = s.heads, .block = block});
}
template <class T>
SigmaMoE<T> make_sigma_moe(const Sizes& s, double dropout = 0) {
  return SigmaMoE<T>(SigmoidTopK<T>({.d_model = s.d, .experts = s.E, .k = s.K, .expert_dropout = {.rate = dropout}}),
                     ReluExperts<T>({.d_model = s.d, .experts = s.E, .hidden = s.G, .bias = true}), WeightedSum<T>{},
                     EntropyLoss<T>(entropy_coef), RouterZLoss<T>(z_coef));
}
template <class T>
SigmaBlock<T> make_sigma_block(const Sizes& s, double dropout = 0) {
  return SigmaBlock<T>(make_attention<T>(s), make_sigma_moe<T>(s, dropout));
}
template <class T>
SigmaModel<T> make_sigma_model(const Sizes& s, index_t layers, bool tied, double dropout = 0) {
  return SigmaModel<T>({.vocab = s.V, .d_model = s.d, .layers = layers, .tie_embeddings = tied},
                       [&](index_t) { return make_sigma_block<T>(s, dropout); });
}

// ---- Naive references (double, plain loops). ----

// Router logits s [N, E] = b · Rᵀ.
Vec router_logits(const Vec& b, const Vec& router, int N, int d, int E) {
  Vec s(std::size_t(N) * E, 0.0);
  for (int t = 0; t < N; ++t)
    for (int e = 0; e < E; ++e)
      for (int i = 0; i < d; ++i) s[std::size_t(t) * E + e] += b[std::size_t(t) * d + i] * router[std::size_t(e) * d + i];
  return s;
}
// sigma-MoE entropy regularizer Σ_e p_e log p_e, p = mean_t softmax(s_t), plus the z-loss
// mean_t (log Σ_e exp s_te)², with their coefficients.
double sigma_aux(const Vec& s, int N, int E) {
  Vec p(E, 0.0);
  double z = 0;
  for (int t = 0; t < N; ++t) {
    double sum = 0;
    for (int e = 0; e < E; ++e) sum += std::exp(s[std::size_t(t) * E + e]);
    for (int e = 0; e < E; ++e) p[e] += std::exp(s[std::size_t(t) * E + e]) / sum / N;
    z += std::log(sum) * std::log(sum) / N;
  }
  double entropy = 0;
  for (double v : p) entropy += v * std::log(v);
  return entropy_coef * entropy + z_coef * z;
}

Vec add(const Vec& a, const Vec& b) {
  Vec c(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) c[i] = a[i] + b[i];
  return c;
}

struct BlockRef {
  Vec y;
  double aux = 0;
};

// h = x + attn(rms(x)), y = h + moe(rms(h)) for a SigmaBlock's parameters.
template <class T>
BlockRef sigma_block_ref(SigmaBlock<T>& block, const Sizes& s, const Vec& x) {
  const int N = int(s.N()), d = int(s.d), E = int(s.E);
  const xref::Attn spec{int(s.B), int(s.L), d, int(s.heads), int(s.heads), d / int(s.heads)};
  const Vec a = xref::rms_norm(x, N, d, as_double(block.attn_norm().weight().value), 1e-6);
  const Vec h = add(x, xref::attention(spec, a, as_double(block.attention().qkv_weight().value),
                                       as_double(block.attention().out_weight().value)));
  const Vec b = xref::rms_norm(h, N, d, as_double(block.ffn_norm().weight().value), 1e-6);
  auto& moe = block.ffn();
  const mref::Layer layer{.d = d,
                          .E = E,
                          .G = int(s.G),
                          .K = int(s.K),
                          .act = mref::Act::relu,
                          .gate = mref::Gate::sigmoid,
                          .router = as_double(moe.router().weight().value),
                          .w1 = as_double(moe.experts().w1().value),
                          .w2 = as_double(moe.experts().w2().value),
                          .b1 = as_double(moe.experts().b1().value),
                          .b2 = as_double(moe.experts().b2().value)};
  return {add(h, layer.forward(b)), sigma_aux(router_logits(b, layer.router, N, d, E), N, E)};
}

// Objective Σ y ⊙ c + aux of one block on x (what backward(c) differentiates).
template <class Block>
double block_objective(Block& block, const Tensor<double>& x, const Tensor<double>& c, index_t sequences) {
  Tensor<double> y(x.shape());
  const auto out = block.forward(x.matrix(), y.matrix(), sequences, Mode::train);
  double v = double(out.aux_loss);
  for (index_t i = 0; i < y.size(); ++i) v += y[i] * c[i];
  return v;
}

// Every parameter and the input gradient of a block against central differences.
template <class Block>
void check_block_gradients(Block& block, index_t sequences, index_t length, std::uint64_t seed) {
  SingleThread single;
  const index_t N = sequences * length, d = block.d_model();
  randomize_parameters(block, seed);
  auto x = test::random_matrix<double>(N, d, seed + 1);
  const auto c = test::random_matrix<double>(N, d, seed + 2);
  Tensor<double> y({N, d}), dx({N, d});
  zero_grad(block);
  block.forward(x.matrix(), y.matrix(), sequences, Mode::train);
  block.backward(c.matrix(), dx.matrix());
  auto objective = [&] { return block_objective(block, x, c, sequences); };
  const auto r = check_parameter_gradients(block, objective, 1e-6, 100000);
  INFO("worst parameter " << r.worst_parameter << "[" << r.worst_index << "], error " << r.worst_error);
  CHECK(r.checked == parameter_count(block));
  CHECK(r.worst_error < 1e-6);
  test::require_input_gradient(x, dx, objective, 1e-6);
}

// ---- A trivial shared object: one linear map W [d, d] that every block's FFN uses. ----
struct SharedLinear {
  static constexpr const char* parameter_prefix = "pool.";
  Parameter<double> weight;
  Tensor<double> mask;     // a buffer
  std::uint64_t uses = 0;  // a counter: forwards through the map

  explicit SharedLinear(index_t d) : weight({d, d}), mask({d}) { mask.fill(1.0); }
  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("weight"), weight);
  }
  template <class F>
  void for_each_buffer(F&& f) {
    f(std::string_view("mask"), mask);
  }
  template <class F>
  void for_each_counter(F&& f) {
    f(std::string_view("uses"), uses);
  }
};

// The per-layer FFN over it: y = (x·W) ⊙ gain, with its own "gain" [d] and its own cache.
struct SharedLinearFFN {
  using scalar_type = double;
  SharedLinear* pool;
  Parameter<double> gain;
  Tensor<double> x_, xw_;

  explicit SharedLinearFFN(SharedLinear& p) : pool(&p), gain({p.weight.value.dim(0)}) {}
  index_t d_model() const { return gain.value.size(); }
  template <class F>
  void for_each_parameter(F&& f) {
    f(std::string_view("gain"), gain);
  }
  index_t total_parameters() const { return d_model(); }
  double active_parameters_per_token() const { return double(d_model() + d_model() * d_model()); }
  double flops_per_token() const { return 2.0 * double(d_model() * d_model()); }

  void forward(ConstMatrixView<double> x, MatrixView<double> y) {
    const index_t N = x.rows, d = d_model();
    const Tensor<double>& W = pool->weight.value;
    x_.resize({N, d});
    xw_.resize({N, d});
    for (index_t t = 0; t < N; ++t)
      for (index_t j = 0; j < d; ++j) {
        double v = 0;
        for (index_t i = 0; i < d; ++i) v += x(t, i) * W[i * d + j];
        x_[t * d + j] = x(t, j);
        xw_[t * d + j] = v;
        y(t, j) = v * gain.value[j];
      }
    ++pool->uses;
  }
  void backward(ConstMatrixView<double> dy, MatrixView<double> dx) {
    const index_t N = dy.rows, d = d_model();
    const Tensor<double>& W = pool->weight.value;
    for (index_t t = 0; t < N; ++t) {
      for (index_t j = 0; j < d; ++j) {
        const double g = dy(t, j) * gain.value[j];
        gain.grad[j] += dy(t, j) * xw_[t * d + j];
        for (index_t i = 0; i < d; ++i) pool->weight.grad[i * d + j] += x_[t * d + i] * g;
      }
      for (index_t i = 0; i < d; ++i) {
        double v = 0;
        for (index_t j = 0; j < d; ++j) v += dy(t, j) * gain.value[j] * W[i * d + j];
        dx(t, i) = v;
      }
    }
  }
};
using SharedBlock = TransformerBlock<CausalSelfAttention<double>, SharedLinearFFN>;

// A user FFN that reports MoE parts through the timing hook (set_times).
struct TimedMLP {
  using scalar_type = double;
  DenseMLP<double> mlp;
  MoETimes* times = nullptr;
  explicit TimedMLP(index_t d) : mlp({.d_model = d, .hidden = 2 * d}) {}
  index_t d_model() const { return mlp.d_model(); }
  void set_times(MoETimes* t) { times = t; }
  template <class F>
  void for_each_parameter(F&& f) {
    mlp.for_each_parameter(f);
  }
  void forward(ConstMatrixView<double> x, MatrixView<double> y) {
    ScopedTimer timer(times ? &times->experts_forward : nullptr);
    mlp.forward(x, y);
  }
  void backward(ConstMatrixView<double> dy, MatrixView<double> dx) {
    ScopedTimer timer(times ? &times->experts_backward : nullptr);
    mlp.backward(dy, dx);
  }
};

std::string error_of(auto&& f) {
  try {
    f();
  } catch (const smoe::error& e) {
    return e.what();
  }
  return "(no smoe::error)";
}
void check_message(const std::string& message, std::initializer_list<const char*> parts) {
  INFO(message);
  for (const char* p : parts) CHECK(message.find(p) != std::string::npos);
}

}  // namespace

// ============================================================================================
// The FeedForward concept
// ============================================================================================

static_assert(FeedForward<DenseMLP<float>>);
static_assert(FeedForward<DenseMLP<double, SwiGlu>>);
static_assert(FeedForward<SigmaMoE<float>>);
static_assert(FeedForward<MoE<ProductKeyRouter<float>, ValueExperts<float>>>);
static_assert(FeedForward<SharedLinearFFN>);
static_assert(!FeedForward<int>);
static_assert(!FeedForward<RoutingStats>);
static_assert(FeedForwardWithMode<SigmaMoE<float>> && !FeedForwardWithMode<DenseMLP<float>>);
static_assert(ModelBlock<SigmaBlock<float>>);

TEST_CASE("feed_forward reports the aux loss and routing statistics of MoE layers only", "[block][ffn]") {
  SingleThread single;  // tiny sizes: a parallel region per layer costs more than it saves
  const Sizes s;
  SigmaMoE<double> moe = make_sigma_moe<double>(s);
  DenseMLP<double> mlp({.d_model = s.d, .hidden = 6});
  randomize_parameters(moe, 3);
  randomize_parameters(mlp, 4);
  const auto x = test::random_matrix<double>(s.N(), s.d, 5);
  Tensor<double> y({s.N(), s.d});
  const auto a = feed_forward(moe, x.matrix(), y.matrix(), Mode::eval);
  CHECK(a.aux_loss != 0.0);
  REQUIRE(a.stats.has_value());
  CHECK(a.stats->assignments == s.N() * s.K);
  const auto b = feed_forward(mlp, x.matrix(), y.matrix(), Mode::train);
  CHECK(b.aux_loss == 0.0);
  CHECK_FALSE(b.stats.has_value());
}

// ============================================================================================
// One block
// ============================================================================================

TEMPLATE_TEST_CASE("a transformer block matches the naive reference", "[block]", float, double) {
  SingleThread single;  // tiny sizes: a parallel region per layer costs more than it saves
  using T = TestType;
  const Sizes s;
  const double tol = sizeof(T) == 8 ? 1e-11 : 2e-4;
  SECTION("RMSNorm, attention, sigma-MoE (aux losses on)") {
    SigmaBlock<T> block = make_sigma_block<T>(s);
    randomize_parameters(block, 10);
    const auto x = test::random_matrix<T>(s.N(), s.d, 11);
    Tensor<T> y({s.N(), s.d});
    const auto out = block.forward(x.matrix(), y.matrix(), s.B, Mode::train);
    const BlockRef expected = sigma_block_ref(block, s, as_double(x));
    test::require_close(y, expected.y, tol, tol, "y");
    CHECK(double(out.aux_loss) == Approx(expected.aux).epsilon(tol).margin(tol));
    REQUIRE(out.stats.has_value());
    CHECK(out.stats->assignments == s.N() * s.K);
  }
  SECTION("LayerNorm, attention, dense GELU MLP with biases") {
    using Block = TransformerBlock<CausalSelfAttention<T>, DenseMLP<T, Gelu>, LayerNorm<T>>;
    const index_t G = 12;
    Block block(make_attention<T>(s, 2), DenseMLP<T, Gelu>({.d_model = s.d, .hidden = G, .bias = true}), 1e-4);
    CHECK(block.attn_norm().config().eps == 1e-4);
    randomize_parameters(block, 20);
    const auto x = test::random_matrix<T>(s.N(), s.d, 21);
    Tensor<T> y({s.N(), s.d});
    const auto out = block.forward(x.matrix(), y.matrix(), s.B);
    CHECK(out.aux_loss == T(0));
    CHECK_FALSE(out.stats.has_value());
    const int N = int(s.N()), d = int(s.d);
    const xref::Attn spec{int(s.B), int(s.L), d, int(s.heads), int(s.heads), d / int(s.heads)};
    const Vec xd = as_double(x);
    const Vec a = xref::layer_norm(xd, N, d, as_double(block.attn_norm().weight().value),
                                   as_double(block.attn_norm().bias().value), 1e-4);
    const Vec h = add(xd, xref::attention(spec, a, as_double(block.attention().qkv_weight().value),
                                          as_double(block.attention().out_weight().value)));
    const Vec b = xref::layer_norm(h, N, d, as_double(block.ffn_norm().weight().value),
                                   as_double(block.ffn_norm().bias().value), 1e-4);
    const Vec w1 = as_double(block.ffn().w1().value), w2 = as_double(block.ffn().w2().value);
    const Vec b1 = as_double(block.ffn().b1().value), b2 = as_double(block.ffn().b2().value);
    Vec expected(h.size());
    for (int t = 0; t < N; ++t) {
      const Vec f = mref::expert(mref::Act::gelu, d, int(G), &b[std::size_t(t) * d], w1.data(), w2.data(), b1.data(),
                                 b2.data());
      for (int c = 0; c < d; ++c) expected[std::size_t(t) * d + c] = h[std::size_t(t) * d + c] + f[c];
    }
    test::require_close(y, expected, tol, tol, "y");
  }
}

TEST_CASE("block parameter names are attn_norm., attn., ffn_norm., ffn.", "[block][names]") {
  SingleThread single;  // tiny sizes: a parallel region per layer costs more than it saves
  const Sizes s;
  SigmaBlock<float> block = make_sigma_block<float>(s);
  CHECK(parameter_names(block) ==
        std::vector<std::string>{"attn_norm.weight", "attn.qkv.weight", "attn.out.weight", "ffn_norm.weight",
                                 "ffn.router.weight", "ffn.experts.w1", "ffn.experts.w2", "ffn.experts.b1",
                                 "ffn.experts.b2"});
  CHECK(block.d_model() == s.d);
}

TEST_CASE("block gradients match finite differences for every FFN kind", "[block][gradient]") {
  const Sizes s;
  SECTION("sigma-MoE, RMSNorm") {
    SigmaBlock<double> block = make_sigma_block<double>(s);
    check_block_gradients(block, s.B, s.L, 30);
  }
  SECTION("sigma-MoE, LayerNorm") {
    TransformerBlock<CausalSelfAttention<double>, SigmaMoE<double>, LayerNorm<double>> block(
        make_attention<double>(s), make_sigma_moe<double>(s));
    check_block_gradients(block, s.B, s.L, 40);
  }
  SECTION("dense SwiGLU MLP") {
    TransformerBlock<CausalSelfAttention<double>, DenseMLP<double, SwiGlu>> block(
        make_attention<double>(s), DenseMLP<double, SwiGlu>({.d_model = s.d, .hidden = 6, .bias = true}));
    check_block_gradients(block, s.B, s.L, 50);
  }
  SECTION("Top-K-activation MLP") {
    TransformerBlock<CausalSelfAttention<double>, DenseMLP<double>> block(
        make_attention<double>(s), DenseMLP<double>({.d_model = s.d, .hidden = 10, .bias = true, .topk = 3}));
    check_block_gradients(block, s.B, s.L, 60);
  }
  SECTION("product-key memory (MoE<ProductKeyRouter, ValueExperts>)") {
    using PKM = MoE<ProductKeyRouter<double>, ValueExperts<double>, WeightedSum<double>, ImportanceLoss<double>>;
    TransformerBlock<CausalSelfAttention<double>, PKM> block(
        make_attention<double>(s),
        PKM(ProductKeyRouter<double>({.d_model = s.d, .n_keys = 3, .heads = 2, .k = 2}),
            ValueExperts<double>({.d_model = s.d, .values = 9}), WeightedSum<double>{}, ImportanceLoss<double>(0.1)));
    check_block_gradients(block, s.B, s.L, 70);
  }
  SECTION("one sequence of one token") {
    SigmaBlock<double> block = make_sigma_block<double>(s);
    check_block_gradients(block, 1, 1, 80);
  }
}

TEST_CASE("a block keeps the FFN's input itself: the caller may overwrite x before backward", "[block]") {
  SingleThread single;  // tiny sizes: a parallel region per layer costs more than it saves
  const Sizes s;
  SigmaBlock<double> block = make_sigma_block<double>(s);
  randomize_parameters(block, 90);
  auto x = test::random_matrix<double>(s.N(), s.d, 91);
  const auto dy = test::random_matrix<double>(s.N(), s.d, 92);
  Tensor<double> y({s.N(), s.d}), dx1({s.N(), s.d}), dx2({s.N(), s.d});
  zero_grad(block);
  block.forward(x.matrix(), y.matrix(), s.B, Mode::train);
  block.backward(dy.matrix(), dx1.matrix());
  const auto g1 = flatten_grads<double>(block);
  zero_grad(block);
  block.forward(x.matrix(), y.matrix(), s.B, Mode::train);
  x.fill(1e3);
  y.fill(-7.0);
  block.backward(dy.matrix(), dx2.matrix());
  CHECK(flatten_grads<double>(block) == g1);
  CHECK(as_double(dx2) == as_double(dx1));
  SECTION("dx may be dy's memory") {
    Tensor<double> g = dy;
    zero_grad(block);
    x = test::random_matrix<double>(s.N(), s.d, 91);
    block.forward(x.matrix(), y.matrix(), s.B, Mode::train);
    block.backward(g.matrix(), g.matrix());
    CHECK(as_double(g) == as_double(dx1));
    CHECK(flatten_grads<double>(block) == g1);
  }
}

// ============================================================================================
// The model
// ============================================================================================

TEMPLATE_TEST_CASE("the model's forward matches the naive composition", "[model]", float, double) {
  SingleThread single;  // tiny sizes: a parallel region per layer costs more than it saves
  using T = TestType;
  const Sizes s;
  const bool tied = GENERATE(false, true);
  SigmaModel<T> model = make_sigma_model<T>(s, 2, tied);
  randomize_parameters(model, 100);
  const index_t N = s.N(), V = s.V, d = s.d;
  const auto ids = random_ids(N, V, 101);
  auto targets = random_ids(N, V, 102);
  targets[3] = -100;
  const ModelOutput out = model.forward(ids, targets, s.B, Mode::train);

  Vec x(std::size_t(N * d));
  const Vec embed = as_double(model.embedding().weight().value);
  for (index_t t = 0; t < N; ++t)
    for (index_t c = 0; c < d; ++c) x[t * d + c] = embed[ids[t] * d + c];
  double aux = 0;
  for (index_t l = 0; l < 2; ++l) {
    const BlockRef r = sigma_block_ref(model.block(l), s, x);
    x = r.y;
    aux += r.aux;
  }
  x = xref::rms_norm(x, int(N), int(d), as_double(model.final_norm().weight().value), 1e-6);
  const Vec head = as_double(model.head().weight().value);
  if (tied) CHECK(head == embed);
  Vec logits(std::size_t(N * V), 0.0);
  for (index_t t = 0; t < N; ++t)
    for (index_t v = 0; v < V; ++v)
      for (index_t c = 0; c < d; ++c) logits[t * V + v] += x[t * d + c] * head[v * d + c];
  const std::vector<long> yl(targets.begin(), targets.end());
  const double loss = xref::cross_entropy(logits, int(N), int(V), yl, -100);

  const double tol = sizeof(T) == 8 ? 1e-10 : 3e-4;
  test::require_close(view_values(model.logits()), logits, tol, tol, "logits");
  CHECK(out.loss == Approx(loss).epsilon(tol));
  CHECK(out.aux_loss == Approx(aux).epsilon(tol).margin(tol));
  CHECK(out.objective() == out.loss + out.aux_loss);
  CHECK(out.counted == N - 1);
  REQUIRE(out.routing.size() == 2);
  for (index_t l = 0; l < 2; ++l) {
    CHECK(out.routing[l].layer == l);
    CHECK(out.routing[l].stats.assignments == N * s.K);
  }
  SECTION("int64 ids and targets give the same result") {
    const std::vector<std::int64_t> ids64(ids.begin(), ids.end()), targets64(targets.begin(), targets.end());
    const ModelOutput again = model.forward(ids64, targets64, s.B, Mode::train);
    CHECK(again.loss == out.loss);
    CHECK(again.aux_loss == out.aux_loss);
  }
  SECTION("forward_logits computes the same logits without a loss") {
    const ModelOutput l = model.forward_logits(ids, s.B);
    CHECK(l.loss == 0.0);
    CHECK(l.counted == 0);
    CHECK(l.aux_loss == out.aux_loss);
    test::require_close(view_values(model.logits()), logits, tol, tol, "logits");
  }
}

TEST_CASE("whole-model gradients match finite differences: 2 layers of sigma-MoE, aux losses on",
          "[model][gradient]") {
  SingleThread single;
  const Sizes s;
  const bool tied = GENERATE(false, true);
  SigmaModel<double> model = make_sigma_model<double>(s, 2, tied);
  randomize_parameters(model, 110);
  const auto ids = random_ids(s.N(), s.V, 111);
  auto targets = random_ids(s.N(), s.V, 112);
  targets[7] = -100;
  zero_grad(model);
  const ModelOutput out = model.forward(ids, targets, s.B, Mode::train);
  REQUIRE(std::abs(out.aux_loss) > 1e-3);  // the aux losses take part in the objective
  model.backward();
  auto objective = [&] { return model.forward(ids, targets, s.B, Mode::train).objective(); };
  const auto r = check_parameter_gradients(model, objective, 1e-6, 100000);
  INFO("tied " << tied << ": worst parameter " << r.worst_parameter << "[" << r.worst_index << "], error "
               << r.worst_error);
  CHECK(r.checked == parameter_count(model));
  CHECK(r.worst_error < 1e-6);
  // The aux losses' gradient is in backward: without it the router gradients differ.
  SigmaModel<double> plain = make_sigma_model<double>(s, 2, tied);
  std::vector<Vec> values;
  model.for_each_parameter([&](std::string_view, auto& p) { values.push_back(as_double(p.value)); });
  std::size_t i = 0;
  plain.for_each_parameter([&](std::string_view, auto& p) {
    for (index_t j = 0; j < p.value.size(); ++j) p.value[j] = values[i][j];
    ++i;
  });
  std::get<0>(plain.block(0).ffn().losses()).coef = 0;
  std::get<1>(plain.block(0).ffn().losses()).coef = 0;
  zero_grad(plain);
  plain.forward(ids, targets, s.B, Mode::train);
  plain.backward();
  const Vec with_aux = as_double(model.block(0).ffn().router().weight().grad);
  const Vec without = as_double(plain.block(0).ffn().router().weight().grad);
  double diff = 0;
  for (std::size_t j = 0; j < with_aux.size(); ++j) diff += std::abs(with_aux[j] - without[j]);
  CHECK(diff > 1e-4);
}

TEST_CASE("Model::backward(loss_scale) differentiates loss_scale · loss + aux_loss", "[model][gradient]") {
  SingleThread single;
  const Sizes s;
  SigmaModel<double> model = make_sigma_model<double>(s, 2, false);
  randomize_parameters(model, 120);
  const auto ids = random_ids(s.N(), s.V, 121);
  const auto targets = random_ids(s.N(), s.V, 122);
  const double scale = 0.375;
  zero_grad(model);
  model.forward(ids, targets, s.B, Mode::train);
  model.backward(scale);
  auto objective = [&] {
    const ModelOutput out = model.forward(ids, targets, s.B, Mode::train);
    return scale * out.loss + out.aux_loss;
  };
  const auto r = check_parameter_gradients(model, objective, 1e-6, 100000);
  INFO("worst parameter " << r.worst_parameter << "[" << r.worst_index << "], error " << r.worst_error);
  CHECK(r.checked == parameter_count(model));
  CHECK(r.worst_error < 1e-6);
}

TEST_CASE("model parameter names; a tied head is visited once, as embed.weight", "[model][names]") {
  SingleThread single;  // tiny sizes: a parallel region per layer costs more than it saves
  const Sizes s;
  SigmaModel<float> untied = make_sigma_model<float>(s, 2, false);
  const auto names = parameter_names(untied);
  REQUIRE(names.size() == 1 + 2 * 9 + 2);
  CHECK(names.front() == "embed.weight");
  CHECK(names[1] == "blocks.0.attn_norm.weight");
  CHECK(names[9] == "blocks.0.ffn.experts.b2");
  CHECK(names[10] == "blocks.1.attn_norm.weight");
  CHECK(names[19] == "final_norm.weight");
  CHECK(names.back() == "head.weight");
  CHECK(std::set<std::string>(names.begin(), names.end()).size() == names.size());
  SigmaModel<float> tied = make_sigma_model<float>(s, 2, true);
  const auto tied_names = parameter_names(tied);
  CHECK(tied_names == std::vector<std::string>(names.begin(), names.end() - 1));
  CHECK(tied.tied());
  CHECK(&tied.head().weight() == &tied.embedding().weight());
}

TEST_CASE("a model owns a shared object: built first, given to the blocks, visited once", "[model][shared]") {
  SingleThread single;  // tiny sizes: a parallel region per layer costs more than it saves
  const Sizes s;
  const index_t d = s.d, V = s.V;
  auto make = [&](index_t, SharedLinear& pool) { return SharedBlock(make_attention<double>(s), SharedLinearFFN(pool)); };
  Model<SharedBlock, SharedLinear> model({.vocab = V, .d_model = d, .layers = 2}, SharedLinear(d), make);
  for (index_t l = 0; l < 2; ++l) CHECK(model.block(l).ffn().pool == &model.shared());

  std::vector<std::string> names;
  std::set<const void*> seen;
  model.for_each_parameter([&](std::string_view name, auto& p) {
    names.emplace_back(name);
    CHECK(seen.insert(&p).second);
  });
  CHECK(names == std::vector<std::string>{"embed.weight",
                                          "pool.weight",
                                          "blocks.0.attn_norm.weight",
                                          "blocks.0.attn.qkv.weight",
                                          "blocks.0.attn.out.weight",
                                          "blocks.0.ffn_norm.weight",
                                          "blocks.0.ffn.gain",
                                          "blocks.1.attn_norm.weight",
                                          "blocks.1.attn.qkv.weight",
                                          "blocks.1.attn.out.weight",
                                          "blocks.1.ffn_norm.weight",
                                          "blocks.1.ffn.gain",
                                          "final_norm.weight",
                                          "head.weight"});
  const index_t expected_total = V * d + d * d + 2 * (2 * d + 4 * d * d + d) + d + V * d;
  CHECK(model.total_parameters() == expected_total);
  CHECK(parameter_count(model) == expected_total);
  CHECK(model.active_parameters_per_token() == double(d + 2 * (2 * d + 4 * d * d + d + d * d) + d + V * d));

  std::vector<std::string> buffers, counters;
  model.for_each_buffer([&](std::string_view name, auto&) { buffers.emplace_back(name); });
  model.for_each_counter([&](std::string_view name, std::uint64_t&) { counters.emplace_back(name); });
  CHECK(buffers == std::vector<std::string>{"pool.mask"});
  CHECK(counters == std::vector<std::string>{"pool.uses"});

  const auto ids = random_ids(s.N(), V, 121), targets = random_ids(s.N(), V, 122);
  model.forward(ids, targets, s.B);
  CHECK(model.shared().uses == 2);  // both blocks went through the shared map

  SECTION("gradients: the shared weight's is the sum over the layers") {
    randomize_parameters(model, 123);
    zero_grad(model);
    model.forward(ids, targets, s.B);
    model.backward();
    auto objective = [&] { return model.forward(ids, targets, s.B).objective(); };
    const auto r = check_parameter_gradients(model, objective, 1e-6, 100000);
    INFO("worst parameter " << r.worst_parameter << "[" << r.worst_index << "], error " << r.worst_error);
    CHECK(r.worst_error < 1e-6);
    // One layer's share alone is not the gradient: both layers contributed.
    const Vec total = as_double(model.shared().weight.grad);
    zero_grad(model);
    model.block(1).ffn().gain.value.zero();  // layer 1 no longer depends on W
    model.forward(ids, targets, s.B);
    model.backward();
    const Vec first_only = as_double(model.shared().weight.grad);
    double diff = 0;
    for (std::size_t i = 0; i < total.size(); ++i) diff += std::abs(total[i] - first_only[i]);
    CHECK(diff > 1e-6);
  }
  SECTION("the factory may take (shared, layer), as MoEStack's make_layer") {
    Model<SharedBlock, SharedLinear> other({.vocab = V, .d_model = d, .layers = 3}, SharedLinear(d),
                                           [&](SharedLinear& pool, index_t) {
                                             return SharedBlock(make_attention<double>(s), SharedLinearFFN(pool));
                                           });
    CHECK(other.layers() == 3);
    CHECK(other.block(2).ffn().pool == &other.shared());
  }
}

TEST_CASE("model buffers and router step counters are forwarded with block names", "[model][buffers]") {
  SingleThread single;  // tiny sizes: a parallel region per layer costs more than it saves
  const Sizes s;
  SECTION("step counters of stochastic routers") {
    SigmaModel<float> model = make_sigma_model<float>(s, 2, false, 0.25);
    randomize_parameters(model, 130);
    std::map<std::string, std::uint64_t*> counters;
    model.for_each_counter([&](std::string_view name, std::uint64_t& c) { counters[std::string(name)] = &c; });
    REQUIRE(counters.size() == 2);
    REQUIRE(counters.count("blocks.0.ffn.router.step"));
    REQUIRE(counters.count("blocks.1.ffn.router.step"));
    const auto ids = random_ids(s.N(), s.V, 131), targets = random_ids(s.N(), s.V, 132);
    model.forward(ids, targets, s.B, Mode::train);
    model.forward(ids, targets, s.B, Mode::eval);
    CHECK(*counters["blocks.1.ffn.router.step"] == 1);
    *counters["blocks.0.ffn.router.step"] = 41;
    CHECK(model.block(0).ffn().router().step() == 41);
    // A refused forward changes nothing, not even the counters.
    auto bad = targets;
    bad[2] = std::int32_t(s.V);
    CHECK_THROWS_AS(model.forward(ids, bad, s.B, Mode::train), smoe::error);
    CHECK(model.block(0).ffn().router().step() == 41);
    CHECK(model.block(1).ffn().router().step() == 1);
  }
  SECTION("buffers (a group router's selection bias)") {
    using GroupMoE = MoE<GroupTopKRouter<float>, ReluExperts<float>>;
    using Block = TransformerBlock<CausalSelfAttention<float>, GroupMoE>;
    Model<Block> model({.vocab = s.V, .d_model = s.d, .layers = 2}, [&](index_t) {
      return Block(make_attention<float>(s),
                   GroupMoE(GroupTopKRouter<float>({.d_model = s.d, .experts = 4, .k = 2, .n_groups = 2, .topk_groups = 1}),
                            ReluExperts<float>({.d_model = s.d, .experts = 4, .hidden = 3})));
    });
    std::vector<std::string> names;
    model.for_each_buffer([&](std::string_view name, auto& t) {
      names.emplace_back(name);
      CHECK(t.size() == 4);
    });
    CHECK(names == std::vector<std::string>{"blocks.0.ffn.router.bias", "blocks.1.ffn.router.bias"});
    std::vector<std::string> none;
    model.for_each_counter([&](std::string_view name, std::uint64_t&) { none.emplace_back(name); });
    CHECK(none.empty());
  }
}

TEST_CASE("model accounting sums its parts", "[model][accounting]") {
  SingleThread single;  // tiny sizes: a parallel region per layer costs more than it saves
  const Sizes s;
  const bool tied = GENERATE(false, true);
  SigmaModel<double> model = make_sigma_model<double>(s, 2, tied);
  const double d = double(s.d), V = double(s.V), E = double(s.E), K = double(s.K), G = double(s.G), L = 2;
  const double expert = 2 * d * G + G + d;                   // w1, w2, b1, b2 of one expert
  const double block_total = 2 * d + 4 * d * d + E * d + E * expert;
  CHECK(double(model.total_parameters()) == V * d + L * block_total + d + (tied ? 0 : V * d));
  CHECK(model.total_parameters() == parameter_count(model));
  CHECK(model.active_parameters_per_token() == d + L * (2 * d + 4 * d * d + E * d + K * expert) + d + V * d);
  const index_t context = 7;
  const double block_flops = 2 * 4 * d * d + 2 * d * double(context + 1) + 2 * E * d + K * 4 * d * G;
  CHECK(model.flops_per_token(context) == Approx(L * block_flops + 2 * V * d));
  CHECK(model.materialization_flops() == 0.0);
  CHECK_THROWS_AS(model.flops_per_token(0), smoe::error);
}

#if defined(_OPENMP)
TEST_CASE("DenseMLP forward and backward are bitwise identical for 1 and 2 threads", "[dense][determinism]") {
  const index_t tokens = 200, d = 24;  // three token blocks, the last with a remainder
  const index_t topk = GENERATE(0, 7);
  DenseMLP<float, SwiGlu> mlp({.d_model = d, .hidden = 40, .bias = true, .topk = topk});
  randomize_parameters(mlp, 140, 0.3);
  const auto x = test::random_matrix<float>(tokens, d, 141), dy = test::random_matrix<float>(tokens, d, 142);
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    zero_grad(mlp);
    Tensor<float> y({tokens, d}), dx({tokens, d});
    mlp.forward(x.matrix(), y.matrix());
    mlp.backward(dy.matrix(), dx.matrix());
    std::vector<float> all(y.data(), y.data() + y.size());
    all.insert(all.end(), dx.data(), dx.data() + dx.size());
    const auto g = flatten_grads<float>(mlp);
    all.insert(all.end(), g.begin(), g.end());
    return all;
  };
  const auto one = run(1), two = run(2);
  omp_set_num_threads(omp_get_num_procs());
  CHECK(one == two);
}

TEST_CASE("the model gives bitwise identical results for 1 and 2 threads", "[model][determinism]") {
  Sizes s;
  s.V = 64, s.d = 32, s.heads = 4, s.B = 2, s.L = 80, s.E = 8, s.K = 2, s.G = 16;
  SigmaModel<float> model({.vocab = s.V, .d_model = s.d, .layers = 2}, [&](index_t) {
    return SigmaBlock<float>(CausalSelfAttention<float>({.d_model = s.d, .heads = 4, .kv_heads = 2, .block = 32}),
                             make_sigma_moe<float>(s));
  });
  randomize_parameters(model, 150, 0.2);
  const auto ids = random_ids(s.N(), s.V, 151), targets = random_ids(s.N(), s.V, 152);
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    zero_grad(model);
    const ModelOutput out = model.forward(ids, targets, s.B, Mode::train);
    std::vector<float> all = {float(out.loss), float(out.aux_loss)};
    const auto logits = model.logits();
    all.insert(all.end(), logits.data, logits.data + logits.rows * logits.cols);
    model.backward();
    const auto g = flatten_grads<float>(model);
    all.insert(all.end(), g.begin(), g.end());
    return all;
  };
  const auto one = run(1), two = run(2);
  omp_set_num_threads(omp_get_num_procs());
  CHECK(one == two);
}
#endif

// ============================================================================================
// Timing
// ============================================================================================

TEST_CASE("per-layer timing is off by default and fills every part when on", "[model][timing]") {
  SingleThread single;  // tiny sizes: a parallel region per layer costs more than it saves
  const Sizes s;
  using Block = TransformerBlock<CausalSelfAttention<double>, TimedMLP>;
  Model<Block> model({.vocab = s.V, .d_model = s.d, .layers = 2},
                     [&](index_t) { return Block(make_attention<double>(s), TimedMLP(s.d)); });
  randomize_parameters(model, 160);
  const auto ids = random_ids(s.N(), s.V, 161), targets = random_ids(s.N(), s.V, 162);
  auto step = [&] {
    model.forward(ids, targets, s.B);
    model.backward();
  };
  CHECK_FALSE(model.timing());
  step();
  CHECK(model.times().steps == 0);
  CHECK(model.times().total() == 0.0);
  CHECK(model.block(0).times() == nullptr);
  CHECK(model.block(0).ffn().times == nullptr);

  model.set_timing(true);
  step();
  step();
  const ModelTimes& t = model.times();
  CHECK(t.steps == 2);
  REQUIRE(t.blocks.size() == 2);
  for (const BlockTimes& b : t.blocks) {
    CHECK(b.attention_forward > 0);
    CHECK(b.ffn_forward > 0);
    CHECK(b.norms_forward > 0);
    CHECK(b.attention_backward > 0);
    CHECK(b.ffn_backward > 0);
    CHECK(b.norms_backward > 0);
    // The FFN's own parts arrive through set_times and lie inside ffn_*.
    CHECK(b.moe.experts_forward > 0);
    CHECK(b.moe.experts_forward <= b.ffn_forward);
    CHECK(b.moe.experts_backward <= b.ffn_backward);
    CHECK(b.moe.router_forward == 0.0);
  }
  for (double v : {t.embedding_forward, t.final_norm_forward, t.head_forward, t.loss_forward, t.loss_backward,
                   t.head_backward, t.final_norm_backward, t.embedding_backward})
    CHECK(v > 0);
  CHECK(t.total() == Approx(t.forward() + t.backward()));
  CHECK(t.blocks_total().attention_forward == t.blocks[0].attention_forward + t.blocks[1].attention_forward);

  std::ostringstream table;
  print_times(table, t);
  for (const char* part : {"attention_forward", "ffn_backward", "experts_forward", "head_forward", "per block", "2 steps"})
    CHECK(table.str().find(part) != std::string::npos);
  std::ostringstream csv;
  write_times_csv_header(csv);
  write_times_csv(csv, 5, t);
  std::istringstream lines(csv.str());
  std::string line;
  std::getline(lines, line);
  CHECK(line == "step,layer,part,seconds");
  int rows = 0, block_rows = 0;
  while (std::getline(lines, line)) {
    ++rows;
    CHECK(line.rfind("5,", 0) == 0);
    block_rows += line.rfind("5,1,", 0) == 0;
  }
  CHECK(rows == 8 + 2 * 15);
  CHECK(block_rows == 15);
  CHECK(csv.str().find("5,-1,head_forward,") != std::string::npos);
  CHECK(csv.str().find("5,0,attention_forward,") != std::string::npos);

  SECTION("reset keeps the blocks; timing stops when turned off") {
    model.reset_times();
    CHECK(model.times().steps == 0);
    CHECK(model.times().total() == 0.0);
    step();
    CHECK(model.times().blocks[1].attention_forward > 0);
    model.set_timing(false);
    const double before = model.times().total();
    step();
    CHECK(model.times().total() == before);
    CHECK(model.times().steps == 1);
  }
}

// ============================================================================================
// Bad input
// ============================================================================================

TEST_CASE("model and block reject bad input with smoe::error naming the argument", "[model][errors]") {
  SingleThread single;  // tiny sizes: a parallel region per layer costs more than it saves
  const Sizes s;
  auto make_block = [&](index_t) { return make_sigma_block<float>(s); };
  SECTION("config") {
    check_message(error_of([&] { SigmaModel<float>({.vocab = 0, .d_model = s.d}, make_block); }),
                  {"Model", "vocab", ">= 1", "got 0"});
    check_message(error_of([&] { SigmaModel<float>({.vocab = s.V, .d_model = 0}, make_block); }),
                  {"d_model", ">= 1", "got 0"});
    check_message(error_of([&] { SigmaModel<float>({.vocab = s.V, .d_model = s.d, .layers = -1}, make_block); }),
                  {"layers", ">= 0", "got -1"});
    check_message(error_of([&] { SigmaModel<float>({.vocab = s.V, .d_model = s.d, .norm_eps = -1}, make_block); }),
                  {"norm_eps", "got -1"});
    check_message(error_of([&] { SigmaModel<float>({.vocab = s.V, .d_model = 6, .layers = 2}, make_block); }),
                  {"block 0", "d_model 8", "config.d_model is 6"});
    check_message(error_of([&] { SigmaBlock<float>(make_attention<float>(s), make_sigma_moe<float>(s), -0.5); }),
                  {"TransformerBlock", "norm_eps", "got -0.5"});
    Sizes other = s;
    other.d = 6;
    check_message(error_of([&] { SigmaBlock<float>(CausalSelfAttention<float>({.d_model = 8, .heads = 2}),
                                                   make_sigma_moe<float>(other)); }),
                  {"TransformerBlock", "ffn.d_model()", "must be 8", "got 6"});
  }
  SigmaModel<float> model = make_sigma_model<float>(s, 2, false);
  randomize_parameters(model, 170);
  const auto ids = random_ids(s.N(), s.V, 171), targets = random_ids(s.N(), s.V, 172);
  SECTION("forward") {
    check_message(error_of([&] { model.forward(std::vector<std::int32_t>{}, std::vector<std::int32_t>{}, 1); }),
                  {"Model", "ids", "empty"});
    check_message(error_of([&] { model.forward(ids, targets, 0); }), {"sequences", ">= 1", "got 0"});
    check_message(error_of([&] { model.forward(ids, targets, 3); }), {"multiple of sequences = 3", "got 10"});
    auto bad_ids = ids;
    bad_ids[4] = -1;
    check_message(error_of([&] { model.forward(bad_ids, targets, s.B); }), {"ids[4]", "[0, 11)", "got -1"});
    check_message(error_of([&] { model.forward(ids, std::vector<std::int32_t>(9, 0), s.B); }),
                  {"targets", "10 entries", "got 9"});
    auto bad_targets = targets;
    bad_targets[6] = 11;
    check_message(error_of([&] { model.forward(ids, bad_targets, s.B); }),
                  {"targets[6]", "[0, 11)", "ignore_index = -100", "got 11"});
    check_message(error_of([&] { model.block(2); }), {"block index", "[0, 2)", "got 2"});
  }
  SECTION("backward") {
    check_message(error_of([&] { model.backward(); }), {"Model", "backward needs a forward with targets"});
    model.forward(ids, targets, s.B);
    model.backward();
    check_message(error_of([&] { model.backward(); }), {"one backward per forward"});
    model.forward_logits(ids, s.B);
    check_message(error_of([&] { model.backward(); }), {"backward needs a forward with targets"});
  }
  SECTION("block") {
    SigmaBlock<float> block = make_sigma_block<float>(s);
    Tensor<float> x({s.N(), s.d}), y({s.N(), s.d}), wrong({s.N(), s.d + 1});
    x.zero();
    check_message(error_of([&] { block.backward(x.matrix(), y.matrix()); }), {"TransformerBlock", "before forward"});
    check_message(error_of([&] { block.forward(wrong.matrix(), y.matrix(), 1); }), {"TransformerBlock", "x"});
    check_message(error_of([&] { block.forward(x.matrix(), wrong.matrix(), 1); }), {"TransformerBlock", "y"});
    check_message(error_of([&] { block.forward(x.matrix(), y.matrix(), 0); }), {"sequences", "got 0"});
    check_message(error_of([&] { block.forward(x.matrix(), y.matrix(), 4); }), {"multiple of sequences = 4"});
    check_message(error_of([&] { block.forward(x.matrix(), x.matrix(), 1); }), {"y must not be the memory of x"});
    block.forward(x.matrix(), y.matrix(), s.B);
    check_message(error_of([&] { block.backward(wrong.matrix(), y.matrix()); }), {"TransformerBlock", "dy"});
    check_message(error_of([&] { block.backward(y.matrix(), wrong.matrix()); }), {"TransformerBlock", "dx"});
  }
}

TEST_CASE("a model with no blocks is embedding, final norm and head", "[model][edge]") {
  SingleThread single;  // tiny sizes: a parallel region per layer costs more than it saves
  const Sizes s;
  SigmaModel<double> model = make_sigma_model<double>(s, 0, false);
  randomize_parameters(model, 180);
  CHECK(model.layers() == 0);
  CHECK(parameter_names(model) == std::vector<std::string>{"embed.weight", "final_norm.weight", "head.weight"});
  const auto ids = random_ids(3, s.V, 181), targets = random_ids(3, s.V, 182);
  zero_grad(model);
  const ModelOutput out = model.forward(ids, targets, 1);
  CHECK(out.aux_loss == 0.0);
  CHECK(out.routing.empty());
  model.backward();
  const auto r = check_parameter_gradients(model, [&] { return model.forward(ids, targets, 1).objective(); }, 1e-6, 1000);
  CHECK(r.worst_error < 1e-7);
}

TEST_CASE("the documented model example builds, and plain SGD on it lowers the loss", "[model][docs]") {
  SingleThread single;  // tiny sizes: a parallel region per layer costs more than it saves
  const index_t V = 16, d = 8, L = 2, H = 2, E = 4, K = 2, G = 4, B = 2;
  using Attn = smoe::CausalSelfAttention<float>;
  using FFN = smoe::MoE<smoe::SigmoidTopK<float>, smoe::ReluExperts<float>, smoe::WeightedSum<float>,
                        smoe::EntropyLoss<float>>;
  using Block = smoe::TransformerBlock<Attn, FFN>;
  smoe::Model<Block> model({.vocab = V, .d_model = d, .layers = L, .tie_embeddings = true},
                           [&](smoe::index_t) {
                             return Block(Attn({.d_model = d, .heads = H}),
                                          FFN(smoe::SigmoidTopK<float>({d, E, K}), smoe::ReluExperts<float>({d, E, G}),
                                              {}, smoe::EntropyLoss<float>(0.001)));
                           });
  randomize_parameters(model, 190, 0.3);
  // Next-token prediction on a fixed cyclic sequence.
  std::vector<std::int32_t> ids(std::size_t(B * 6)), targets(ids.size());
  for (std::size_t t = 0; t < ids.size(); ++t) ids[t] = std::int32_t(t % 5), targets[t] = std::int32_t((t + 1) % 5);
  double first = 0, last = 0;
  for (int step = 0; step < 30; ++step) {
    smoe::zero_grad(model);
    const smoe::ModelOutput out = model.forward(ids, targets, B, smoe::Mode::train);
    model.backward();
    model.for_each_parameter([](std::string_view, auto& p) {
      for (index_t i = 0; i < p.value.size(); ++i) p.value[i] -= 0.2f * p.grad[i];
    });
    (step == 0 ? first : last) = out.objective();
  }
  CHECK(last < 0.5 * first);
}
