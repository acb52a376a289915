// AVX2 twins of the GGUF block search's evaluation passes (gguf_blocks.cc).
// One 8-float vector holds the eight summation lanes of the scalar pass
// (element i in lane i % 8; n is a multiple of 8), the elementwise
// operations are the same float32 operations in the same order (no FMA: the
// build passes -ffp-contract=off), min / max keep std::min / std::max's
// operand order, and the lanes are combined in the scalar order, so every
// result is identical bit for bit (gguf_blocks_test.cc checks it).
#include <immintrin.h>

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

template <bool kWeighted, bool kSums>
void EvalAffineT(const float* x, const float* w, int n, const BlockCand* c, int k, float lo,
                 float hi, BlockFit* out) {
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  for (int j = 0; j < k; ++j) {
    const float a = c[j].a, b = c[j].b;
    const float inv = a != 0.0f ? 1.0f / a : 0.0f;
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b), vinv = _mm256_set1_ps(inv);
    __m256 err = _mm256_setzero_ps(), sv = err, svv = err, sxv = err;
    for (int i = 0; i < n; i += 8) {
      const __m256 xv = _mm256_loadu_ps(x + i);
      __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_add_ps(xv, vb), vinv), kRound);
      v = _mm256_min_ps(vhi, _mm256_max_ps(vlo, v));
      const __m256 e = _mm256_sub_ps(xv, _mm256_sub_ps(_mm256_mul_ps(va, v), vb));
      const __m256 e2 = _mm256_mul_ps(e, e);
      if constexpr (kWeighted) {
        const __m256 wv = _mm256_loadu_ps(w + i);
        err = _mm256_add_ps(err, _mm256_mul_ps(wv, e2));
        if constexpr (kSums) {
          const __m256 t = _mm256_mul_ps(wv, v);
          sv = _mm256_add_ps(sv, t);
          svv = _mm256_add_ps(svv, _mm256_mul_ps(t, v));
          sxv = _mm256_add_ps(sxv, _mm256_mul_ps(t, xv));
        }
      } else {
        err = _mm256_add_ps(err, e2);
        if constexpr (kSums) {
          sv = _mm256_add_ps(sv, v);
          svv = _mm256_add_ps(svv, _mm256_mul_ps(v, v));
          sxv = _mm256_add_ps(sxv, _mm256_mul_ps(v, xv));
        }
      }
    }
    BlockFit f{Reduce8(err), 0.0f, 0.0f, 0.0f};
    if constexpr (kSums) {
      f.sv = Reduce8(sv);
      f.svv = Reduce8(svv);
      f.sxv = Reduce8(sxv);
    }
    out[j] = f;
  }
}

void Avx2EvalAffine(const float* x, const float* w, int n, const BlockCand* c, int k, float lo,
                    float hi, bool sums, BlockFit* out) {
  if (w != nullptr) {
    sums ? EvalAffineT<true, true>(x, w, n, c, k, lo, hi, out)
         : EvalAffineT<true, false>(x, w, n, c, k, lo, hi, out);
  } else {
    sums ? EvalAffineT<false, true>(x, w, n, c, k, lo, hi, out)
         : EvalAffineT<false, false>(x, w, n, c, k, lo, hi, out);
  }
}

// The grid value nearest to t: the number of midpoints strictly below t
// (compare ordered, greater-than, as the scalar t > mid), then a lookup in
// the two halves of the table.
struct GridVectors {
  __m256 mid[15];
  __m256 low, high;
  explicit GridVectors(const CodeGrid& g) {
    for (int m = 0; m < 15; ++m) mid[m] = _mm256_set1_ps(g.mid[m]);
    low = _mm256_loadu_ps(g.value);
    high = _mm256_loadu_ps(g.value + 8);
  }
  inline __m256 Value(__m256 t) const {
    __m256i idx = _mm256_setzero_si256();
    for (int m = 0; m < 15; ++m) {
      idx = _mm256_sub_epi32(idx, _mm256_castps_si256(_mm256_cmp_ps(t, mid[m], _CMP_GT_OQ)));
    }
    const __m256 vl = _mm256_permutevar8x32_ps(low, idx);
    const __m256 vh = _mm256_permutevar8x32_ps(high, idx);
    const __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
    return _mm256_blendv_ps(vl, vh, upper);
  }
};

template <bool kWeighted, bool kSums>
void EvalGridT(const float* x, const float* w, int n, const BlockCand* c, int k,
               const GridVectors& g, BlockFit* out) {
  for (int j = 0; j < k; ++j) {
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
    BlockFit f{Reduce8(err), 0.0f, 0.0f, 0.0f};
    if constexpr (kSums) {
      f.svv = Reduce8(svv);
      f.sxv = Reduce8(sxv);
    }
    out[j] = f;
  }
}

void Avx2EvalGrid(const float* x, const float* w, int n, const BlockCand* c, int k,
                  const CodeGrid& grid, bool sums, BlockFit* out) {
  const GridVectors g(grid);
  if (w != nullptr) {
    sums ? EvalGridT<true, true>(x, w, n, c, k, g, out) : EvalGridT<true, false>(x, w, n, c, k, g, out);
  } else {
    sums ? EvalGridT<false, true>(x, w, n, c, k, g, out)
         : EvalGridT<false, false>(x, w, n, c, k, g, out);
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
    __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(x + i), vb), vinv), kRound);
    v = _mm256_min_ps(vhi, _mm256_max_ps(vlo, v));
    StoreCodes(_mm256_cvttps_epi32(v), q + i);
  }
}

void Avx2CodesGrid(const float* x, int n, float a, const CodeGrid& grid, int8_t* q) {
  const float inv = a != 0.0f ? 1.0f / a : 0.0f;
  const __m256 vinv = _mm256_set1_ps(inv);
  __m256 mid[15];
  for (int m = 0; m < 15; ++m) mid[m] = _mm256_set1_ps(grid.mid[m]);
  for (int i = 0; i < n; i += 8) {
    const __m256 t = _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv);
    __m256i idx = _mm256_setzero_si256();
    for (int m = 0; m < 15; ++m) {
      idx = _mm256_sub_epi32(idx, _mm256_castps_si256(_mm256_cmp_ps(t, mid[m], _CMP_GT_OQ)));
    }
    StoreCodes(idx, q + i);
  }
}

const BlockPasses kAvx2BlockPasses = {"avx2", Avx2EvalAffine, Avx2EvalGrid, Avx2CodesAffine,
                                      Avx2CodesGrid};

}  // namespace

const BlockPasses* Avx2BlockPasses() { return CpuHasAvx2() ? &kAvx2BlockPasses : nullptr; }

}  // namespace arrowquant::kernels
