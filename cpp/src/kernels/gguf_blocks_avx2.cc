// AVX2 twins of the GGUF block search's evaluation passes (gguf_blocks.cc).
// One 8-float vector holds the eight summation lanes of the scalar pass
// (element i in lane i % 8; n is a multiple of 8), the elementwise
// operations are the same float32 operations in the same order (no FMA: the
// build passes -ffp-contract=off), min / max keep std::min / std::max's
// operand order, and the lanes are combined in the scalar order, so every
// result is identical bit for bit (gguf_blocks_test.cc checks it).
#include <immintrin.h>

#include <algorithm>

#include "kernels/gguf_block_passes.h"
#include "kernels/row_kernels.h"

namespace arrowquant::kernels {
namespace {

constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7)), as ReduceLanes.
inline float Reduce8(__m256 v) {
  const __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}

// Reduce8 of four vectors at once: the same additions in the same order
// (per vector: high half onto low half, then (a0 + a2) + (a1 + a3)).
inline void Reduce4x8(__m256 a, __m256 b, __m256 c, __m256 d, float* out) {
  const __m256 ab =
      _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  const __m256 cd =
      _mm256_add_ps(_mm256_permute2f128_ps(c, d, 0x20), _mm256_permute2f128_ps(c, d, 0x31));
  // each 128-bit lane (a0, a1, a2, a3) -> (a0, a2, a1, a3)
  const __m256 ab2 = _mm256_permute_ps(ab, 0xD8), cd2 = _mm256_permute_ps(cd, 0xD8);
  const __m256 h1 = _mm256_hadd_ps(ab2, cd2);  // (a0+a2, a1+a3, c0+c2, c1+c3 | b.., d..)
  const __m256 h2 = _mm256_hadd_ps(h1, h1);    // (A, C, A, C | B, D, B, D)
  out[0] = _mm256_cvtss_f32(h2);
  out[2] = _mm_cvtss_f32(_mm_movehdup_ps(_mm256_castps256_ps128(h2)));
  const __m128 hi = _mm256_extractf128_ps(h2, 1);
  out[1] = _mm_cvtss_f32(hi);
  out[3] = _mm_cvtss_f32(_mm_movehdup_ps(hi));
}

template <bool kWeighted, bool kSums, bool kOffset>
void EvalAffineT(const float* x0, const float* w0, int n, const BlockCand* c, const uint8_t* sub,
                 int k, float lo, float hi, BlockFit* out) {
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  for (int j = 0; j < k; ++j) {
    const int64_t off = sub != nullptr ? static_cast<int64_t>(sub[j]) * n : 0;
    const float* x = x0 + off;
    const float* w = kWeighted ? w0 + off : nullptr;
    const float a = c[j].a, b = c[j].b;
    const float inv = a != 0.0f ? 1.0f / a : 0.0f;
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b), vinv = _mm256_set1_ps(inv);
    __m256 err = _mm256_setzero_ps(), sv = err, svv = err, sxv = err;
    for (int i = 0; i < n; i += 8) {
      const __m256 xv = _mm256_loadu_ps(x + i);
      const __m256 t =
          kOffset ? _mm256_mul_ps(_mm256_add_ps(xv, vb), vinv) : _mm256_mul_ps(xv, vinv);
      __m256 v = _mm256_round_ps(t, kRound);
      v = _mm256_min_ps(vhi, _mm256_max_ps(vlo, v));
      const __m256 xh = kOffset ? _mm256_sub_ps(_mm256_mul_ps(va, v), vb) : _mm256_mul_ps(va, v);
      const __m256 e = _mm256_sub_ps(xv, xh);
      const __m256 e2 = _mm256_mul_ps(e, e);
      if constexpr (kWeighted) {
        const __m256 wv = _mm256_loadu_ps(w + i);
        err = _mm256_add_ps(err, _mm256_mul_ps(wv, e2));
        if constexpr (kSums) {
          const __m256 tv = _mm256_mul_ps(wv, v);
          if constexpr (kOffset) sv = _mm256_add_ps(sv, tv);
          svv = _mm256_add_ps(svv, _mm256_mul_ps(tv, v));
          sxv = _mm256_add_ps(sxv, _mm256_mul_ps(tv, xv));
        }
      } else {
        err = _mm256_add_ps(err, e2);
        if constexpr (kSums) {
          if constexpr (kOffset) sv = _mm256_add_ps(sv, v);
          svv = _mm256_add_ps(svv, _mm256_mul_ps(v, v));
          sxv = _mm256_add_ps(sxv, _mm256_mul_ps(v, xv));
        }
      }
    }
    if constexpr (kSums) {
      Reduce4x8(err, sv, svv, sxv, &out[j].err);
    } else {
      out[j] = BlockFit{Reduce8(err), 0.0f, 0.0f, 0.0f};
    }
  }
}

template <bool kOffset>
void Avx2EvalDispatch(const float* x, const float* w, int n, const BlockCand* c, const uint8_t* sub,
                      int k, float lo, float hi, bool sums, BlockFit* out) {
  if (w != nullptr) {
    sums ? EvalAffineT<true, true, kOffset>(x, w, n, c, sub, k, lo, hi, out)
         : EvalAffineT<true, false, kOffset>(x, w, n, c, sub, k, lo, hi, out);
  } else {
    sums ? EvalAffineT<false, true, kOffset>(x, w, n, c, sub, k, lo, hi, out)
         : EvalAffineT<false, false, kOffset>(x, w, n, c, sub, k, lo, hi, out);
  }
}

void Avx2EvalAffine(const float* x, const float* w, int n, const BlockCand* c, const uint8_t* sub,
                    int k, float lo, float hi, bool sums, BlockFit* out) {
  Avx2EvalDispatch<true>(x, w, n, c, sub, k, lo, hi, sums, out);
}

void Avx2EvalSymmetric(const float* x, const float* w, int n, const BlockCand* c,
                       const uint8_t* sub, int k, float lo, float hi, bool sums, BlockFit* out) {
  Avx2EvalDispatch<false>(x, w, n, c, sub, k, lo, hi, sums, out);
}

// The grid index of t: the number of midpoints strictly below t (ordered
// greater-than compares, as the scalar t > mid), found by a binary search
// over the 15 increasing midpoints (8, 4, 2, 1: the same count), then the
// grid value by a lookup in the two halves of the table.
struct GridVectors {
  __m256 m7, l2, l3, l4;  // the midpoints each level compares with
  __m256 low, high;
  explicit GridVectors(const CodeGrid& g) {
    const float* m = g.mid;
    m7 = _mm256_set1_ps(m[7]);
    l2 = _mm256_setr_ps(m[3], m[11], 0, 0, 0, 0, 0, 0);                      // by idx / 8
    l3 = _mm256_setr_ps(m[1], m[5], m[9], m[13], 0, 0, 0, 0);                // by idx / 4
    l4 = _mm256_setr_ps(m[0], m[2], m[4], m[6], m[8], m[10], m[12], m[14]);  // by idx / 2
    low = _mm256_loadu_ps(g.value);
    high = _mm256_loadu_ps(g.value + 8);
  }
  inline __m256i Index(__m256 t) const {
    auto step = [&](__m256i idx, __m256 thr, int bit) {
      const __m256i gt = _mm256_castps_si256(_mm256_cmp_ps(t, thr, _CMP_GT_OQ));
      return _mm256_or_si256(idx, _mm256_and_si256(gt, _mm256_set1_epi32(bit)));
    };
    __m256i idx = step(_mm256_setzero_si256(), m7, 8);
    idx = step(idx, _mm256_permutevar8x32_ps(l2, _mm256_srli_epi32(idx, 3)), 4);
    idx = step(idx, _mm256_permutevar8x32_ps(l3, _mm256_srli_epi32(idx, 2)), 2);
    return step(idx, _mm256_permutevar8x32_ps(l4, _mm256_srli_epi32(idx, 1)), 1);
  }
  inline __m256 Value(__m256 t) const {
    const __m256i idx = Index(t);
    const __m256 vl = _mm256_permutevar8x32_ps(low, idx);
    const __m256 vh = _mm256_permutevar8x32_ps(high, idx);
    const __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
    return _mm256_blendv_ps(vl, vh, upper);
  }
};

template <bool kWeighted, bool kSums>
void EvalGridT(const float* x0, const float* w0, int n, const BlockCand* c, const uint8_t* sub,
               int k, const GridVectors& g, BlockFit* out) {
  for (int j = 0; j < k; ++j) {
    const int64_t off = sub != nullptr ? static_cast<int64_t>(sub[j]) * n : 0;
    const float* x = x0 + off;
    const float* w = kWeighted ? w0 + off : nullptr;
    const float a = c[j].a;
    const float inv = a != 0.0f ? 1.0f / a : 0.0f;
    const __m256 va = _mm256_set1_ps(a), vinv = _mm256_set1_ps(inv);
    __m256 err = _mm256_setzero_ps(), svv = err, sxv = err;
    for (int i = 0; i < n; i += 8) {
      const __m256 xv = _mm256_loadu_ps(x + i);
      const __m256 v = g.Value(_mm256_mul_ps(xv, vinv));
      const __m256 e = _mm256_sub_ps(xv, _mm256_mul_ps(va, v));
      const __m256 e2 = _mm256_mul_ps(e, e);
      if constexpr (kWeighted) {
        const __m256 wv = _mm256_loadu_ps(w + i);
        err = _mm256_add_ps(err, _mm256_mul_ps(wv, e2));
        if constexpr (kSums) {
          const __m256 t = _mm256_mul_ps(wv, v);
          svv = _mm256_add_ps(svv, _mm256_mul_ps(t, v));
          sxv = _mm256_add_ps(sxv, _mm256_mul_ps(t, xv));
        }
      } else {
        err = _mm256_add_ps(err, e2);
        if constexpr (kSums) {
          svv = _mm256_add_ps(svv, _mm256_mul_ps(v, v));
          sxv = _mm256_add_ps(sxv, _mm256_mul_ps(v, xv));
        }
      }
    }
    if constexpr (kSums) {
      Reduce4x8(err, _mm256_setzero_ps(), svv, sxv, &out[j].err);
    } else {
      out[j] = BlockFit{Reduce8(err), 0.0f, 0.0f, 0.0f};
    }
  }
}

void Avx2EvalGrid(const float* x, const float* w, int n, const BlockCand* c, const uint8_t* sub,
                  int k, const CodeGrid& grid, bool sums, BlockFit* out) {
  const GridVectors g(grid);
  if (w != nullptr) {
    sums ? EvalGridT<true, true>(x, w, n, c, sub, k, g, out)
         : EvalGridT<true, false>(x, w, n, c, sub, k, g, out);
  } else {
    sums ? EvalGridT<false, true>(x, w, n, c, sub, k, g, out)
         : EvalGridT<false, false>(x, w, n, c, sub, k, g, out);
  }
}

// Eight int32 lanes to eight int8 codes (each in -128..127).
inline void StoreCodes(__m256i v, int8_t* q) {
  const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(q), _mm_packs_epi16(w16, w16));
}

void Avx2CodesAffine(const float* x, int n, BlockCand c, float lo, float hi, int8_t* q) {
  const float inv = c.a != 0.0f ? 1.0f / c.a : 0.0f;
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  const __m256 vb = _mm256_set1_ps(c.b), vinv = _mm256_set1_ps(inv);
  for (int i = 0; i < n; i += 8) {
    __m256 v =
        _mm256_round_ps(_mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(x + i), vb), vinv), kRound);
    v = _mm256_min_ps(vhi, _mm256_max_ps(vlo, v));
    StoreCodes(_mm256_cvttps_epi32(v), q + i);
  }
}

void Avx2CodesGrid(const float* x, int n, float a, const CodeGrid& grid, int8_t* q) {
  const float inv = a != 0.0f ? 1.0f / a : 0.0f;
  const __m256 vinv = _mm256_set1_ps(inv);
  const GridVectors g(grid);
  for (int i = 0; i < n; i += 8)
    StoreCodes(g.Index(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv)), q + i);
}

void Avx2Moments(const float* x, const float* w, int n, BlockMoments* out) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 lo = _mm256_set1_ps(x[0]), hi = lo, amax = _mm256_setzero_ps();
  __m256 sw = _mm256_setzero_ps(), swx = sw, swxx = sw;
  for (int i = 0; i < n; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    lo = _mm256_min_ps(lo, xv);
    hi = _mm256_max_ps(hi, xv);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, xv));
    const __m256 wv = w != nullptr ? _mm256_loadu_ps(w + i) : _mm256_set1_ps(1.0f);
    const __m256 wx = w != nullptr ? _mm256_mul_ps(wv, xv) : xv;
    sw = _mm256_add_ps(sw, wv);
    swx = _mm256_add_ps(swx, wx);
    swxx = _mm256_add_ps(swxx, _mm256_mul_ps(wx, xv));
  }
  // Min / max / max-abs are exact in any order (a zero's sign is dropped by + 0).
  alignas(32) float l[8], h[8], a[8];
  _mm256_store_ps(l, lo);
  _mm256_store_ps(h, hi);
  _mm256_store_ps(a, amax);
  float mn = l[0], mx = h[0], am = a[0];
  for (int k = 1; k < 8; ++k) {
    mn = std::min(mn, l[k]);
    mx = std::max(mx, h[k]);
    am = std::max(am, a[k]);
  }
  *out = BlockMoments{mn + 0.0f, mx + 0.0f, am, Reduce8(sw), Reduce8(swx), Reduce8(swxx)};
}

bool Avx2AllFinite(const float* x, int n) {
  // x * 0 is NaN exactly for NaN and Inf.
  __m256 bad = _mm256_setzero_ps();
  const __m256 zero = _mm256_setzero_ps();
  for (int i = 0; i < n; i += 8) {
    const __m256 z = _mm256_mul_ps(_mm256_loadu_ps(x + i), zero);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(z, z, _CMP_UNORD_Q));
  }
  return _mm256_movemask_ps(bad) == 0;
}

double Avx2ErrorF64(const float* x, const float* w, const float* y, int n) {
  __m256d acc = _mm256_setzero_pd();
  for (int i = 0; i < n; i += 4) {
    const __m256d e =
        _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + i)), _mm256_cvtps_pd(_mm_loadu_ps(y + i)));
    __m256d e2 = _mm256_mul_pd(e, e);
    if (w != nullptr) e2 = _mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(w + i)), e2);
    acc = _mm256_add_pd(acc, e2);
  }
  // (l0 + l2) + (l1 + l3)
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(acc), _mm256_extractf128_pd(acc, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

}  // namespace

const BlockPasses* Avx2BlockPasses() {
  if (!CpuHasAvx2()) return nullptr;
  static const BlockPasses passes = {
      "avx2",        Avx2EvalAffine, Avx2EvalSymmetric, Avx2EvalGrid, Avx2CodesAffine,
      Avx2CodesGrid, Avx2Moments,    Avx2AllFinite,     Avx2ErrorF64, Avx2SearchPasses()};
  return &passes;
}

}  // namespace arrowquant::kernels
