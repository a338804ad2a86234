#pragma once
// The AVX-512 GEMM micro-kernels behind cpu_kernels::gemm (cpu/gemm_kernel.hpp); include that header.
//
//   C[m, n] = epilogue(A · B),  A [m, k] read as a[i·lda + kk] (Op::none) or a[kk·lda + i]
//   (Op::transpose), B [k, n] row-major, C row-major.
//
// Register tile: 12 rows × 2 vectors (32 floats or 16 doubles) of C in 24 zmm accumulators. Each
// step kk loads two vectors of B's row kk and broadcasts A(i, kk) for the 12 rows straight from A,
// so neither operand is packed: a gathered or transposed A costs nothing extra, and B's rows are
// read where they are (an expert's weight [d, G] is used in place). Loops: B panels of
// kc × 32 columns stay in L1 (kc = 192: 24 KiB) while the 12-row tiles of A stream past them.
// Summation order over k is fixed (kc blocks in order, kk in order inside), so results depend
// only on the shapes, never on threads.
//
// Compiled with __attribute__((target("avx512f"))) and chosen at run time (cpu_supports_avx512),
// so a default x86-64 build still uses AVX-512 where the CPU has it.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__) && \
    !defined(SMOE_NO_AVX512)
#define SMOE_HAVE_AVX512_GEMM 1
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "smoe/core/config.hpp"

#define SMOE_AVX512 __attribute__((target("avx512f"), always_inline)) inline
#define SMOE_AVX512_NOINLINE __attribute__((target("avx512f"), noinline))

namespace smoe::cpu_kernels::avx512 {

inline bool cpu_supports_avx512() {
  static const bool supported = __builtin_cpu_supports("avx512f");
  return supported;
}

template <class T>
struct Vec;

template <>
struct Vec<float> {
  using type = __m512;
  using mask = __mmask16;
  static constexpr int lanes = 16;
  static SMOE_AVX512 type zero() { return _mm512_setzero_ps(); }
  static SMOE_AVX512 type set1(float v) { return _mm512_set1_ps(v); }
  static SMOE_AVX512 type load(mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static SMOE_AVX512 void store(float* p, mask m, type v) { _mm512_mask_storeu_ps(p, m, v); }
  static SMOE_AVX512 type fma(type a, type b, type c) { return _mm512_fmadd_ps(a, b, c); }
  static SMOE_AVX512 type add(type a, type b) { return _mm512_add_ps(a, b); }
  // a > 0 ? a : 0 (NaN → 0), as Relu does; a masked move, not max: GCC 12 warns on max's undefined operand.
  static SMOE_AVX512 type relu(type a) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, zero(), _CMP_GT_OQ), a); }
};

template <>
struct Vec<double> {
  using type = __m512d;
  using mask = __mmask8;
  static constexpr int lanes = 8;
  static SMOE_AVX512 type zero() { return _mm512_setzero_pd(); }
  static SMOE_AVX512 type set1(double v) { return _mm512_set1_pd(v); }
  static SMOE_AVX512 type load(mask m, const double* p) { return _mm512_maskz_loadu_pd(m, p); }
  static SMOE_AVX512 void store(double* p, mask m, type v) { _mm512_mask_storeu_pd(p, m, v); }
  static SMOE_AVX512 type fma(type a, type b, type c) { return _mm512_fmadd_pd(a, b, c); }
  static SMOE_AVX512 type add(type a, type b) { return _mm512_add_pd(a, b); }
  static SMOE_AVX512 type relu(type a) { return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(a, zero(), _CMP_GT_OQ), a); }
};

// What the last k block does with the tile: C (+)= acc, + bias, relu.
template <class T>
struct TileEpilogue {
  bool load_c;       // add the tile's current contents (accumulate, or a later k block)
  bool last;         // last k block: bias and relu apply
  const T* bias;     // [n] at this tile's first column, or null
  bool relu;
};

#define SMOE_TILE_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

// One MR × 2-vector tile over kc steps. Named accumulators (not arrays): GCC keeps arrays of
// vectors in memory across the loop.
template <class T, int MR, bool TransA>
SMOE_AVX512_NOINLINE void tile(index_t kc, const T* a, index_t lda, const T* b, index_t ldb, T* c, index_t ldc,
                               typename Vec<T>::mask m0, typename Vec<T>::mask m1, TileEpilogue<T> ep) {
  using V = Vec<T>;
  using v = typename V::type;
  constexpr int L = V::lanes;
#define SMOE_TILE_DECL(i) v c##i##0 = V::zero(), c##i##1 = V::zero();
  SMOE_TILE_ROWS(SMOE_TILE_DECL)
#undef SMOE_TILE_DECL
  // Op::none: rows i of A at p0 / p4 / p8 + {0, 1, 2, 3}·lda, advancing one element per step, so
  // the 12 broadcasts need five registers. Op::transpose: the 12 values are adjacent.
  const T* p0 = a;
  const T* p4 = a + (TransA ? 4 : 4 * lda);
  const T* p8 = a + (TransA ? 8 : 8 * lda);
  const index_t s1 = TransA ? 1 : lda, s3 = 3 * s1, step = TransA ? lda : 1;
  for (index_t kk = 0; kk < kc; ++kk) {
    const v b0 = V::load(m0, b), b1 = V::load(m1, b + L);
    b += ldb;
#define SMOE_TILE_FMA(i)                                                                   \
  if constexpr (MR > i) {                                                                  \
    const T* row = i < 4 ? p0 : (i < 8 ? p4 : p8);                                         \
    const v av = V::set1(row[(i % 4) == 0 ? 0 : (i % 4) == 1 ? s1 : (i % 4) == 2 ? 2 * s1 : s3]); \
    c##i##0 = V::fma(av, b0, c##i##0);                                                     \
    c##i##1 = V::fma(av, b1, c##i##1);                                                     \
  }
    SMOE_TILE_ROWS(SMOE_TILE_FMA)
#undef SMOE_TILE_FMA
    p0 += step;
    p4 += step;
    p8 += step;
  }
  v bias0 = V::zero(), bias1 = V::zero();
  const bool with_bias = ep.last && ep.bias != nullptr;
  if (with_bias) {
    bias0 = V::load(m0, ep.bias);
    bias1 = V::load(m1, ep.bias + L);
  }
  const bool relu = ep.last && ep.relu;
#define SMOE_TILE_STORE(i)                                      \
  if constexpr (MR > i) {                                       \
    T* ci = c + i * ldc;                                        \
    if (ep.load_c) {                                            \
      c##i##0 = V::add(c##i##0, V::load(m0, ci));               \
      c##i##1 = V::add(c##i##1, V::load(m1, ci + L));           \
    }                                                           \
    if (with_bias) {                                            \
      c##i##0 = V::add(c##i##0, bias0);                         \
      c##i##1 = V::add(c##i##1, bias1);                         \
    }                                                           \
    if (relu) {                                                 \
      c##i##0 = V::relu(c##i##0);                               \
      c##i##1 = V::relu(c##i##1);                               \
    }                                                           \
    V::store(ci, m0, c##i##0);                                  \
    V::store(ci + L, m1, c##i##1);                              \
  }
  SMOE_TILE_ROWS(SMOE_TILE_STORE)
#undef SMOE_TILE_STORE
}

#undef SMOE_TILE_ROWS

template <class T, bool TransA>
SMOE_AVX512 void tile_rows(index_t rows, index_t kc, const T* a, index_t lda, const T* b, index_t ldb, T* c,
                           index_t ldc, typename Vec<T>::mask m0, typename Vec<T>::mask m1, TileEpilogue<T> ep) {
  // A short tile as 8 + 2 + 1 rows and the like: five kernels instead of twelve.
  const index_t row_step = TransA ? 1 : lda;
  while (rows > 0) {
    const index_t r = rows >= 12 ? 12 : rows >= 8 ? 8 : rows >= 4 ? 4 : rows >= 2 ? 2 : 1;
    switch (r) {
      case 12: tile<T, 12, TransA>(kc, a, lda, b, ldb, c, ldc, m0, m1, ep); break;
      case 8: tile<T, 8, TransA>(kc, a, lda, b, ldb, c, ldc, m0, m1, ep); break;
      case 4: tile<T, 4, TransA>(kc, a, lda, b, ldb, c, ldc, m0, m1, ep); break;
      case 2: tile<T, 2, TransA>(kc, a, lda, b, ldb, c, ldc, m0, m1, ep); break;
      default: tile<T, 1, TransA>(kc, a, lda, b, ldb, c, ldc, m0, m1, ep); break;
    }
    rows -= r;
    a += r * row_step;
    c += r * ldc;
  }
}

// C [m, n] (+)= A · B (+ bias, relu). B is row-major [k, n] with row stride ldb.
template <class T, bool TransA>
SMOE_AVX512_NOINLINE void gemm(index_t m, index_t n, index_t k, const T* a, index_t lda, const T* b, index_t ldb,
                               T* c, index_t ldc, bool accumulate, const T* bias, bool relu) {
  using V = Vec<T>;
  using mask = typename V::mask;
  constexpr index_t L = V::lanes, NR = 2 * L, KC = 192, MC = 384;
  auto lane_mask = [](index_t count) -> mask {
    return count >= L ? mask(~mask(0)) : count <= 0 ? mask(0) : mask((mask(1) << count) - 1);
  };
  if (k == 0) {  // C = bias (or C + bias), relu: the product is empty
    for (index_t i = 0; i < m; ++i)
      for (index_t j = 0; j < n; ++j) {
        T value = (accumulate ? c[i * ldc + j] : T(0)) + (bias ? bias[j] : T(0));
        c[i * ldc + j] = relu && value < T(0) ? T(0) : value;
      }
    return;
  }
  for (index_t i0 = 0; i0 < m; i0 += MC) {
    const index_t mc = std::min(MC, m - i0);
    for (index_t j0 = 0; j0 < n; j0 += NR) {
      const index_t nr = std::min(NR, n - j0);
      const mask m0 = lane_mask(nr), m1 = lane_mask(nr - L);
      for (index_t k0 = 0; k0 < k; k0 += KC) {
        const index_t kc = std::min(KC, k - k0);
        const TileEpilogue<T> ep{accumulate || k0 > 0, k0 + kc == k, bias ? bias + j0 : nullptr, relu};
        const T* ak = TransA ? a + k0 * lda + i0 : a + i0 * lda + k0;
        // While this B panel serves the row tiles from L1, fetch the next one (the next k block,
        // or the next columns) a slice per tile: B comes from memory once and is not packed.
        const bool next_k = k0 + KC < k;
        const T* next = next_k ? b + (k0 + KC) * ldb + j0 : b + j0 + NR;
        const index_t next_rows = next_k ? std::min(KC, k - k0 - KC) : (j0 + NR < n ? std::min(KC, k) : 0);
        const index_t tiles = (mc + 11) / 12, per_tile = (next_rows + tiles - 1) / tiles;
        for (index_t t = 0, r = 0; t < mc; t += 12) {
          for (const index_t stop = std::min(next_rows, r + per_tile); r < stop; ++r) {
            _mm_prefetch(reinterpret_cast<const char*>(next + r * ldb), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(next + r * ldb + L), _MM_HINT_T0);
          }
          if (ep.load_c)  // the next tile's C rows, which it adds to
            for (index_t i = t + 12; i < std::min(mc, t + 24); ++i) {
              _mm_prefetch(reinterpret_cast<const char*>(c + (i0 + i) * ldc + j0), _MM_HINT_T0);
              _mm_prefetch(reinterpret_cast<const char*>(c + (i0 + i) * ldc + j0 + L), _MM_HINT_T0);
            }
          const index_t rows = std::min<index_t>(12, mc - t);
          tile_rows<T, TransA>(rows, kc, ak + t * (TransA ? 1 : lda), lda, b + k0 * ldb + j0, ldb,
                               c + (i0 + t) * ldc + j0, ldc, m0, m1, ep);
        }
      }
    }
  }
}

// out [cols, rows] = in [rows, cols]ᵀ, in 16 × 16 (float) or 8 × 8 (double) register blocks.
// Named registers rather than arrays (GCC keeps arrays of vectors on the stack), and the
// all-lanes maskz forms of the shuffles: the plain ones trip GCC 12's -Wmaybe-uninitialized.
SMOE_AVX512 __m512 unpacklo32(__m512 a, __m512 b) { return _mm512_maskz_unpacklo_ps(0xFFFF, a, b); }
SMOE_AVX512 __m512 unpackhi32(__m512 a, __m512 b) { return _mm512_maskz_unpackhi_ps(0xFFFF, a, b); }
SMOE_AVX512 __m512 unpacklo64(__m512 a, __m512 b) {
  return _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(0xFF, _mm512_castps_pd(a), _mm512_castps_pd(b)));
}
SMOE_AVX512 __m512 unpackhi64(__m512 a, __m512 b) {
  return _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(0xFF, _mm512_castps_pd(a), _mm512_castps_pd(b)));
}
// Lanes (128-bit) 0, 2 of a then 0, 2 of b (even) or 1, 3 of a then 1, 3 of b (odd).
SMOE_AVX512 __m512 even_lanes(__m512 a, __m512 b) { return _mm512_maskz_shuffle_f32x4(0xFFFF, a, b, 0x88); }
SMOE_AVX512 __m512 odd_lanes(__m512 a, __m512 b) { return _mm512_maskz_shuffle_f32x4(0xFFFF, a, b, 0xDD); }
SMOE_AVX512 __m512d even_lanes(__m512d a, __m512d b) { return _mm512_maskz_shuffle_f64x2(0xFF, a, b, 0x88); }
SMOE_AVX512 __m512d odd_lanes(__m512d a, __m512d b) { return _mm512_maskz_shuffle_f64x2(0xFF, a, b, 0xDD); }

// Four rows → within each 128-bit lane l, u0..u3 = columns 4l..4l+3 of the four rows.
#define SMOE_T4(r0, r1, r2, r3, u0, u1, u2, u3)                          \
  {                                                                      \
    const __m512 lo01 = unpacklo32(r0, r1), hi01 = unpackhi32(r0, r1);   \
    const __m512 lo23 = unpacklo32(r2, r3), hi23 = unpackhi32(r2, r3);   \
    u0 = unpacklo64(lo01, lo23);                                         \
    u1 = unpackhi64(lo01, lo23);                                         \
    u2 = unpacklo64(hi01, hi23);                                         \
    u3 = unpackhi64(hi01, hi23);                                         \
  }

SMOE_AVX512 void transpose_block(const float* in, index_t ldi, float* out, index_t ldo) {
  // Stage 1: g{q}{s} holds, in lane l, column 4l + s of rows 4q..4q+3.
  __m512 g00, g01, g02, g03, g10, g11, g12, g13, g20, g21, g22, g23, g30, g31, g32, g33;
  SMOE_T4(_mm512_loadu_ps(in), _mm512_loadu_ps(in + ldi), _mm512_loadu_ps(in + 2 * ldi),
          _mm512_loadu_ps(in + 3 * ldi), g00, g01, g02, g03)
  SMOE_T4(_mm512_loadu_ps(in + 4 * ldi), _mm512_loadu_ps(in + 5 * ldi), _mm512_loadu_ps(in + 6 * ldi),
          _mm512_loadu_ps(in + 7 * ldi), g10, g11, g12, g13)
  SMOE_T4(_mm512_loadu_ps(in + 8 * ldi), _mm512_loadu_ps(in + 9 * ldi), _mm512_loadu_ps(in + 10 * ldi),
          _mm512_loadu_ps(in + 11 * ldi), g20, g21, g22, g23)
  SMOE_T4(_mm512_loadu_ps(in + 12 * ldi), _mm512_loadu_ps(in + 13 * ldi), _mm512_loadu_ps(in + 14 * ldi),
          _mm512_loadu_ps(in + 15 * ldi), g30, g31, g32, g33)
  // Stage 2, per s: output column 4l + s gathers lane l of g0s, g1s, g2s, g3s.
#define SMOE_COLUMNS(s)                                                        \
  {                                                                            \
    const __m512 a = even_lanes(g0##s, g1##s), b = odd_lanes(g0##s, g1##s);    \
    const __m512 c = even_lanes(g2##s, g3##s), d = odd_lanes(g2##s, g3##s);    \
    _mm512_storeu_ps(out + s * ldo, even_lanes(a, c));                         \
    _mm512_storeu_ps(out + (s + 8) * ldo, odd_lanes(a, c));                    \
    _mm512_storeu_ps(out + (s + 4) * ldo, even_lanes(b, d));                   \
    _mm512_storeu_ps(out + (s + 12) * ldo, odd_lanes(b, d));                   \
  }
  SMOE_COLUMNS(0)
  SMOE_COLUMNS(1)
  SMOE_COLUMNS(2)
  SMOE_COLUMNS(3)
#undef SMOE_COLUMNS
}
#undef SMOE_T4

SMOE_AVX512 void transpose_block(const double* in, index_t ldi, double* out, index_t ldo) {
  // t{q}{h} holds, in lane l, column 2l + h of rows 2q, 2q + 1.
  __m512d t00, t01, t10, t11, t20, t21, t30, t31;
#define SMOE_T2(q)                                                                              \
  {                                                                                             \
    const __m512d r0 = _mm512_loadu_pd(in + 2 * q * ldi), r1 = _mm512_loadu_pd(in + (2 * q + 1) * ldi); \
    t##q##0 = _mm512_maskz_unpacklo_pd(0xFF, r0, r1);                                           \
    t##q##1 = _mm512_maskz_unpackhi_pd(0xFF, r0, r1);                                           \
  }
  SMOE_T2(0)
  SMOE_T2(1)
  SMOE_T2(2)
  SMOE_T2(3)
#undef SMOE_T2
#define SMOE_COLUMNS(h)                                                        \
  {                                                                            \
    const __m512d a = even_lanes(t0##h, t1##h), b = odd_lanes(t0##h, t1##h);   \
    const __m512d c = even_lanes(t2##h, t3##h), d = odd_lanes(t2##h, t3##h);   \
    _mm512_storeu_pd(out + h * ldo, even_lanes(a, c));                         \
    _mm512_storeu_pd(out + (h + 4) * ldo, odd_lanes(a, c));                    \
    _mm512_storeu_pd(out + (h + 2) * ldo, even_lanes(b, d));                   \
    _mm512_storeu_pd(out + (h + 6) * ldo, odd_lanes(b, d));                    \
  }
  SMOE_COLUMNS(0)
  SMOE_COLUMNS(1)
#undef SMOE_COLUMNS
}

template <class T>
SMOE_AVX512_NOINLINE void transpose(index_t rows, index_t cols, const T* in, index_t ldi, T* out, index_t ldo) {
  constexpr index_t B = Vec<T>::lanes;
  const index_t full_rows = rows / B * B, full_cols = cols / B * B;
  for (index_t i = 0; i < full_rows; i += B)
    for (index_t j = 0; j < full_cols; j += B) transpose_block(in + i * ldi + j, ldi, out + j * ldo + i, ldo);
  for (index_t i = 0; i < rows; ++i)  // the ragged right and bottom edges
    for (index_t j = i < full_rows ? full_cols : 0; j < cols; ++j) out[j * ldo + i] = in[i * ldi + j];
}

}  // namespace smoe::cpu_kernels::avx512

#undef SMOE_AVX512
#undef SMOE_AVX512_NOINLINE
#endif
