// AVX2 twins of the mse search's passes (param_search.cc). One 8-float
// vector holds the eight summation lanes of the scalar pass (element i in
// lane i % 8), elementwise operations are the same float32 operations (no
// FMA: the build passes -ffp-contract=off), the last partial vector adds +0
// in its unused lanes (as if they were absent: a lane sum is never -0), and
// the lanes are combined in the scalar order, so the results are identical
// bit for bit (param_search_test.cc checks it).
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "kernels/param_search.h"
#include "kernels/row_kernels.h"

namespace arrowquant::kernels {
namespace {

// Integer code sums are accumulated in float lanes, exact while every lane
// stays below 2^24: 256 iterations add at most 256 * 255^2 < 2^24 per lane,
// and a block's eight lanes together stay below 2^31.
constexpr int64_t kBlock = 2048;

// ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7)), as the scalar Reduce8.
inline float Reduce8(__m256 v) {
  const __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}

// Sum of the eight integer-valued lanes (exact, see kBlock).
inline int64_t IntTotal(__m256 v) {
  const __m256i i = _mm256_cvtps_epi32(v);
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Mask of the first `count` lanes (0 < count < 8).
inline __m256i TailMask(int64_t count) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), idx);
}

// clamp(v, 0, q_max) with std::min/std::max's operand order (the same result
// for every non-NaN input, signed zeros included).
inline __m256 Clamp(__m256 v, __m256 zero, __m256 q_max) {
  return _mm256_min_ps(q_max, _mm256_max_ps(zero, v));
}

constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

struct AsymState {
  __m256 vinv, vz, vs, vmid, vq, zero;
  __m256 err, sxq, fq, fqq;

  // One vector of elements; `keep` zeroes the contributions of unused lanes.
  template <bool kTail>
  inline void Step(__m256 xv, __m256 keep) {
    const __m256 q =
        Clamp(_mm256_round_ps(_mm256_add_ps(_mm256_mul_ps(xv, vinv), vz), kRound), zero, vq);
    const __m256 e = _mm256_sub_ps(xv, _mm256_mul_ps(_mm256_sub_ps(q, vz), vs));
    __m256 e2 = _mm256_mul_ps(e, e);
    __m256 xq = _mm256_mul_ps(_mm256_sub_ps(xv, vmid), q);
    __m256 qk = q;
    if constexpr (kTail) {
      e2 = _mm256_and_ps(e2, keep);
      xq = _mm256_and_ps(xq, keep);
      qk = _mm256_and_ps(qk, keep);
    }
    err = _mm256_add_ps(err, e2);
    sxq = _mm256_add_ps(sxq, xq);
    fq = _mm256_add_ps(fq, qk);
    fqq = _mm256_add_ps(fqq, _mm256_mul_ps(qk, qk));
  }
};

void Avx2EvalAsym(const float* x, int64_t n, float scale, float zero_point, float mid, float q_max,
                  EvalSums* result) {
  const float inv = 1.0f / scale;
  const __m256 zero = _mm256_setzero_ps();
  AsymState st{_mm256_set1_ps(inv),
               _mm256_set1_ps(zero_point),
               _mm256_set1_ps(scale),
               _mm256_set1_ps(mid),
               _mm256_set1_ps(q_max),
               zero,
               zero,
               zero,
               zero,
               zero};
  EvalSums out;
  int64_t i = 0;
  const int64_t n8 = n & ~int64_t{7};
  while (i < n8) {
    const int64_t end = std::min(n8, i + kBlock);
    for (; i < end; i += 8) st.Step<false>(_mm256_loadu_ps(x + i), zero);
    out.sum_q += IntTotal(st.fq);
    out.sum_qq += IntTotal(st.fqq);
    st.fq = st.fqq = zero;
  }
  if (i < n) {
    const __m256i m = TailMask(n - i);
    st.Step<true>(_mm256_maskload_ps(x + i, m), _mm256_castsi256_ps(m));
    out.sum_q += IntTotal(st.fq);
    out.sum_qq += IntTotal(st.fqq);
  }
  out.err = Reduce8(st.err);
  out.sum_xq = Reduce8(st.sxq);
  *result = out;
}

struct SymState {
  __m256 vinv, vz, vs, vq, zero;
  __m256 err, sxk, fkk;

  template <bool kTail>
  inline void Step(__m256 xv, __m256 keep) {
    const __m256 q =
        Clamp(_mm256_add_ps(_mm256_round_ps(_mm256_mul_ps(xv, vinv), kRound), vz), zero, vq);
    const __m256 k = _mm256_sub_ps(q, vz);
    const __m256 e = _mm256_sub_ps(xv, _mm256_mul_ps(k, vs));
    __m256 e2 = _mm256_mul_ps(e, e);
    __m256 xk = _mm256_mul_ps(xv, k);
    __m256 kk = _mm256_mul_ps(k, k);
    if constexpr (kTail) {
      e2 = _mm256_and_ps(e2, keep);
      xk = _mm256_and_ps(xk, keep);
      kk = _mm256_and_ps(kk, keep);
    }
    err = _mm256_add_ps(err, e2);
    sxk = _mm256_add_ps(sxk, xk);
    fkk = _mm256_add_ps(fkk, kk);
  }
};

void Avx2EvalSym(const float* x, int64_t n, float scale, float zero_point, float q_max,
                 EvalSums* result) {
  const float inv = 1.0f / scale;
  const __m256 zero = _mm256_setzero_ps();
  SymState st{_mm256_set1_ps(inv),
              _mm256_set1_ps(zero_point),
              _mm256_set1_ps(scale),
              _mm256_set1_ps(q_max),
              zero,
              zero,
              zero,
              zero};
  EvalSums out;
  int64_t i = 0;
  const int64_t n8 = n & ~int64_t{7};
  while (i < n8) {
    const int64_t end = std::min(n8, i + kBlock);
    for (; i < end; i += 8) st.Step<false>(_mm256_loadu_ps(x + i), zero);
    out.sum_qq += IntTotal(st.fkk);
    st.fkk = zero;
  }
  if (i < n) {
    const __m256i m = TailMask(n - i);
    st.Step<true>(_mm256_maskload_ps(x + i, m), _mm256_castsi256_ps(m));
    out.sum_qq += IntTotal(st.fkk);
  }
  out.err = Reduce8(st.err);
  out.sum_xq = Reduce8(st.sxk);
  *result = out;
}

// Only the error of Avx2EvalAsym / Avx2EvalSym (same operations, same lanes).
template <bool kSymmetric>
float Avx2Error(const float* x, int64_t n, float scale, float zero_point, float q_max) {
  const float inv = 1.0f / scale;
  const __m256 vinv = _mm256_set1_ps(inv), vz = _mm256_set1_ps(zero_point);
  const __m256 vs = _mm256_set1_ps(scale), vq = _mm256_set1_ps(q_max);
  const __m256 zero = _mm256_setzero_ps();
  __m256 err = zero;
  auto step = [&](__m256 xv) {
    const __m256 q =
        kSymmetric
            ? Clamp(_mm256_add_ps(_mm256_round_ps(_mm256_mul_ps(xv, vinv), kRound), vz), zero, vq)
            : Clamp(_mm256_round_ps(_mm256_add_ps(_mm256_mul_ps(xv, vinv), vz), kRound), zero, vq);
    const __m256 e = _mm256_sub_ps(xv, _mm256_mul_ps(_mm256_sub_ps(q, vz), vs));
    return _mm256_mul_ps(e, e);
  };
  int64_t i = 0;
  const int64_t n8 = n & ~int64_t{7};
  for (; i < n8; i += 8) err = _mm256_add_ps(err, step(_mm256_loadu_ps(x + i)));
  if (i < n) {
    const __m256i m = TailMask(n - i);
    err = _mm256_add_ps(err,
                        _mm256_and_ps(step(_mm256_maskload_ps(x + i, m)), _mm256_castsi256_ps(m)));
  }
  return Reduce8(err);
}

float Avx2CenteredSum(const float* x, int64_t n, float mid) {
  const __m256 vmid = _mm256_set1_ps(mid);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  const int64_t n8 = n & ~int64_t{7};
  for (; i < n8; i += 8) acc = _mm256_add_ps(acc, _mm256_sub_ps(_mm256_loadu_ps(x + i), vmid));
  if (i < n) {
    const __m256i m = TailMask(n - i);
    const __m256 d = _mm256_sub_ps(_mm256_maskload_ps(x + i, m), vmid);
    acc = _mm256_add_ps(acc, _mm256_and_ps(d, _mm256_castsi256_ps(m)));
  }
  return Reduce8(acc);
}

// Min and max are exact in any order; only the sign of a zero result could
// depend on it, and + 0.0f makes that +0 (as the scalar pass).
void Avx2MinMax(const float* x, int64_t n, float* lo, float* hi) {
  __m256 vlo = _mm256_set1_ps(x[0]), vhi = vlo;
  int64_t i = 0;
  const int64_t n8 = n & ~int64_t{7};
  for (; i < n8; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    vlo = _mm256_min_ps(vlo, v);
    vhi = _mm256_max_ps(vhi, v);
  }
  alignas(32) float l[8], h[8];
  _mm256_store_ps(l, vlo);
  _mm256_store_ps(h, vhi);
  float a = l[0], b = h[0];
  for (int k = 1; k < 8; ++k) {
    a = std::min(a, l[k]);
    b = std::max(b, h[k]);
  }
  for (; i < n; ++i) {
    a = std::min(a, x[i]);
    b = std::max(b, x[i]);
  }
  *lo = a + 0.0f;
  *hi = b + 0.0f;
}

// F16C conversion, round to nearest even: the same values as FloatToHalf.
float F16cRoundF16(float v) {
  return _cvtsh_ss(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

const SearchPasses kAvx2Passes = {"avx2",          Avx2EvalAsym,    Avx2EvalSym, Avx2Error<false>,
                                  Avx2Error<true>, Avx2CenteredSum, Avx2MinMax,  F16cRoundF16};

}  // namespace

const SearchPasses* Avx2SearchPasses() {
  __builtin_cpu_init();
  return CpuHasAvx2() ? &kAvx2Passes : nullptr;
}

}  // namespace arrowquant::kernels
