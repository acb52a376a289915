// AVX2 error pass of the 4-bit code grids (grid.cc's GroupError, same
// result bit for bit): eight consecutive elements of a group are the eight
// float32 lanes of section 7's summation order, so each lane adds the same
// terms in the same order as the scalar pass; the elements after the last
// full eight are added by the scalar tail into their lanes. No fused
// multiply-add (separate mul / add intrinsics).
#include <immintrin.h>

#include <cstdint>

#include "kernels/grid_kernels.h"
#include "kernels/row_kernels.h"

namespace arrowquant::grid {
namespace {

float ErrorAvx2(const float* x, int64_t n, const float* w, const float* L, const float* t, float s,
                float z) {
  const float inv = 1.0f / s;
  const __m256 vinv = _mm256_set1_ps(inv), vz = _mm256_set1_ps(z), vs = _mm256_set1_ps(s);
  const __m256 lo_levels = _mm256_loadu_ps(L), hi_levels = _mm256_loadu_ps(L + 8);
  __m256 acc = _mm256_setzero_ps();
  const int64_t n8 = n / 8 * 8;
  for (int64_t i = 0; i < n8; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    const __m256 u = _mm256_add_ps(_mm256_mul_ps(xv, vinv), vz);
    __m256i q = _mm256_setzero_si256();
    for (int k = 0; k < 15; ++k) {
      const __m256 gt = _mm256_cmp_ps(u, _mm256_set1_ps(t[k]), _CMP_GT_OQ);
      q = _mm256_sub_epi32(q, _mm256_castps_si256(gt));
    }
    const __m256 l_lo = _mm256_permutevar8x32_ps(lo_levels, q);
    const __m256 l_hi = _mm256_permutevar8x32_ps(hi_levels, q);  // uses q & 7
    const __m256 use_hi = _mm256_castsi256_ps(_mm256_cmpgt_epi32(q, _mm256_set1_epi32(7)));
    const __m256 lq = _mm256_blendv_ps(l_lo, l_hi, use_hi);
    const __m256 xh = _mm256_mul_ps(_mm256_sub_ps(lq, vz), vs);
    const __m256 d = _mm256_sub_ps(xv, xh);
    __m256 term = _mm256_mul_ps(d, d);
    if (w) term = _mm256_mul_ps(_mm256_loadu_ps(w + i), term);
    acc = _mm256_add_ps(acc, term);
  }
  alignas(32) float lane[8];
  _mm256_store_ps(lane, acc);
  for (int64_t i = n8; i < n; ++i) {
    const float u = x[i] * inv + z;
    int q = 0;
    for (int k = 0; k < 15; ++k) q += u > t[k] ? 1 : 0;
    const float d = x[i] - (L[q] - z) * s;
    const float dd = d * d;
    lane[i % 8] += (w ? w[i] : 1.0f) * dd;
  }
  const float a0 = lane[0] + lane[4], a1 = lane[1] + lane[5];
  const float a2 = lane[2] + lane[6], a3 = lane[3] + lane[7];
  return (a0 + a2) + (a1 + a3);
}

}  // namespace

GridErrorFn Avx2GridError4() { return kernels::CpuHasAvx2() ? ErrorAvx2 : nullptr; }

}  // namespace arrowquant::grid
