#pragma once
// The AVX-512 GEMM micro-kernels behind cpu_kernels::gemm (cpu/gemm_kernel.hpp); include that header.
//
//   C[m, n] = epilogue(A · B),  A [m, k] strided (a[i·lda + kk], or a[kk·lda + i] transposed) or
//   given by row pointers (AOperand below), B [k, n] row-major, C row-major.
//
// Register tile: 12 rows × 2 vectors (32 floats or 16 doubles) of C in 24 zmm accumulators. Each
// step kk loads two vectors of B's row kk and broadcasts A(i, kk) for the 12 rows straight from A,
// so neither operand is packed: a gathered or transposed A costs nothing extra, and B's rows are
// read where they are (an expert's weight [d, G] is used in place). Blocking: a [384, 192] block of
// A stays in L2 while every 192 × 32 panel of B passes through L1 once per row block, and the
// next panel is prefetched while the current one serves the row tiles. Summation order over k is fixed (kc blocks in order, kk in order inside), so results depend
// only on the shapes, never on threads.
//
// Compiled with __attribute__((target("avx512f"))) and chosen at run time (cpu_supports_avx512),
// so a default x86-64 build still uses AVX-512 where the CPU has it; SMOE_CPU_GENERIC=1 turns it off.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__) && \
    !defined(SMOE_NO_AVX512)
#define SMOE_HAVE_AVX512_GEMM 1
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "smoe/core/config.hpp"

#define SMOE_AVX512 __attribute__((target("avx512f"), always_inline)) inline
#define SMOE_AVX512_NOINLINE __attribute__((target("avx512f"), noinline))

namespace smoe::cpu_kernels::avx512 {

// SMOE_CPU_GENERIC=1 in the environment (any value but empty or "0") forces the generic kernels,
// so the path of CPUs without AVX-512 is tested on machines that have it. Read once.
inline bool cpu_supports_avx512() {
  static const bool supported = [] {
    const char* generic = std::getenv("SMOE_CPU_GENERIC");
    const bool forced = generic != nullptr && generic[0] != '\0' && !(generic[0] == '0' && generic[1] == '\0');
    return !forced && __builtin_cpu_supports("avx512f");
  }();
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

// How A(i, kk) is found. Strided: a[i·ld + kk], or a[kk·ld + i] (transposed). Rows: row i of A
// at rows[i] + offset, or (transposed, A = Xᵀ) row kk of X at rows[kk] + offset, element i — so a
// gathered operand (an expert's tokens) is read where it lies, without a copy.
enum class ALayout { strided, strided_t, rows, rows_t };

template <class T, ALayout Layout>
struct AOperand {
  const T* a = nullptr;            // strided layouts
  index_t ld = 0;
  const T* const* rows = nullptr;  // row-pointer layouts
  index_t offset = 0;

  // The operand starting at (i0, k0).
  AOperand at(index_t i0, index_t k0) const {
    AOperand o = *this;
    if constexpr (Layout == ALayout::strided) o.a += i0 * ld + k0;
    if constexpr (Layout == ALayout::strided_t) o.a += k0 * ld + i0;
    if constexpr (Layout == ALayout::rows) o.rows += i0, o.offset += k0;
    if constexpr (Layout == ALayout::rows_t) o.rows += k0, o.offset += i0;
    return o;
  }
};

#define SMOE_TILE_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

// One MR × 2-vector tile over kc steps. Named accumulators (not arrays): GCC keeps arrays of
// vectors in memory across the loop.
template <class T, int MR, ALayout Layout>
SMOE_AVX512_NOINLINE void tile(index_t kc, AOperand<T, Layout> a, const T* b, index_t ldb, T* c, index_t ldc,
                               typename Vec<T>::mask m0, typename Vec<T>::mask m1, TileEpilogue<T> ep) {
  using V = Vec<T>;
  using v = typename V::type;
  constexpr int L = V::lanes;
#define SMOE_TILE_DECL(i) v c##i##0 = V::zero(), c##i##1 = V::zero();
  SMOE_TILE_ROWS(SMOE_TILE_DECL)
#undef SMOE_TILE_DECL
#define SMOE_TILE_FMA(i, value)          \
  if constexpr (MR > i) {                \
    const v av = V::set1(value);         \
    c##i##0 = V::fma(av, b0, c##i##0);   \
    c##i##1 = V::fma(av, b1, c##i##1);   \
  }
  if constexpr (Layout == ALayout::strided || Layout == ALayout::strided_t) {
    // Rows i of A at p0 / p4 / p8 + {0, 1, 2, 3}·s1, advancing `step` per kk: five registers for
    // the 12 broadcasts (transposed: the 12 values are adjacent).
    constexpr bool trans = Layout == ALayout::strided_t;
    const T* p0 = a.a;
    const T* p4 = a.a + (trans ? 4 : 4 * a.ld);
    const T* p8 = a.a + (trans ? 8 : 8 * a.ld);
    const index_t s1 = trans ? 1 : a.ld, s3 = 3 * s1, step = trans ? a.ld : 1;
    for (index_t kk = 0; kk < kc; ++kk) {
      const v b0 = V::load(m0, b), b1 = V::load(m1, b + L);
      b += ldb;
#define SMOE_TILE_STRIDED(i) \
  SMOE_TILE_FMA(i, (i < 4 ? p0 : (i < 8 ? p4 : p8))[(i % 4) == 0 ? 0 : (i % 4) == 1 ? s1 : (i % 4) == 2 ? 2 * s1 : s3])
      SMOE_TILE_ROWS(SMOE_TILE_STRIDED)
#undef SMOE_TILE_STRIDED
      p0 += step;
      p4 += step;
      p8 += step;
    }
  } else if constexpr (Layout == ALayout::rows) {
    // One pointer per row, indexed by kk (twelve registers; the loop needs three more).
#define SMOE_TILE_ROW_POINTER(i) const T* r##i = MR > i ? a.rows[i] + a.offset : nullptr;
    SMOE_TILE_ROWS(SMOE_TILE_ROW_POINTER)
#undef SMOE_TILE_ROW_POINTER
    for (index_t kk = 0; kk < kc; ++kk) {
      const v b0 = V::load(m0, b), b1 = V::load(m1, b + L);
      b += ldb;
#define SMOE_TILE_ROW(i) SMOE_TILE_FMA(i, r##i[kk])
      SMOE_TILE_ROWS(SMOE_TILE_ROW)
#undef SMOE_TILE_ROW
    }
  } else {
    // Row kk of X holds A's 12 values of this step side by side.
    for (index_t kk = 0; kk < kc; ++kk) {
      const v b0 = V::load(m0, b), b1 = V::load(m1, b + L);
      b += ldb;
      const T* p = a.rows[kk] + a.offset;
#define SMOE_TILE_COLUMN(i) SMOE_TILE_FMA(i, p[i])
      SMOE_TILE_ROWS(SMOE_TILE_COLUMN)
#undef SMOE_TILE_COLUMN
    }
  }
#undef SMOE_TILE_FMA
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

template <class T, ALayout Layout>
SMOE_AVX512 void tile_rows(index_t rows, index_t kc, AOperand<T, Layout> a, const T* b, index_t ldb, T* c,
                           index_t ldc, typename Vec<T>::mask m0, typename Vec<T>::mask m1, TileEpilogue<T> ep) {
  // A short tile as 8 + 2 + 1 rows and the like: five kernels instead of twelve.
  while (rows > 0) {
    const index_t r = rows >= 12 ? 12 : rows >= 8 ? 8 : rows >= 4 ? 4 : rows >= 2 ? 2 : 1;
    switch (r) {
      case 12: tile<T, 12, Layout>(kc, a, b, ldb, c, ldc, m0, m1, ep); break;
      case 8: tile<T, 8, Layout>(kc, a, b, ldb, c, ldc, m0, m1, ep); break;
      case 4: tile<T, 4, Layout>(kc, a, b, ldb, c, ldc, m0, m1, ep); break;
      case 2: tile<T, 2, Layout>(kc, a, b, ldb, c, ldc, m0, m1, ep); break;
      default: tile<T, 1, Layout>(kc, a, b, ldb, c, ldc, m0, m1, ep); break;
    }
    rows -= r;
    a = a.at(r, 0);
    c += r * ldc;
  }
}

// C [m, n] (+)= A · B (+ bias, relu). B is row-major [k, n] with row stride ldb.
template <class T, ALayout Layout>
SMOE_AVX512_NOINLINE void gemm(index_t m, index_t n, index_t k, AOperand<T, Layout> a, const T* b, index_t ldb,
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
  // Loops: row blocks of A (mc rows) → k blocks → column panels of B (32 columns) → row tiles.
  // A's [mc, kc] block stays in L2 for all column panels, a [kc, 32] B panel in L1 for all row
  // tiles, and C's [mc, n] block in L2 across the k blocks.
  for (index_t i0 = 0; i0 < m; i0 += MC) {
    const index_t mc = std::min(MC, m - i0);
    const index_t tiles = (mc + 11) / 12;
    for (index_t k0 = 0; k0 < k; k0 += KC) {
      const index_t kc = std::min(KC, k - k0);
      const AOperand<T, Layout> ak = a.at(i0, k0);
      for (index_t j0 = 0; j0 < n; j0 += NR) {
        const index_t nr = std::min(NR, n - j0);
        const mask m0 = lane_mask(nr), m1 = lane_mask(nr - L);
        const TileEpilogue<T> ep{accumulate || k0 > 0, k0 + kc == k, bias ? bias + j0 : nullptr, relu};
        // While this B panel serves the row tiles from L1, fetch the next one (the next columns,
        // else the next k block), a slice per tile: B is read where it is, not packed.
        const bool next_cols = j0 + NR < n;
        const T* next = next_cols ? b + k0 * ldb + j0 + NR : b + (k0 + KC) * ldb;
        const index_t next_rows = next_cols ? kc : (k0 + KC < k ? std::min(KC, k - k0 - KC) : 0);
        const index_t per_tile = (next_rows + tiles - 1) / tiles;
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
          tile_rows<T, Layout>(std::min<index_t>(12, mc - t), kc, ak.at(t, 0), b + k0 * ldb + j0, ldb,
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
