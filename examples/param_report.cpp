// Parameter and FLOP accounting of parameter-efficient expert pools at equal active parameters:
// standard MoE, WideNet (tied experts), SaMoE (global pool, weight and output space), PR-MoE
// (pyramid + residual expert) and DeepSeekMoE (shared experts), for a GPT-style model of
// 24 layers, d = 1024 (the 350M base of DeepSpeed-MoE), E = 64.
//
// Conventions (docs/samoe.md): FLOPs count matrix products, 2 per multiply-add, forward only.
// Each layer has attention, 4·d² parameters and 8·d² FLOPs per token (projections only: no
// score/value products, no embeddings, norms or biases). MoE sits in every other layer as in
// DeepSpeed-MoE (12 MoE layers; the other 12 have the dense FFN, d_ff = 4d), unless stated.
// Experts are GELU two-layer FFNs without biases; one expert of hidden size G holds 2·d·G
// parameters. Routers are linear, E·d parameters and 2·E·d FLOPs per token.
//
// The model sizes cannot be built here (25 GB of weights), so the table comes from the formula
// functions below; at startup each formula is checked against the accounting of a real stack
// built at a small size (smoe::MoEStack with the same layer types), so the table and the library
// agree.
#include <smoe/smoe.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

using smoe::index_t;
using Act = smoe::Gelu;
using T = float;

struct Numbers {
  double total = 0, active = 0, flops = 0, materialization = 0;  // materialization: FLOPs per step
  Numbers& operator+=(const Numbers& o) {
    total += o.total, active += o.active, flops += o.flops, materialization += o.materialization;
    return *this;
  }
};

double Pe(index_t d, index_t G) { return double(smoe::expert_parameters<Act>(d, G, false)); }
double Fe(index_t d, index_t G) { return smoe::expert_flops<Act>(d, G); }
Numbers router(index_t d, index_t E) { return {double(E * d), double(E * d), 2.0 * double(E * d), 0}; }

// The MoE layers only (no attention), L layers of E experts each, top-K.
Numbers standard(index_t L, index_t d, index_t E, index_t G, index_t K) {
  Numbers n;
  for (index_t l = 0; l < L; ++l) n += router(d, E), n += {E * Pe(d, G), K * Pe(d, G), K * Fe(d, G), 0};
  return n;
}
Numbers tied(index_t L, index_t d, index_t E, index_t G, index_t K) {
  Numbers n{E * Pe(d, G), 0, 0, 0};  // the shared set, once
  for (index_t l = 0; l < L; ++l) n += router(d, E), n += {0, K * Pe(d, G), K * Fe(d, G), 0};
  return n;
}
// SaMoE over a pool of M members; r members combined per layer (weight space: r·E·P_e
// multiply-adds per layer and step to materialize W_l; output space: r experts per assignment).
Numbers samoe(bool weight_space, index_t L, index_t d, index_t E, index_t G, index_t K, index_t M, index_t r) {
  Numbers n{M * E * Pe(d, G), 0, 0, 0};
  const double per = weight_space ? 1.0 : double(r);
  for (index_t l = 0; l < L; ++l)
    n += router(d, E), n += {double(M), K * per * Pe(d, G), K * per * Fe(d, G), weight_space ? 2.0 * r * E * Pe(d, G) : 0};
  return n;
}
// PR-MoE: layer l has experts[l] experts of size G (top-K) plus a residual MLP of size Gr and the
// mixing Linear d → 2 (no bias).
Numbers pr_moe(const std::vector<index_t>& experts, index_t d, index_t G, index_t K, index_t Gr) {
  Numbers n;
  for (index_t E : experts) {
    n += router(d, E);
    n += {E * Pe(d, G), K * Pe(d, G), K * Fe(d, G), 0};
    n += {Pe(d, Gr) + 2.0 * d, Pe(d, Gr) + 2.0 * d, Fe(d, Gr) + 4.0 * d, 0};
  }
  return n;
}
// DeepSeekMoE: E routed experts of size G (top-K) plus Ns shared experts of size Gs.
Numbers deepseek(index_t L, index_t d, index_t E, index_t G, index_t K, index_t Ns, index_t Gs) {
  Numbers n = standard(L, d, E, G, K);
  for (index_t l = 0; l < L; ++l) n += {Ns * Pe(d, Gs), Ns * Pe(d, Gs), Ns * Fe(d, Gs), 0};
  return n;
}

// ---- the formulas against the library's own accounting, on stacks built at a small size ------

template <class X>
using Layer = smoe::MoE<smoe::SoftmaxTopK<T>, X>;

void expect_same(const char* what, const Numbers& formula, const smoe::ModelAccounting& library) {
  const bool ok = formula.total == double(library.total_parameters) && formula.active == library.active_parameters_per_token &&
                  formula.flops == library.flops_per_token && formula.materialization == library.materialization_flops;
  if (!ok) {
    std::fprintf(stderr, "accounting mismatch for %s: formula %.0f/%.0f/%.0f/%.0f, library %lld/%.0f/%.0f/%.0f\n", what,
                 formula.total, formula.active, formula.flops, formula.materialization,
                 static_cast<long long>(library.total_parameters), library.active_parameters_per_token,
                 library.flops_per_token, library.materialization_flops);
    std::exit(1);
  }
}

void check_formulas() {
  const index_t L = 3, d = 8, E = 4, G = 6, K = 2, M = 3;
  auto router_of = [&](index_t e, index_t k) { return smoe::SoftmaxTopK<T>({.d_model = d, .experts = e, .k = k}); };
  {
    using Y = Layer<smoe::FeedForwardExperts<T, Act>>;
    smoe::MoEStack<Y> s(L, [&](index_t) { return Y(router_of(E, K), smoe::FeedForwardExperts<T, Act>({d, E, G})); });
    expect_same("standard", standard(L, d, E, G, K), s.accounting());
  }
  {
    using Set = smoe::FeedForwardExperts<T, Act>;
    using Y = Layer<smoe::TiedExperts<T, Act>>;
    smoe::MoEStack<Y, Set> s(Set({d, E, G}), L, [&](Set& set, index_t) { return Y(router_of(E, K), smoe::TiedExperts<T, Act>(set)); });
    expect_same("tied", tied(L, d, E, G, K), s.accounting());
  }
  using Pool = smoe::ExpertPool<T, Act>;
  const smoe::ExpertPoolConfig pc{.d_model = d, .experts = E, .hidden = G, .members = M};
  {
    using X = smoe::SaMoEExperts<T, Act, smoe::WeightSpace>;
    smoe::MoEStack<Layer<X>, Pool> s(Pool(pc), L, [&](Pool& p, index_t l) { return Layer<X>(router_of(E, K), X(p, {.layer = l})); });
    expect_same("SaMoE weight space", samoe(true, L, d, E, G, K, M, M), s.accounting());
  }
  {
    using X = smoe::SaMoEExperts<T, Act, smoe::OutputSpace>;
    smoe::MoEStack<Layer<X>, Pool> s(Pool(pc), L, [&](Pool& p, index_t l) {
      return Layer<X>(router_of(E, K), X(p, {.layer = l, .top_members = 2}));
    });
    expect_same("SaMoE output space", samoe(false, L, d, E, G, K, M, 2), s.accounting());
  }
  {
    const std::vector<index_t> pyramid{2, 2, 4};
    using Y = smoe::ResidualMoE<Layer<smoe::FeedForwardExperts<T, Act>>, Act>;
    smoe::MoEStack<Y> s(L, [&](index_t l) {
      const index_t e = pyramid[static_cast<std::size_t>(l)];
      return Y(Layer<smoe::FeedForwardExperts<T, Act>>(router_of(e, 1), smoe::FeedForwardExperts<T, Act>({d, e, G})),
               {.hidden = 5});
    });
    expect_same("PR-MoE", pr_moe(pyramid, d, G, 1, 5), s.accounting());
  }
  {
    using Y = smoe::SharedExpertsMoE<Layer<smoe::FeedForwardExperts<T, Act>>, Act>;
    smoe::MoEStack<Y> s(L, [&](index_t) {
      return Y(Layer<smoe::FeedForwardExperts<T, Act>>(router_of(E, K), smoe::FeedForwardExperts<T, Act>({d, E, G})),
               {.experts = 2, .hidden = 3});
    });
    expect_same("DeepSeekMoE", deepseek(L, d, E, G, K, 2, 3), s.accounting());
  }
}

// ---- the report -------------------------------------------------------------------------------

constexpr index_t kLayers = 24, kD = 1024, kE = 64;
constexpr index_t kTokensPerStep = 256 * 2048;  // DeepSpeed-MoE's 350M runs: batch 256 × 2048 tokens

// Attention of every layer plus the dense FFN of the non-MoE layers.
Numbers backbone(index_t moe_layers) {
  const double d2 = double(kD) * double(kD);
  const double attention = 4 * d2 * kLayers, dense = (kLayers - moe_layers) * Pe(kD, 4 * kD);
  return {attention + dense, attention + dense, 2 * attention + (kLayers - moe_layers) * Fe(kD, 4 * kD), 0};
}

void print_row(const char* name, const Numbers& moe, index_t moe_layers, const Numbers& reference) {
  Numbers all = backbone(moe_layers);
  all += moe;
  const double amortized = all.flops + all.materialization / double(kTokensPerStep);
  std::printf("| %-54s | %7.3f | %6.1f | %7.2f | %7.2f | %6.2f× |\n", name, all.total / 1e9, all.active / 1e6,
              all.flops / 1e6, amortized / 1e6, reference.total / all.total);
}

}  // namespace

int main() {
  check_formulas();
  const index_t L = kLayers / 2, d = kD, E = kE, G = 4 * kD;
  const Numbers std_moe = standard(L, d, E, G, 1);
  Numbers reference = backbone(L);
  reference += std_moe;

  std::printf("24 layers, d = %lld, MoE every other layer (12 MoE layers), E = %lld; attention 4d² per layer;\n"
              "GELU experts without biases; FLOPs per token forward, 2 per multiply-add; 'amortized' adds the\n"
              "weight-space materialization over %lld tokens per step. Ratio = standard MoE total / row total.\n\n",
              static_cast<long long>(d), static_cast<long long>(E), static_cast<long long>(kTokensPerStep));
  std::printf("| configuration (active FFN width per MoE layer = 4d)    | total (10⁹) | active (10⁶) | MFLOP/token | amortized | ratio |\n");
  std::printf("|---|---:|---:|---:|---:|---:|\n");
  print_row("dense (no MoE)", {}, 0, reference);
  print_row("standard MoE-64, top-1, G = 4d", std_moe, L, reference);
  print_row("WideNet: 64 experts tied over 12 layers", tied(L, d, E, G, 1), L, reference);
  for (index_t M : {1, 2, 4, 8}) {
    const std::string name = "SaMoE weight space, M = " + std::to_string(M) + ", top-1, G = 4d";
    print_row(name.c_str(), samoe(true, L, d, E, G, 1, M, M), L, reference);
  }
  print_row("SaMoE output space, M = 4, all members (r = 4)", samoe(false, L, d, E, G, 1, 4, 4), L, reference);
  print_row("SaMoE output space, M = 4, top-1 member (r = 1)", samoe(false, L, d, E, G, 1, 4, 1), L, reference);
  std::vector<index_t> pyramid(10, 32);
  pyramid.push_back(64), pyramid.push_back(64);
  print_row("PR-MoE 32/64, top-1, G = G_r = 2d", pr_moe(pyramid, d, 2 * kD, 1, 2 * kD), L, reference);
  print_row("DeepSeekMoE: 1 shared + top-3 of 256, G = d", deepseek(L, d, 4 * E, kD, 3, 1, kD), L, reference);

  std::printf("\nTotal-parameter ratio standard MoE-64 / SaMoE (weight space; same active parameters and FLOPs):\n\n");
  std::printf("| MoE layers | standard (10⁹) | M = 1 | M = 2 | M = 4 | M = 8 | materialization, GFLOP per step (M = 8) |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|\n");
  for (index_t layers : {kLayers / 2, kLayers}) {
    Numbers s = backbone(layers);
    s += standard(layers, d, E, G, 1);
    std::printf("| %lld | %.3f |", static_cast<long long>(layers), s.total / 1e9);
    double mat = 0;
    for (index_t M : {1, 2, 4, 8}) {
      Numbers p = backbone(layers);
      p += samoe(true, layers, d, E, G, 1, M, M);
      std::printf(" %.2f× |", s.total / p.total);
      mat = p.materialization;
    }
    std::printf(" %.1f |\n", mat / 1e9);
  }
  return 0;
}
