// cpu_kernels::gemm against a naive double-precision product, for both engines, every operand
// layout (strided or row pointers, transposed or not), the epilogues, strided views and the tile and
// block edges of the AVX-512 kernel.
#include <smoe/cpu/gemm_kernel.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "helpers.hpp"

using namespace smoe;
using cpu_kernels::GemmEngine;
using cpu_kernels::GemmEpilogue;
using cpu_kernels::Op;

namespace {

struct Case {
  index_t m, n, k;
  Op op_a, op_b;
  bool accumulate, bias, relu;
  bool rows = false;  // A given by row pointers, in a scrambled order (a gathered operand)
};

std::string describe(const Case& c, GemmEngine engine) {
  return "m " + std::to_string(c.m) + " n " + std::to_string(c.n) + " k " + std::to_string(c.k) + " op_a " +
         std::to_string(int(c.op_a)) + " op_b " + std::to_string(int(c.op_b)) + " acc " + std::to_string(c.accumulate) +
         " bias " + std::to_string(c.bias) + " relu " + std::to_string(c.relu) + " rows " + std::to_string(c.rows) +
         " engine " + std::to_string(int(engine));
}

// Values in [−1, 1] from a cheap integer hash: the cases are many and their matrices large.
template <class T>
Tensor<T> filled(index_t rows, index_t cols, std::uint64_t seed) {
  Tensor<T> t({rows, cols});
  std::uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
  for (index_t i = 0; i < t.size(); ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    t[i] = T(double(state >> 40) / double(1 << 23) - 1.0);
  }
  return t;
}

// Runs one case on views with padded strides (so a kernel that ignores the stride, or writes
// past n, fails) and compares with the naive product.
template <class T>
void run_case(const Case& c, GemmEngine engine) {
  INFO(describe(c, engine));
  const index_t a_rows = c.op_a == Op::none ? c.m : c.k, a_cols = c.op_a == Op::none ? c.k : c.m;
  const index_t b_rows = c.op_b == Op::none ? c.k : c.n, b_cols = c.op_b == Op::none ? c.n : c.k;
  const index_t lda = a_cols + 3, ldb = b_cols + 5, ldc = c.n + 7;
  auto a = filled<T>(std::max<index_t>(1, a_rows), lda, 1 + std::uint64_t(c.m * 31 + c.k));
  auto b = filled<T>(std::max<index_t>(1, b_rows), ldb, 2 + std::uint64_t(c.n * 17 + c.k));
  auto cm = filled<T>(std::max<index_t>(1, c.m), ldc, 3 + std::uint64_t(c.m + c.n));
  auto bias = filled<T>(1, std::max<index_t>(1, c.n), 4);
  const Tensor<T> before = cm;
  Tensor<T> scratch;
  const ConstMatrixView<T> bv(b.data(), b_rows, b_cols, ldb);
  const MatrixView<T> cv(cm.data(), c.m, c.n, ldc);
  const GemmEpilogue<T> ep{c.accumulate, c.bias ? bias.data() : nullptr, c.relu};
  // Row r of the stored A matrix: itself, or (row pointers) stored row `order[r]`.
  std::vector<index_t> order(static_cast<std::size_t>(a_rows));
  for (index_t r = 0; r < a_rows; ++r) order[r] = c.rows ? (r * 7 + 3) % a_rows : r;
  if (c.rows) {
    std::vector<const T*> pointers;
    for (index_t r = 0; r < a_rows; ++r) pointers.push_back(a.data() + order[r] * lda);
    cpu_kernels::gemm<T>(cpu_kernels::RowPointers<T>{pointers.data(), a_rows, a_cols}, c.op_a, bv, c.op_b, cv, ep,
                         &scratch, engine);
  } else {
    cpu_kernels::gemm<T>(ConstMatrixView<T>(a.data(), a_rows, a_cols, lda), c.op_a, bv, c.op_b, cv, ep, &scratch,
                         engine);
  }
  // Rounding of a k-term float sum grows like sqrt(k) ulps; double is far below.
  const double tol = (sizeof(T) == 4 ? 2e-6 : 1e-14) * (4.0 + std::sqrt(double(c.k)));
  index_t padding_written = 0;
  for (index_t i = 0; i < c.m; ++i)
    for (index_t j = 0; j < ldc; ++j) {
      const double got = double(cm[i * ldc + j]);
      if (j >= c.n) {  // padding past n stays untouched
        padding_written += got != double(before[i * ldc + j]);
        continue;
      }
      double want = c.accumulate ? double(before[i * ldc + j]) : 0.0, scale = std::abs(want);
      for (index_t kk = 0; kk < c.k; ++kk) {
        const double av = c.op_a == Op::none ? double(a[order[i] * lda + kk]) : double(a[order[kk] * lda + i]);
        const double bv = c.op_b == Op::none ? double(b[kk * ldb + j]) : double(b[j * ldb + kk]);
        want += av * bv;
        scale += std::abs(av * bv);
      }
      if (c.bias) want += double(bias[j]), scale += std::abs(double(bias[j]));
      if (c.relu && want < 0) want = 0;
      if (!(std::abs(got - want) <= tol * (1.0 + scale))) {
        INFO("C(" << i << ", " << j << ") = " << got << ", expected " << want);
        FAIL();
      }
    }
  CHECK(padding_written == 0);
}

std::vector<GemmEngine> engines_of(bool avx512) {
  std::vector<GemmEngine> e{GemmEngine::eigen, GemmEngine::automatic};
  if (avx512) e.push_back(GemmEngine::avx512);
  return e;
}

}  // namespace

TEMPLATE_TEST_CASE("gemm matches the naive product for every layout, epilogue and edge", "[gemm]", float, double) {
  using T = TestType;
  const bool avx512 = cpu_kernels::gemm_engine_available<T>(GemmEngine::avx512);
  if (!avx512) WARN("the avx512 engine is not available on this CPU: only the eigen engine is tested");
  // Rows around the 12-row tile and its 8/4/2/1 remainders and the 384-row block; columns around
  // one and two vectors; depth around the 192-deep k block.
  const index_t ms[] = {1, 2, 3, 5, 11, 12, 13, 25, 390};
  const index_t ns[] = {1, 7, 8, 16, 17, 31, 32, 33, 70};
  const index_t ks[] = {0, 1, 3, 16, 191, 192, 193, 400};
  int run = 0;
  for (const GemmEngine engine : engines_of(avx512))
    for (const index_t m : ms)
      for (const index_t n : ns)
        for (const index_t k : ks)
          for (int layout = 0; layout < 4; ++layout)
            for (int ep = 0; ep < 8; ++ep) {
              if ((m * 5 + n * 3 + k + layout * 11 + ep * 13) % 13 != 0) continue;  // a spread-out thirteenth
              if (m * n * k > 400000) continue;
              run_case<T>({m, n, k, Op(layout & 1), Op(layout >> 1), bool(ep & 1), bool(ep & 2), bool(ep & 4),
                           (m + n + k + ep) % 2 == 0},
                          engine);
              ++run;
            }
  CHECK(run > 150);
}

TEMPLATE_TEST_CASE("gemm: the expert shapes of a MoE layer, every layout", "[gemm]", float, double) {
  using T = TestType;
  for (const GemmEngine engine : engines_of(cpu_kernels::gemm_engine_available<T>(GemmEngine::avx512)))
    for (int layout = 0; layout < 4; ++layout) {
      run_case<T>({128, 128, 512, Op(layout & 1), Op(layout >> 1), false, false, layout == 0}, engine);
      run_case<T>({128, 128, 512, Op(layout & 1), Op(layout >> 1), false, false, layout == 0, true}, engine);
      run_case<T>({37, 512, 128, Op(layout & 1), Op(layout >> 1), true, true, false}, engine);
      run_case<T>({37, 512, 128, Op(layout & 1), Op(layout >> 1), true, true, false, true}, engine);
    }
}

TEST_CASE("gemm: relu maps NaN to 0 like the Relu activation, and the result is deterministic", "[gemm]") {
  for (const GemmEngine engine : engines_of(cpu_kernels::gemm_engine_available<float>(GemmEngine::avx512))) {
    Tensor<float> a({2, 3}), b({3, 4}), c({2, 4}), c2({2, 4}), scratch;
    a.fill(1.0f);
    b.fill(-1.0f);
    b[1] = std::nanf("");  // column 1 of both rows becomes NaN before the relu
    cpu_kernels::gemm<float>(std::as_const(a).matrix(), Op::none, std::as_const(b).matrix(), Op::none, c.matrix(),
                             {.relu = true}, &scratch, engine);
    for (index_t i = 0; i < c.size(); ++i) CHECK(c[i] == 0.0f);
    cpu_kernels::gemm<float>(std::as_const(a).matrix(), Op::none, std::as_const(b).matrix(), Op::none, c2.matrix(),
                             {.relu = true}, &scratch, engine);
    for (index_t i = 0; i < c.size(); ++i) CHECK(c[i] == c2[i]);
  }
}

TEST_CASE("gemm rejects mismatched shapes and an unavailable engine", "[gemm][errors]") {
  Tensor<float> a({4, 3}), b({5, 2}), c({4, 2}), scratch;
  a.zero();
  b.zero();
  try {
    cpu_kernels::gemm<float>(std::as_const(a).matrix(), Op::none, std::as_const(b).matrix(), Op::none, c.matrix(), {},
                             &scratch);
    FAIL("no error for inner dimensions 3 vs 5");
  } catch (const smoe::error& e) {
    CHECK(std::string(e.what()).find("shapes do not match") != std::string::npos);
  }
  // long double has no avx512 kernel: asking for it by name is an error, automatic falls back.
  Tensor<long double> al({2, 2}), bl({2, 2}), cl({2, 2});
  Tensor<long double> sl;
  al.fill(1);
  bl.fill(2);
  REQUIRE_THROWS_AS(cpu_kernels::gemm<long double>(std::as_const(al).matrix(), Op::none, std::as_const(bl).matrix(),
                                                   Op::none, cl.matrix(), {}, &sl, GemmEngine::avx512),
                    smoe::error);
  cpu_kernels::gemm<long double>(std::as_const(al).matrix(), Op::none, std::as_const(bl).matrix(), Op::none,
                                 cl.matrix(), {}, &sl);
  CHECK(double(cl[0]) == 4.0);
}
