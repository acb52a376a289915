// AVX2 twins of the mse search's evaluation passes (param_search.cc). One
// 8-float vector holds the eight summation lanes of the scalar pass (element
// i in lane i % 8), elementwise operations are the same float32 operations
// (no FMA: the build passes -ffp-contract=off), and the tail runs the scalar
// loop on the same lanes, so the results are identical bit for bit.
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "kernels/param_search.h"

namespace arrowquant::kernels {
namespace {

// Integer code sums are accumulated in float lanes, exact while every lane
// stays below 2^24: 256 iterations add at most 256 * 255^2 < 2^24 per lane.
constexpr int64_t kBlock = 2048;

float Reduce8(const float* l) {
  const float a0 = l[0] + l[4], a1 = l[1] + l[5], a2 = l[2] + l[6], a3 = l[3] + l[7];
  return (a0 + a2) + (a1 + a3);
}

int64_t LaneTotal(__m256 v) {
  alignas(32) float l[8];
  _mm256_store_ps(l, v);
  int64_t t = 0;
  for (float f : l) t += static_cast<int64_t>(f);
  return t;
}

// clamp(v, 0, q_max) with std::min/std::max's operand order (the same result
// for every non-NaN input, signed zeros included).
inline __m256 Clamp(__m256 v, __m256 zero, __m256 q_max) {
  return _mm256_min_ps(q_max, _mm256_max_ps(zero, v));
}

constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

EvalSums Avx2EvalAsym(const float* x, int64_t n, float scale, float zero_point, float mid,
                      float q_max) {
  const float inv = 1.0f / scale;
  const __m256 vinv = _mm256_set1_ps(inv), vz = _mm256_set1_ps(zero_point);
  const __m256 vs = _mm256_set1_ps(scale), vmid = _mm256_set1_ps(mid);
  const __m256 vq = _mm256_set1_ps(q_max), zero = _mm256_setzero_ps();
  __m256 err = zero, sxq = zero;
  EvalSums out;
  const int64_t n8 = n & ~int64_t{7};
  int64_t i = 0;
  while (i < n8) {
    const int64_t end = std::min(n8, i + kBlock);
    __m256 fq = zero, fqq = zero;
    for (; i < end; i += 8) {
      const __m256 xv = _mm256_loadu_ps(x + i);
      const __m256 q =
          Clamp(_mm256_round_ps(_mm256_add_ps(_mm256_mul_ps(xv, vinv), vz), kRound), zero, vq);
      const __m256 e = _mm256_sub_ps(xv, _mm256_mul_ps(_mm256_sub_ps(q, vz), vs));
      err = _mm256_add_ps(err, _mm256_mul_ps(e, e));
      sxq = _mm256_add_ps(sxq, _mm256_mul_ps(_mm256_sub_ps(xv, vmid), q));
      fq = _mm256_add_ps(fq, q);
      fqq = _mm256_add_ps(fqq, _mm256_mul_ps(q, q));
    }
    out.sum_q += LaneTotal(fq);
    out.sum_qq += LaneTotal(fqq);
  }
  alignas(32) float el[8], sl[8];
  _mm256_store_ps(el, err);
  _mm256_store_ps(sl, sxq);
  for (; i < n; ++i) {
    const float q = std::min(std::max(std::nearbyint(x[i] * inv + zero_point), 0.0f), q_max);
    const float e = x[i] - (q - zero_point) * scale;
    el[i & 7] += e * e;
    sl[i & 7] += (x[i] - mid) * q;
    out.sum_q += static_cast<int64_t>(q);
    out.sum_qq += static_cast<int64_t>(q * q);
  }
  out.err = Reduce8(el);
  out.sum_xq = Reduce8(sl);
  return out;
}

EvalSums Avx2EvalSym(const float* x, int64_t n, float scale, float zero_point, float q_max) {
  const float inv = 1.0f / scale;
  const __m256 vinv = _mm256_set1_ps(inv), vz = _mm256_set1_ps(zero_point);
  const __m256 vs = _mm256_set1_ps(scale);
  const __m256 vq = _mm256_set1_ps(q_max), zero = _mm256_setzero_ps();
  __m256 err = zero, sxk = zero;
  EvalSums out;
  const int64_t n8 = n & ~int64_t{7};
  int64_t i = 0;
  while (i < n8) {
    const int64_t end = std::min(n8, i + kBlock);
    __m256 fkk = zero;
    for (; i < end; i += 8) {
      const __m256 xv = _mm256_loadu_ps(x + i);
      const __m256 q =
          Clamp(_mm256_add_ps(_mm256_round_ps(_mm256_mul_ps(xv, vinv), kRound), vz), zero, vq);
      const __m256 k = _mm256_sub_ps(q, vz);
      const __m256 e = _mm256_sub_ps(xv, _mm256_mul_ps(k, vs));
      err = _mm256_add_ps(err, _mm256_mul_ps(e, e));
      sxk = _mm256_add_ps(sxk, _mm256_mul_ps(xv, k));
      fkk = _mm256_add_ps(fkk, _mm256_mul_ps(k, k));
    }
    out.sum_qq += LaneTotal(fkk);
  }
  alignas(32) float el[8], sl[8];
  _mm256_store_ps(el, err);
  _mm256_store_ps(sl, sxk);
  for (; i < n; ++i) {
    const float q = std::min(std::max(std::nearbyint(x[i] * inv) + zero_point, 0.0f), q_max);
    const float k = q - zero_point;
    const float e = x[i] - k * scale;
    el[i & 7] += e * e;
    sl[i & 7] += x[i] * k;
    out.sum_qq += static_cast<int64_t>(k * k);
  }
  out.err = Reduce8(el);
  out.sum_xq = Reduce8(sl);
  return out;
}

float Avx2CenteredSum(const float* x, int64_t n, float mid) {
  const __m256 vmid = _mm256_set1_ps(mid);
  __m256 acc = _mm256_setzero_ps();
  const int64_t n8 = n & ~int64_t{7};
  int64_t i = 0;
  for (; i < n8; i += 8) acc = _mm256_add_ps(acc, _mm256_sub_ps(_mm256_loadu_ps(x + i), vmid));
  alignas(32) float l[8];
  _mm256_store_ps(l, acc);
  for (; i < n; ++i) l[i & 7] += x[i] - mid;
  return Reduce8(l);
}

const SearchPasses kAvx2Passes = {"avx2", Avx2EvalAsym, Avx2EvalSym, Avx2CenteredSum};

}  // namespace

const SearchPasses* Avx2SearchPasses() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") ? &kAvx2Passes : nullptr;
}

}  // namespace arrowquant::kernels
