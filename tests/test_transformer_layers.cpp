// Transformer layers: RMSNorm, LayerNorm, blocked causal attention (RoPE, grouped-query heads),
// token embedding, output projection (own and tied weight) and softmax cross-entropy, against
// naive double references written here from the formulas, central finite differences, float vs
// double, bitwise thread-count independence, bad input, and the attention memory bound.
#include <smoe/smoe.hpp>

#include <atomic>
#include <cstdlib>
#include <limits>
#include <map>
#include <new>
#include <string>

#include "catch.hpp"
#include "helpers.hpp"
#include "transformer_reference.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

// ---- Allocation recorder: the largest single operator-new request while `recording` is set. ----
// Replaces every global operator new/delete of this program (smoe's Tensor and std::vector both
// allocate through them).
namespace {
std::atomic<bool> recording{false};
std::atomic<std::size_t> largest_allocation{0};

void note_allocation(std::size_t n) {
  if (!recording.load(std::memory_order_relaxed)) return;
  std::size_t seen = largest_allocation.load(std::memory_order_relaxed);
  while (n > seen && !largest_allocation.compare_exchange_weak(seen, n, std::memory_order_relaxed)) {
  }
}
void* allocate(std::size_t n) {
  note_allocation(n);
  return std::malloc(n == 0 ? 1 : n);
}
void* allocate_aligned(std::size_t n, std::align_val_t alignment) {
  note_allocation(n);
  const std::size_t a = static_cast<std::size_t>(alignment);
  return std::aligned_alloc(a, (n + a - 1) / a * a + (n == 0 ? a : 0));
}
// Out of line, so the compiler does not pair an inlined free() with the new-expressions it sees.
[[gnu::noinline]] void release(void* p) noexcept { std::free(p); }
}  // namespace

void* operator new(std::size_t n) {
  if (void* p = allocate(n)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) {
  if (void* p = allocate(n)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, std::align_val_t a) {
  if (void* p = allocate_aligned(n, a)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n, std::align_val_t a) {
  if (void* p = allocate_aligned(n, a)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return allocate(n); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return allocate(n); }
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept { return allocate_aligned(n, a); }
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept { return allocate_aligned(n, a); }
void operator delete(void* p) noexcept { release(p); }
void operator delete[](void* p) noexcept { release(p); }
void operator delete(void* p, std::size_t) noexcept { release(p); }
void operator delete[](void* p, std::size_t) noexcept { release(p); }
void operator delete(void* p, std::align_val_t) noexcept { release(p); }
void operator delete[](void* p, std::align_val_t) noexcept { release(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { release(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { release(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { release(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { release(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { release(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { release(p); }

using namespace smoe;

namespace {

// ---- Naive double references, written from the formulas. ----
namespace ref = smoe::test::xref;

template <class X>
std::vector<double> as_double(const X& t) {
  std::vector<double> v(static_cast<std::size_t>(t.size()));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = double(t[static_cast<index_t>(i)]);
  return v;
}

template <class T>
Tensor<T> from_double(const Tensor<double>& t) {
  Tensor<T> out(t.shape());
  for (index_t i = 0; i < t.size(); ++i) out[i] = T(t[i]);
  return out;
}

template <HasParameters C>
void randomize_parameters(C& c, double std, std::uint64_t seed = 100) {
  c.for_each_parameter([&](std::string_view, auto& p) { test::randomize(p.value, seed++, std); });
}

// Copies every parameter of `from` into `to` (same names, same order), converting the scalar.
template <HasParameters A, HasParameters B>
void copy_parameters(A& from, B& to) {
  std::vector<std::vector<double>> values;
  from.for_each_parameter([&](std::string_view, auto& p) { values.push_back(as_double(p.value)); });
  std::size_t i = 0;
  to.for_each_parameter([&](std::string_view, auto& p) {
    REQUIRE(i < values.size());
    REQUIRE(std::size_t(p.value.size()) == values[i].size());
    for (index_t j = 0; j < p.value.size(); ++j) p.value[j] = static_cast<std::remove_reference_t<decltype(p.value[j])>>(values[i][j]);
    ++i;
  });
}

template <class T>
double dot(const Tensor<T>& a, const Tensor<T>& b) {
  double s = 0;
  for (index_t i = 0; i < a.size(); ++i) s += double(a[i]) * double(b[i]);
  return s;
}

// Every parameter gradient of `c` against central differences of objective().
template <HasParameters C, class F>
void require_parameter_gradients(C& c, F&& objective, double tol = 1e-7) {
  const auto r = check_parameter_gradients(c, objective, 1e-6, 100000);
  INFO("worst parameter " << r.worst_parameter << "[" << r.worst_index << "], error " << r.worst_error);
  CHECK(r.checked > 0);
  CHECK(r.worst_error < tol);
}

template <class T>
std::vector<T> flatten_grads(auto& component) {
  std::vector<T> all;
  component.for_each_parameter(
      [&](std::string_view, auto& p) { all.insert(all.end(), p.grad.data(), p.grad.data() + p.grad.size()); });
  return all;
}

template <class T>
std::vector<T> values_of(const Tensor<T>& t) {
  return {t.data(), t.data() + t.size()};
}

// Finite-difference checks run thousands of tiny forwards; on one thread they do not pay for a
// parallel region each (the thread-count independence is its own test below).
struct SingleThread {
#if defined(_OPENMP)
  int saved = omp_get_max_threads();
  SingleThread() { omp_set_num_threads(1); }
  ~SingleThread() { omp_set_num_threads(saved); }
#endif
};

// One attention case: sizes, RoPE, offset and block.
struct AttnCase {
  const char* what;
  int B, L, d, H, Hkv, dh, block;
  bool rope = true;
  int offset = 0;
  double base = 10000;

  AttentionConfig config() const {
    return {.d_model = d, .heads = H, .kv_heads = Hkv, .head_dim = dh, .rope = rope, .rope_base = base, .block = block};
  }
  ref::Attn spec() const { return {B, L, d, H, Hkv, dh, rope, base, offset}; }
};

const AttnCase attention_cases[] = {
    {"L not a multiple of the block, GQA", 2, 7, 8, 2, 1, 4, 3},
    {"L = 1", 3, 1, 8, 2, 1, 4, 4},
    {"L < block", 1, 5, 6, 3, 3, 2, 8},
    {"H_kv = H, several blocks", 2, 9, 12, 4, 4, 6, 4},
    {"H_kv = 1 (multi-query), offset", 2, 6, 5, 4, 1, 2, 2, true, 3},
    {"grouped 4 -> 2, block 1", 1, 5, 7, 4, 2, 4, 1, true, 0, 500.0},
    {"no RoPE, odd head_dim", 2, 6, 6, 2, 1, 3, 4, false},
    {"L = block exactly", 2, 4, 8, 2, 2, 4, 4},
};

}  // namespace

// ============================================================================================
// Norms
// ============================================================================================

TEMPLATE_TEST_CASE("RMSNorm and LayerNorm match the naive reference", "[transformer][norm]", float, double) {
  using T = TestType;
  const index_t N = 130, d = 7;  // two row blocks with a remainder
  const auto x = test::random_matrix<double>(N, d, 1, 2.0);
  const auto w = test::random_matrix<double>(1, d, 2), b = test::random_matrix<double>(1, d, 3);
  const auto xt = from_double<T>(x);
  Tensor<T> y({N, d});
  SECTION("RMSNorm") {
    RMSNorm<T> norm({.d_model = d, .eps = 1e-5});
    for (index_t c = 0; c < d; ++c) CHECK(norm.weight().value[c] == T(1));  // initialized to 1
    for (index_t c = 0; c < d; ++c) norm.weight().value[c] = T(w[c]);
    norm.forward(xt.matrix(), y.matrix());
    test::require_close(y, ref::rms_norm(as_double(x), N, d, as_double(w), 1e-5), test::tolerance<T>(), test::tolerance<T>());
  }
  SECTION("LayerNorm") {
    LayerNorm<T> norm({.d_model = d, .eps = 1e-4});
    for (index_t c = 0; c < d; ++c) CHECK((norm.weight().value[c] == T(1) && norm.bias().value[c] == T(0)));
    for (index_t c = 0; c < d; ++c) norm.weight().value[c] = T(w[c]), norm.bias().value[c] = T(b[c]);
    norm.forward(xt.matrix(), y.matrix());
    test::require_close(y, ref::layer_norm(as_double(x), N, d, as_double(w), as_double(b), 1e-4), test::tolerance<T>(),
                        test::tolerance<T>());
  }
}

TEST_CASE("RMSNorm and LayerNorm gradients match finite differences", "[transformer][norm][gradient]") {
  [[maybe_unused]] const SingleThread one_thread;
  const index_t N = 5, d = 6;
  auto x = test::random_matrix<double>(N, d, 11, 1.5);
  const auto dy = test::random_matrix<double>(N, d, 12);
  Tensor<double> y({N, d}), dx({N, d});
  auto run = [&](auto& norm) {
    randomize_parameters(norm, 0.8);
    zero_grad(norm);
    norm.forward(x.matrix(), y.matrix());
    norm.backward(dy.matrix(), dx.matrix());
    auto objective = [&] {
      norm.forward(x.matrix(), y.matrix());
      return dot(y, dy);
    };
    require_parameter_gradients(norm, objective);
    test::require_input_gradient(x, dx, objective);
  };
  SECTION("RMSNorm") {
    RMSNorm<double> norm({.d_model = d, .eps = 1e-3});
    run(norm);
  }
  SECTION("LayerNorm") {
    LayerNorm<double> norm({.d_model = d, .eps = 1e-3});
    run(norm);
  }
}

TEST_CASE("norm backward in float agrees with double; empty input is a no-op", "[transformer][norm]") {
  const index_t N = 70, d = 9;
  const auto x = test::random_matrix<double>(N, d, 21), dy = test::random_matrix<double>(N, d, 22);
  auto compare = [&](auto& dnorm, auto& fnorm) {
    randomize_parameters(dnorm, 0.7);
    copy_parameters(dnorm, fnorm);
    Tensor<double> y({N, d}), dx({N, d});
    Tensor<float> yf({N, d}), dxf({N, d});
    dnorm.forward(x.matrix(), y.matrix());
    dnorm.backward(dy.matrix(), dx.matrix());
    const auto xf = from_double<float>(x), dyf = from_double<float>(dy);
    fnorm.forward(xf.matrix(), yf.matrix());
    fnorm.backward(dyf.matrix(), dxf.matrix());
    test::require_close(dxf, dx, 1e-4, 1e-4, "dx");
    test::require_close(flatten_grads<float>(fnorm), flatten_grads<double>(dnorm), 1e-4, 1e-3, "grads");
    Tensor<float> empty({0, d});
    fnorm.forward(empty.matrix(), empty.matrix());
    fnorm.backward(empty.matrix(), empty.matrix());
  };
  SECTION("RMSNorm") {
    RMSNorm<double> a({.d_model = d});
    RMSNorm<float> b({.d_model = d});
    compare(a, b);
  }
  SECTION("LayerNorm") {
    LayerNorm<double> a({.d_model = d});
    LayerNorm<float> b({.d_model = d});
    compare(a, b);
  }
}

// ============================================================================================
// Rotary embedding and attention
// ============================================================================================

TEST_CASE("RoPE pairs dimension i with i + d_head/2 (half-split) and inverts exactly", "[transformer][rope]") {
  RotaryTable<double> rope;
  rope.build(4, 10000, 1, 2);  // positions 1 and 2
  double v[4] = {1, 2, 3, 4};
  rope.rotate(v, 0);  // position 1: θ_0 = 1, θ_1 = 10000^(-1/2) = 0.01
  CHECK(v[0] == Approx(1 * std::cos(1.0) - 3 * std::sin(1.0)).epsilon(1e-14));
  CHECK(v[2] == Approx(3 * std::cos(1.0) + 1 * std::sin(1.0)).epsilon(1e-14));
  CHECK(v[1] == Approx(2 * std::cos(0.01) - 4 * std::sin(0.01)).epsilon(1e-14));
  CHECK(v[3] == Approx(4 * std::cos(0.01) + 2 * std::sin(0.01)).epsilon(1e-14));
  rope.rotate_back(v, 0);
  CHECK(v[0] == Approx(1).epsilon(1e-14));
  CHECK(v[1] == Approx(2).epsilon(1e-14));
  CHECK(v[2] == Approx(3).epsilon(1e-14));
  CHECK(v[3] == Approx(4).epsilon(1e-14));
  double w[4] = {1, 0, 0, 0};
  rope.rotate(w, 1);  // position 2: angle 2 on the first pair
  CHECK(w[0] == Approx(std::cos(2.0)).epsilon(1e-14));
  CHECK(w[2] == Approx(std::sin(2.0)).epsilon(1e-14));
  REQUIRE_THROWS_WITH(rope.build(5, 10000, 0, 3), Catch::Contains("d_head must be even"));
}

TEMPLATE_TEST_CASE("blocked causal attention matches the naive O(L^2) reference", "[transformer][attention]", float,
                   double) {
  using T = TestType;
  for (const AttnCase& k : attention_cases) {
    INFO(k.what);
    CausalSelfAttention<double> layer(k.config());
    randomize_parameters(layer, 0.5, 40);
    CausalSelfAttention<T> layer_t(k.config());
    copy_parameters(layer, layer_t);
    const index_t N = k.B * k.L;
    const auto x = test::random_matrix<double>(N, k.d, 41);
    const auto expected = ref::attention(k.spec(), as_double(x), as_double(layer.qkv_weight().value),
                                         as_double(layer.out_weight().value));
    const auto xt = from_double<T>(x);
    Tensor<T> y({N, k.d});
    layer_t.forward(xt.matrix(), y.matrix(), k.B, k.offset);
    const double tol = sizeof(T) == 8 ? 1e-12 : 2e-5;
    test::require_close(y, expected, tol, tol, k.what);
  }
}

TEST_CASE("attention gradients match finite differences for every parameter and the input",
          "[transformer][attention][gradient]") {
  [[maybe_unused]] const SingleThread one_thread;
  for (const AttnCase& k : attention_cases) {
    INFO(k.what);
    CausalSelfAttention<double> layer(k.config());
    randomize_parameters(layer, 0.5, 50);
    const index_t N = k.B * k.L;
    auto x = test::random_matrix<double>(N, k.d, 51);
    const auto dy = test::random_matrix<double>(N, k.d, 52);
    Tensor<double> y({N, k.d}), dx({N, k.d});
    zero_grad(layer);
    layer.forward(x.matrix(), y.matrix(), k.B, k.offset);
    layer.backward(dy.matrix(), dx.matrix());
    auto objective = [&] {
      layer.forward(x.matrix(), y.matrix(), k.B, k.offset);
      return dot(y, dy);
    };
    require_parameter_gradients(layer, objective);
    test::require_input_gradient(x, dx, objective);
  }
}

TEST_CASE("attention backward in float agrees with double", "[transformer][attention]") {
  const AttnCase k{"float vs double", 2, 37, 16, 4, 2, 4, 8, true, 5};
  CausalSelfAttention<double> ld(k.config());
  randomize_parameters(ld, 0.3, 60);
  CausalSelfAttention<float> lf(k.config());
  copy_parameters(ld, lf);
  const index_t N = k.B * k.L;
  const auto x = test::random_matrix<double>(N, k.d, 61), dy = test::random_matrix<double>(N, k.d, 62);
  Tensor<double> y({N, k.d}), dx({N, k.d});
  Tensor<float> yf({N, k.d}), dxf({N, k.d});
  ld.forward(x.matrix(), y.matrix(), k.B, k.offset);
  ld.backward(dy.matrix(), dx.matrix());
  const auto xf = from_double<float>(x), dyf = from_double<float>(dy);
  lf.forward(xf.matrix(), yf.matrix(), k.B, k.offset);
  lf.backward(dyf.matrix(), dxf.matrix());
  test::require_close(yf, y, 1e-4, 1e-5, "y");
  test::require_close(dxf, dx, 1e-4, 1e-4, "dx");
  test::require_close(flatten_grads<float>(lf), flatten_grads<double>(ld), 1e-4, 1e-3, "grads");
  test::require_close(lf.log_sum_exp(), ld.log_sum_exp(), 1e-5, 1e-5, "lse");
}

TEST_CASE("RoPE makes attention depend on relative positions only", "[transformer][attention][rope]") {
  const AttnCase k{"offset", 2, 11, 8, 2, 1, 4, 4};
  CausalSelfAttention<double> layer(k.config());
  randomize_parameters(layer, 0.6, 70);
  const index_t N = k.B * k.L;
  const auto x = test::random_matrix<double>(N, k.d, 71);
  Tensor<double> y0({N, k.d}), y9({N, k.d});
  layer.forward(x.matrix(), y0.matrix(), k.B, 0);
  layer.forward(x.matrix(), y9.matrix(), k.B, 9);
  test::require_close(y9, y0, 1e-10, 1e-10, "offset 9 vs 0");
  // ... while the rotation itself is not the identity: with another base the output changes.
  AttnCase other = k;
  other.base = 100;
  CausalSelfAttention<double> layer2(other.config());
  copy_parameters(layer, layer2);
  Tensor<double> yb({N, k.d});
  layer2.forward(x.matrix(), yb.matrix(), k.B, 0);
  double diff = 0;
  for (index_t i = 0; i < N * k.d; ++i) diff = std::max(diff, std::abs(yb[i] - y0[i]));
  CHECK(diff > 1e-3);
}

TEST_CASE("attention accounting", "[transformer][attention][accounting]") {
  CausalSelfAttention<float> layer({.d_model = 16, .heads = 4, .kv_heads = 2});
  REQUIRE(layer.head_dim() == 4);
  REQUIRE(layer.kv_heads() == 2);
  const double qkv = 16.0 * (4 + 2 * 2) * 4, out = 4.0 * 4 * 16;
  CHECK(layer.total_parameters() == index_t(qkv + out));
  CHECK(parameter_count(layer) == layer.total_parameters());
  CHECK(layer.active_parameters_per_token() == qkv + out);
  CHECK(layer.flops_per_token() == 2 * (qkv + out));
  // causal: (L + 1)/2 keys on average, 2·H·d_head each for q·k and for p·v
  CHECK(layer.flops_per_token(1) == 2 * (qkv + out) + 4.0 * 16 * 1);
  CHECK(layer.flops_per_token(1024) == 2 * (qkv + out) + 4.0 * 16 * 1025 / 2);
  Tensor<float> empty({0, 16});
  layer.forward(empty.matrix(), empty.matrix(), 3);
  layer.backward(empty.matrix(), empty.matrix());
  REQUIRE_THROWS_WITH(layer.flops_per_token(0), Catch::Contains("context must be >= 1, got 0"));
}

// ============================================================================================
// Embedding, output projection, cross-entropy
// ============================================================================================

TEMPLATE_TEST_CASE("embedding forward and backward match the naive reference, int32 and int64 ids",
                   "[transformer][embedding]", float, double) {
  using T = TestType;
  const index_t V = 300, d = 5, N = 200;
  Embedding<T> embed({.vocab = V, .d_model = d});
  randomize_parameters(embed, 1.0, 80);
  std::vector<std::int32_t> ids32(N);
  for (index_t t = 0; t < N; ++t) ids32[t] = std::int32_t(uniform01(81, std::uint64_t(t)) * 40) * 7 % V;  // repeats
  const std::vector<std::int64_t> ids64(ids32.begin(), ids32.end());
  const auto dy = from_double<T>(test::random_matrix<double>(N, d, 82));
  Tensor<T> y({N, d});
  std::vector<double> expected_grad(std::size_t(V * d), 0.0);
  for (index_t t = 0; t < N; ++t)
    for (index_t c = 0; c < d; ++c) expected_grad[ids32[t] * d + c] += double(dy[t * d + c]);
  for (int width : {32, 64}) {
    INFO("id width " << width);
    zero_grad(embed);
    if (width == 32)
      embed.forward(ids32, y.matrix());
    else
      embed.forward(ids64, y.matrix());
    for (index_t t = 0; t < N; ++t)
      for (index_t c = 0; c < d; ++c) REQUIRE(y[t * d + c] == embed.weight().value[ids32[t] * d + c]);
    embed.backward(dy.matrix());
    test::require_close(embed.weight().grad, expected_grad, test::tolerance<T>(), test::tolerance<T>(), "dW");
  }
  CHECK(embed.total_parameters() == V * d);
  CHECK(embed.active_parameters_per_token() == double(d));
  CHECK(embed.flops_per_token() == 0.0);
}

TEST_CASE("output projection: logits, finite-difference gradients, float vs double", "[transformer][head]") {
  [[maybe_unused]] const SingleThread one_thread;
  const index_t V = 11, d = 6, N = 7;
  OutputProjection<double> head({.vocab = V, .d_model = d});
  randomize_parameters(head, 0.7, 90);
  auto x = test::random_matrix<double>(N, d, 91);
  const auto dl = test::random_matrix<double>(N, V, 92);
  Tensor<double> logits({N, V}), dx({N, d});
  head.forward(x.matrix(), logits.matrix());
  // logits = x · Wᵀ
  const auto& w = head.weight().value;
  for (index_t t = 0; t < N; ++t)
    for (index_t v = 0; v < V; ++v) {
      double s = 0;
      for (index_t c = 0; c < d; ++c) s += x[t * d + c] * w[v * d + c];
      REQUIRE(logits[t * V + v] == Approx(s).epsilon(1e-13).margin(1e-13));
    }
  zero_grad(head);
  head.backward(dl.matrix(), dx.matrix());
  auto objective = [&] {
    head.forward(x.matrix(), logits.matrix());
    return dot(logits, dl);
  };
  require_parameter_gradients(head, objective);
  test::require_input_gradient(x, dx, objective);

  OutputProjection<float> headf({.vocab = V, .d_model = d});
  copy_parameters(head, headf);
  Tensor<float> lf({N, V}), dxf({N, d});
  const auto xf = from_double<float>(x), dlf = from_double<float>(dl);
  headf.forward(xf.matrix(), lf.matrix());
  headf.backward(dlf.matrix(), dxf.matrix());
  head.forward(x.matrix(), logits.matrix());
  test::require_close(lf, logits, 1e-5, 1e-5, "logits");
  test::require_close(dxf, dx, 1e-5, 1e-5, "dx");
  zero_grad(head);
  head.backward(dl.matrix(), dx.matrix());
  test::require_close(headf.weight().grad, head.weight().grad, 1e-5, 1e-5, "dW");
  CHECK(head.total_parameters() == V * d);
  CHECK(head.flops_per_token() == 2.0 * V * d);
}

namespace {
// A minimal composite as a model would hold them: "embed." and a tied "head.".
struct TiedLM {
  Embedding<double> embed;
  OutputProjection<double> head;
  explicit TiedLM(index_t V, index_t d) : embed({.vocab = V, .d_model = d}), head(OutputProjection<double>::tied_to(embed)) {}
  template <class F>
  void for_each_parameter(F&& f) {
    embed.for_each_parameter(with_prefix("embed.", f));
    head.for_each_parameter(with_prefix("head.", f));
  }
};
}  // namespace

TEST_CASE("a tied head shares the embedding's weight: visited once, both gradients in it", "[transformer][head]") {
  [[maybe_unused]] const SingleThread one_thread;
  const index_t V = 9, d = 4, N = 6;
  TiedLM lm(V, d);
  randomize_parameters(lm, 0.8, 95);
  REQUIRE(lm.head.tied());
  CHECK(&lm.head.weight() == &lm.embed.weight());
  std::vector<std::string> names;
  lm.for_each_parameter([&](std::string_view n, auto&) { names.emplace_back(n); });
  CHECK(names == std::vector<std::string>{"embed.weight"});
  CHECK(lm.head.total_parameters() == 0);
  CHECK(lm.head.active_parameters_per_token() == double(V * d));

  const std::vector<std::int32_t> ids = {3, 0, 3, 8, 5, 3};
  const auto dl = test::random_matrix<double>(N, V, 96);
  Tensor<double> h({N, d}), logits({N, V}), dh({N, d});
  auto objective = [&] {
    lm.embed.forward(ids, h.matrix());
    lm.head.forward(h.matrix(), logits.matrix());
    return dot(logits, dl);  // quadratic in the shared weight
  };
  zero_grad(lm);
  objective();
  lm.head.backward(dl.matrix(), dh.matrix());
  lm.embed.backward(dh.matrix());
  require_parameter_gradients(lm, objective);

  // An untied head owns "weight" of its own.
  OutputProjection<double> own({.vocab = V, .d_model = d});
  CHECK(!own.tied());
  names.clear();
  own.for_each_parameter([&](std::string_view n, auto&) { names.emplace_back(n); });
  CHECK(names == std::vector<std::string>{"weight"});
}

TEMPLATE_TEST_CASE("softmax cross-entropy matches the reference, ignores, and is stable", "[transformer][loss]", float,
                   double) {
  using T = TestType;
  const index_t N = 37, V = 13;
  const auto z = test::random_matrix<double>(N, V, 100, 3.0);
  std::vector<std::int64_t> y(N);
  std::vector<long> yl(N);
  for (index_t t = 0; t < N; ++t) y[t] = yl[t] = t % 5 == 2 ? -100 : std::int64_t(uniform01(101, std::uint64_t(t)) * V);
  std::vector<double> expected_grad;
  const double expected = ref::cross_entropy(as_double(z), N, V, yl, -100, &expected_grad);
  SoftmaxCrossEntropy<T> loss;
  const auto zt = from_double<T>(z);
  CHECK(double(loss.forward(zt.matrix(), y)) == Approx(expected).epsilon(test::tolerance<T>()));
  CHECK(loss.counted() == N - 7);  // t = 2, 7, ..., 32: 7 ignored
  Tensor<T> g({N, V});
  loss.backward(zt.matrix(), g.matrix());
  test::require_close(g, expected_grad, test::tolerance<T>(), test::tolerance<T>(), "dlogits");

  SECTION("in place and scaled") {
    auto inplace = zt;
    loss.backward(inplace.matrix(), inplace.matrix(), T(2));
    for (index_t i = 0; i < g.size(); ++i) REQUIRE(inplace[i] == Approx(2 * double(g[i])).epsilon(1e-6).margin(1e-12));
  }
  SECTION("shifted logits (1e4): same loss, finite gradient") {
    auto shifted = zt;
    for (index_t i = 0; i < shifted.size(); ++i) shifted[i] += T(1e4);
    const double l = double(loss.forward(shifted.matrix(), y));
    // float: the shift itself rounds each logit by up to half an ulp of 1e4 (~5e-4)
    CHECK(l == Approx(expected).epsilon(sizeof(T) == 8 ? 1e-10 : 2e-3));
    loss.backward(shifted.matrix(), g.matrix());
    for (index_t i = 0; i < g.size(); ++i) REQUIRE(std::isfinite(double(g[i])));
  }
  SECTION("int32 targets, none ignored") {
    std::vector<std::int32_t> y32(N);
    std::vector<long> all(N);
    for (index_t t = 0; t < N; ++t) y32[t] = all[t] = std::int32_t(t % V);
    CHECK(double(loss.forward(zt.matrix(), y32)) ==
          Approx(ref::cross_entropy(as_double(z), N, V, all, -100)).epsilon(test::tolerance<T>()));
    CHECK(loss.counted() == N);
  }
  SECTION("all ignored: loss 0, gradient 0") {
    const std::vector<std::int64_t> none(N, -1);
    SoftmaxCrossEntropy<T> masked({.ignore_index = -1});
    CHECK(masked.forward(zt.matrix(), none) == T(0));
    masked.backward(zt.matrix(), g.matrix());
    for (index_t i = 0; i < g.size(); ++i) REQUIRE(g[i] == T(0));
  }
}

TEST_CASE("cross-entropy gradient matches finite differences", "[transformer][loss][gradient]") {
  [[maybe_unused]] const SingleThread one_thread;
  const index_t N = 6, V = 5;
  auto z = test::random_matrix<double>(N, V, 110, 2.0);
  const std::vector<std::int32_t> y = {0, 4, -100, 2, 2, 1};
  SoftmaxCrossEntropy<double> loss;
  loss.forward(z.matrix(), y);
  Tensor<double> g({N, V});
  loss.backward(z.matrix(), g.matrix());
  test::require_input_gradient(z, g, [&] { return double(loss.forward(z.matrix(), y)); });
}

TEST_CASE("transformer layers: accounting of norms, embedding, head and loss", "[transformer][accounting]") {
  CHECK(RMSNorm<float>({.d_model = 8}).total_parameters() == 8);
  CHECK(LayerNorm<float>({.d_model = 8}).total_parameters() == 16);
  CHECK(LayerNorm<float>({.d_model = 8}).active_parameters_per_token() == 16.0);
  CHECK(RMSNorm<float>({.d_model = 8}).flops_per_token() == 0.0);
  CHECK(SoftmaxCrossEntropy<float>().total_parameters() == 0);
  Embedding<float> e({.vocab = 10, .d_model = 3});
  CHECK(parameter_count(e) == e.total_parameters());
}

// ============================================================================================
// Determinism, bad input, memory
// ============================================================================================

#if defined(_OPENMP)
TEST_CASE("transformer layers give bitwise identical results for 1 and 2 threads", "[transformer][determinism]") {
  const index_t B = 2, L = 150, d = 32, N = B * L, V = 300;
  CausalSelfAttention<float> attn({.d_model = d, .heads = 4, .kv_heads = 2, .block = 32});
  RMSNorm<float> rms({.d_model = d});
  LayerNorm<float> ln({.d_model = d});
  Embedding<float> embed({.vocab = V, .d_model = d});
  OutputProjection<float> head({.vocab = V, .d_model = d});
  SoftmaxCrossEntropy<float> loss;
  randomize_parameters(attn, 0.2, 120);
  randomize_parameters(rms, 1.0, 121);
  randomize_parameters(ln, 1.0, 122);
  randomize_parameters(embed, 1.0, 123);
  randomize_parameters(head, 0.2, 124);
  std::vector<std::int32_t> ids(N), targets(N);
  for (index_t t = 0; t < N; ++t) {
    ids[t] = std::int32_t(uniform01(125, std::uint64_t(t)) * 50);  // many repeats
    targets[t] = std::int32_t(uniform01(126, std::uint64_t(t)) * V);
  }
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    zero_grad(attn), zero_grad(rms), zero_grad(ln), zero_grad(embed), zero_grad(head);
    Tensor<float> h0({N, d}), h1({N, d}), h2({N, d}), h3({N, d}), logits({N, V});
    Tensor<float> g3({N, d}), g2({N, d}), g1({N, d}), g0({N, d});
    embed.forward(ids, h0.matrix());
    rms.forward(h0.matrix(), h1.matrix());
    attn.forward(h1.matrix(), h2.matrix(), B);
    ln.forward(h2.matrix(), h3.matrix());
    head.forward(h3.matrix(), logits.matrix());
    const float l = loss.forward(logits.matrix(), targets);
    loss.backward(logits.matrix(), logits.matrix());
    head.backward(logits.matrix(), g3.matrix());
    ln.backward(g3.matrix(), g2.matrix());
    attn.backward(g2.matrix(), g1.matrix());
    rms.backward(g1.matrix(), g0.matrix());
    embed.backward(g0.matrix());
    std::vector<float> all = {l};
    for (auto* t : {&h2, &h3, &g1, &g0}) all.insert(all.end(), t->data(), t->data() + t->size());
    for (auto v : {flatten_grads<float>(attn), flatten_grads<float>(rms), flatten_grads<float>(ln),
                   flatten_grads<float>(embed), flatten_grads<float>(head)})
      all.insert(all.end(), v.begin(), v.end());
    return all;
  };
  const auto one = run(1), two = run(2);
  omp_set_num_threads(omp_get_num_procs());
  REQUIRE(one.size() == two.size());
  CHECK(one == two);
}
#endif

TEST_CASE("transformer layers reject bad input with smoe::error naming the argument", "[transformer][errors]") {
  using Attn = CausalSelfAttention<float>;
  SECTION("attention config") {
    REQUIRE_THROWS_AS(Attn({.d_model = 8, .heads = 4, .kv_heads = 3}), smoe::error);
    REQUIRE_THROWS_WITH(Attn({.d_model = 8, .heads = 4, .kv_heads = 3}), Catch::Contains("kv_heads must divide heads = 4, got 3"));
    REQUIRE_THROWS_WITH(Attn({.d_model = 10, .heads = 2}), Catch::Contains("head_dim must be even for RoPE, got 5"));
    REQUIRE_THROWS_WITH(Attn({.d_model = 8, .heads = 1, .head_dim = 3}), Catch::Contains("head_dim must be even for RoPE, got 3"));
    REQUIRE_NOTHROW(Attn({.d_model = 8, .heads = 1, .head_dim = 3, .rope = false}));
    REQUIRE_THROWS_WITH(Attn({.d_model = 10, .heads = 3}), Catch::Contains("heads to divide d_model = 10, got heads = 3"));
    REQUIRE_THROWS_WITH(Attn({.d_model = 0, .heads = 1}), Catch::Contains("d_model must be >= 1, got 0"));
    REQUIRE_THROWS_WITH(Attn({.d_model = 8, .heads = 0}), Catch::Contains("heads must be >= 1, got 0"));
    REQUIRE_THROWS_WITH(Attn({.d_model = 8, .heads = 2, .block = 0}), Catch::Contains("block must be >= 1, got 0"));
    REQUIRE_THROWS_WITH(Attn({.d_model = 8, .heads = 2, .rope_base = -1}), Catch::Contains("rope_base must be finite and > 0"));
  }
  SECTION("attention shapes") {
    Attn layer({.d_model = 8, .heads = 2});
    Tensor<float> x({6, 8}), y({6, 8}), bad({6, 7}), dy7({7, 8});
    REQUIRE_THROWS_WITH(layer.backward(y.matrix(), x.matrix()), Catch::Contains("before forward"));
    REQUIRE_THROWS_WITH(layer.forward(bad.matrix(), y.matrix(), 2), Catch::Contains("x must be [6, 8], got [6, 7]"));
    REQUIRE_THROWS_WITH(layer.forward(x.matrix(), bad.matrix(), 2), Catch::Contains("y must be [6, 8], got [6, 7]"));
    REQUIRE_THROWS_WITH(layer.forward(x.matrix(), y.matrix(), 4), Catch::Contains("multiple of sequences = 4, got 6"));
    REQUIRE_THROWS_WITH(layer.forward(x.matrix(), y.matrix(), 0), Catch::Contains("sequences must be >= 1, got 0"));
    REQUIRE_THROWS_WITH(layer.forward(x.matrix(), y.matrix(), 2, -1), Catch::Contains("position_offset must be >= 0, got -1"));
    x.zero();
    layer.forward(x.matrix(), y.matrix(), 3);
    REQUIRE_THROWS_WITH(layer.backward(dy7.matrix(), x.matrix()), Catch::Contains("dy must be [6, 8], got [7, 8]"));
    REQUIRE_THROWS_WITH(layer.backward(y.matrix(), bad.matrix()), Catch::Contains("dx must be [6, 8], got [6, 7]"));
    layer.validate_inputs = true;
    x[13] = std::numeric_limits<float>::quiet_NaN();
    REQUIRE_THROWS_WITH(layer.forward(x.matrix(), y.matrix(), 3), Catch::Contains("x row 1 is not finite"));
  }
  SECTION("norms") {
    REQUIRE_THROWS_WITH(RMSNorm<float>({.d_model = 0}), Catch::Contains("RMSNorm: d_model must be >= 1, got 0"));
    REQUIRE_THROWS_WITH(RMSNorm<float>({.d_model = 4, .eps = 0}), Catch::Contains("eps must be finite and > 0"));
    REQUIRE_THROWS_WITH(LayerNorm<float>({.d_model = 4, .eps = -1}), Catch::Contains("LayerNorm: eps must be finite and > 0"));
    RMSNorm<float> rms({.d_model = 4});
    LayerNorm<float> ln({.d_model = 4});
    Tensor<float> x({3, 4}), bad({3, 5});
    REQUIRE_THROWS_WITH(rms.backward(x.matrix(), x.matrix()), Catch::Contains("before forward"));
    REQUIRE_THROWS_WITH(ln.backward(x.matrix(), x.matrix()), Catch::Contains("before forward"));
    REQUIRE_THROWS_WITH(rms.forward(bad.matrix(), x.matrix()), Catch::Contains("x must be [3, 4], got [3, 5]"));
    REQUIRE_THROWS_WITH(ln.forward(x.matrix(), bad.matrix()), Catch::Contains("y must be [3, 4], got [3, 5]"));
  }
  SECTION("embedding ids, checked before anything is written") {
    REQUIRE_THROWS_WITH(Embedding<float>({.vocab = 0, .d_model = 4}), Catch::Contains("vocab must be >= 1, got 0"));
    Embedding<float> embed({.vocab = 10, .d_model = 2});
    Tensor<float> y({4, 2}), bad({3, 2});
    y.fill(7.0f);
    const std::vector<std::int32_t> over = {1, 2, 10, 3}, negative = {0, -1, 2, 2};
    const std::vector<std::int64_t> huge = {1, 2, 3, std::int64_t(1) << 40};
    REQUIRE_THROWS_WITH(embed.forward(over, y.matrix()), Catch::Contains("ids[2] must be in [0, 10), got 10"));
    REQUIRE_THROWS_WITH(embed.forward(negative, y.matrix()), Catch::Contains("ids[1] must be in [0, 10), got -1"));
    REQUIRE_THROWS_WITH(embed.forward(huge, y.matrix()), Catch::Contains("ids[3] must be in [0, 10), got 1099511627776"));
    for (index_t i = 0; i < y.size(); ++i) REQUIRE(y[i] == 7.0f);
    REQUIRE_THROWS_WITH(embed.backward(y.matrix()), Catch::Contains("before forward"));
    REQUIRE_THROWS_WITH(embed.forward(over, bad.matrix()), Catch::Contains("y must be [4, 2], got [3, 2]"));
    embed.forward(std::vector<std::int32_t>{1, 2, 3}, bad.matrix());
    REQUIRE_THROWS_WITH(embed.backward(y.matrix()), Catch::Contains("dy must be [3, 2], got [4, 2]"));
  }
  SECTION("output projection") {
    REQUIRE_THROWS_WITH(OutputProjection<float>({.vocab = 5, .d_model = 0}), Catch::Contains("d_model must be >= 1"));
    Embedding<float> embed({.vocab = 6, .d_model = 3});
    REQUIRE_THROWS_WITH(OutputProjection<float>({.vocab = 5, .d_model = 3}, embed.weight()),
                        Catch::Contains("tied weight must be [5, 3]"));
    OutputProjection<float> head({.vocab = 6, .d_model = 3});
    Tensor<float> x({2, 3}), logits({2, 6}), bad({2, 5});
    REQUIRE_THROWS_WITH(head.backward(logits.matrix(), x.matrix()), Catch::Contains("before forward"));
    REQUIRE_THROWS_WITH(head.forward(x.matrix(), bad.matrix()), Catch::Contains("logits must be [2, 6], got [2, 5]"));
    REQUIRE_THROWS_WITH(head.forward(bad.matrix(), logits.matrix()), Catch::Contains("x must be [2, 3], got [2, 5]"));
  }
  SECTION("cross-entropy") {
    SoftmaxCrossEntropy<float> loss;
    Tensor<float> z({3, 5}), empty({0, 5}), bad({3, 4});
    z.zero();
    REQUIRE_THROWS_WITH(loss.backward(z.matrix(), z.matrix()), Catch::Contains("before forward"));
    REQUIRE_THROWS_WITH(loss.forward(empty.matrix(), std::vector<std::int32_t>{}), Catch::Contains("logits must have at least one row"));
    REQUIRE_THROWS_WITH(loss.forward(z.matrix(), std::vector<std::int32_t>{1, 2}),
                        Catch::Contains("targets must have 3 entries (the rows of logits), got 2"));
    REQUIRE_THROWS_WITH(loss.forward(z.matrix(), std::vector<std::int32_t>{1, 7, 2}),
                        Catch::Contains("targets[1] must be in [0, 5) or ignore_index = -100, got 7"));
    REQUIRE_THROWS_WITH(loss.forward(z.matrix(), std::vector<std::int64_t>{1, 2, -3}),
                        Catch::Contains("targets[2] must be in [0, 5)"));
    loss.forward(z.matrix(), std::vector<std::int32_t>{1, 2, 3});
    REQUIRE_THROWS_WITH(loss.backward(z.matrix(), bad.matrix()), Catch::Contains("dlogits must be [3, 5], got [3, 4]"));
  }
}

TEST_CASE("blocked attention allocates no L x L buffer", "[transformer][attention][memory]") {
  // One float sequence of L = 8192 tokens, one head of d_head 16. An L×L score buffer would be
  // L²·4 bytes = 256 MiB; the bound required here is the size of the q|k|v cache,
  // L·(H + 2·H_kv)·d_head·4 bytes = 1.5 MiB, i.e. no allocation is larger than O(L·d).
#if defined(__SANITIZE_ADDRESS__)
  const index_t L = 2048;  // the same check, smaller: the sanitizer build runs every kernel ~10x slower
#else
  const index_t L = 8192;
#endif
  const index_t d = 16, dh = 16;
  CausalSelfAttention<float> layer({.d_model = d, .heads = 1, .head_dim = dh});
  randomize_parameters(layer, 0.25, 130);
  const auto x = test::random_matrix<float>(L, d, 131), dy = test::random_matrix<float>(L, d, 132);
  Tensor<float> y({L, d}), dx({L, d});
  largest_allocation = 0;
  recording = true;
  layer.forward(x.matrix(), y.matrix(), 1);
  layer.backward(dy.matrix(), dx.matrix());
  recording = false;
  const std::size_t bound = std::size_t(L) * std::size_t(layer.qkv_width()) * sizeof(float);
  INFO("largest allocation " << largest_allocation.load() << " bytes, bound " << bound << ", L*L*4 = " << L * L * 4);
  CHECK(largest_allocation.load() > 0);  // the recorder saw the caches
  CHECK(largest_allocation.load() <= bound);
  CHECK(largest_allocation.load() * 32 < std::size_t(L * L) * sizeof(float));  // 1/170 at L = 8192, 1/42 at 2048
  // The long sequence is also right: a few rows against the naive reference.
  const std::vector<int> rows = {0, 1, int(L / 2) + 3, int(L) - 1};
  const ref::Attn spec{1, int(L), int(d), 1, 1, int(dh)};
  const auto expected = ref::attention(spec, as_double(x), as_double(layer.qkv_weight().value),
                                       as_double(layer.out_weight().value), rows);
  for (int r : rows)
    for (index_t c = 0; c < d; ++c) {
      INFO("row " << r << " column " << c);
      CHECK(double(y[r * d + c]) == Approx(expected[std::size_t(r) * d + c]).epsilon(1e-4).margin(1e-5));
    }
  bool finite = true;
  for (index_t i = 0; i < dx.size(); ++i) finite = finite && std::isfinite(dx[i]);
  CHECK(finite);
}
