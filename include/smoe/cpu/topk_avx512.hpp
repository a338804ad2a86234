#pragma once
// AVX-512 top-k over one row of scores without NaN, for routing's select_topk
// (routing/topk_select.hpp), chosen at run time like the GEMM kernels.
//
// k rounds, each a vector max over the candidates not yet taken, then the first lane holding that
// max: larger scores first, equal scores to the smaller index, the same order as the scalar
// insertion. A branchy insertion mispredicts on every candidate that enters the kept list
// (~k·ln(n/k) per row); this costs k·n/16 vector steps and no data-dependent branches.
#include "smoe/cpu/gemm_avx512.hpp"

#if defined(SMOE_HAVE_AVX512_GEMM)
#include <cstdint>
#include <limits>

namespace smoe::cpu_kernels::avx512 {

#define SMOE_TOPK_AVX512 __attribute__((target("avx512f"), always_inline)) inline
// Lanes in m: max(a, b); others keep a.
SMOE_TOPK_AVX512 __m512 max_where(__m512 a, __m512 b, __mmask16 m) { return _mm512_mask_max_ps(a, m, a, b); }
SMOE_TOPK_AVX512 __m512d max_where(__m512d a, __m512d b, __mmask8 m) { return _mm512_mask_max_pd(a, m, a, b); }
SMOE_TOPK_AVX512 __mmask16 equal(__m512 a, float x) { return _mm512_cmp_ps_mask(a, _mm512_set1_ps(x), _CMP_EQ_OQ); }
SMOE_TOPK_AVX512 __mmask8 equal(__m512d a, double x) { return _mm512_cmp_pd_mask(a, _mm512_set1_pd(x), _CMP_EQ_OQ); }
// The largest lane, by halving (all-lanes maskz shuffles: see the transposes in gemm_avx512.hpp).
SMOE_TOPK_AVX512 float reduce_max(__m512 a) {
  a = _mm512_maskz_max_ps(0xFFFF, a, _mm512_maskz_shuffle_f32x4(0xFFFF, a, a, 0x4E));                // 128-bit lanes 2,3,0,1
  a = _mm512_maskz_max_ps(0xFFFF, a, _mm512_maskz_shuffle_f32x4(0xFFFF, a, a, 0xB1));                // 1,0,3,2
  a = _mm512_maskz_max_ps(0xFFFF, a, _mm512_maskz_permute_ps(0xFFFF, a, 0x4E));                       // within 128 bits
  a = _mm512_maskz_max_ps(0xFFFF, a, _mm512_maskz_permute_ps(0xFFFF, a, 0xB1));
  return _mm512_cvtss_f32(a);
}
SMOE_TOPK_AVX512 double reduce_max(__m512d a) {
  a = _mm512_maskz_max_pd(0xFF, a, _mm512_maskz_shuffle_f64x2(0xFF, a, a, 0x4E));
  a = _mm512_maskz_max_pd(0xFF, a, _mm512_maskz_shuffle_f64x2(0xFF, a, a, 0xB1));
  a = _mm512_maskz_max_pd(0xFF, a, _mm512_maskz_permute_pd(0xFF, a, 0x55));
  return _mm512_cvtsd_f64(a);
}

// out[0..k) = the k best of scores[0..n), best first. Requires 1 <= k <= n <= 1024, no NaN.
template <class T>
__attribute__((target("avx512f"), noinline)) void topk_no_nan(const T* scores, index_t n, index_t k,
                                                              std::int32_t* out) {
  using V = Vec<T>;
  using v = typename V::type;
  using mask = typename V::mask;
  constexpr index_t L = V::lanes, max_chunks = 1024 / L;
  const index_t chunks = (n + L - 1) / L;
  mask taken[max_chunks];
  for (index_t c = 0; c < chunks; ++c) {
    const index_t left = n - c * L;
    taken[c] = left >= L ? mask(0) : mask(~((mask(1) << left) - 1));  // lanes past n count as taken
  }
  const T lowest = -std::numeric_limits<T>::infinity();
  for (index_t j = 0; j < k; ++j) {
    v best = V::set1(lowest);
    for (index_t c = 0; c < chunks; ++c) {
      const v s = V::load(mask(~taken[c]), scores + c * L);  // taken lanes read as 0 ...
      best = max_where(best, s, mask(~taken[c]));            // ... and are left out of the max
    }
    const T m = reduce_max(best);
    for (index_t c = 0; c < chunks; ++c) {
      const mask hit = mask(equal(V::load(mask(~taken[c]), scores + c * L), m) & ~taken[c]);
      if (hit) {
        const int lane = __builtin_ctz(unsigned(hit));
        out[j] = static_cast<std::int32_t>(c * L + lane);
        taken[c] = mask(taken[c] | (mask(1) << lane));
        break;
      }
    }
  }
}

#undef SMOE_TOPK_AVX512

}  // namespace smoe::cpu_kernels::avx512
#endif
