// AVX2 + F16C kernels: the scalar path's float32 arithmetic on 8 lanes at a
// time, giving the same bytes and parameters (avx2_test.cc compares them).
//
// Why the results are identical: conversions are exact; min/max is exact in
// any order (-0/+0 are canonicalized as RtnGroupParams does); the parameter
// formulas are RtnGroupParams' float32 operations, lane by lane for eight
// groups at once; the code formula uses the same operations in the same
// order (mul, add, round half to even, max, min) and no FMA; the inverse
// 1/scale is the same float the scalar path computes.
//
// Only the error sums use FMA and a different summation order; they are
// metrics, compared with a tolerance. They are accumulated in float32 lanes,
// flushed to double every 256 elements, when every group of a block keeps
// squares far from float32 overflow and underflow; otherwise in double like
// the scalar path.
//
// A row is processed in blocks of up to 8 groups (about 4K elements): one
// scan of the block (conversion into an L1-sized buffer, min/max per group,
// NaN/Inf check, squares), the parameters of its 8 groups in one vector
// pass, then codes and errors. Groups of a block do not wait on each other,
// so per-group work overlaps.
#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/param_search.h"
#include "kernels/row_kernels.h"

namespace arrowquant::kernels {
namespace {

// ---------------------------------------------------------------------------
// Loading 8 elements of each input type as float32 (exact).

const std::array<float, 256>& F8E4M3Table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = F8E4M3ToFloat(static_cast<uint8_t>(i));
    return t;
  }();
  return table;
}

struct LoadF32 {
  static constexpr bool kCopies = false;  // the source is already float32
  const float* p;
  __m256 Load8(int64_t i) const { return _mm256_loadu_ps(p + i); }
  float Load1(int64_t i) const { return p[i]; }
};

struct LoadF16 {
  static constexpr bool kCopies = true;
  const uint16_t* p;
  __m256 Load8(int64_t i) const {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i)));
  }
  float Load1(int64_t i) const { return HalfToFloat(p[i]); }
};

struct LoadBF16 {
  static constexpr bool kCopies = true;
  const uint16_t* p;
  __m256 Load8(int64_t i) const {
    const __m256i w =
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  float Load1(int64_t i) const { return BFloat16ToFloat(p[i]); }
};

struct LoadF8E5M2 {  // the high byte of an IEEE half
  static constexpr bool kCopies = true;
  const uint8_t* p;
  __m256 Load8(int64_t i) const {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + i));
    return _mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(b), 8));
  }
  float Load1(int64_t i) const { return F8E5M2ToFloat(p[i]); }
};

struct LoadF8E4M3 {  // 256-entry table
  static constexpr bool kCopies = true;
  const uint8_t* p;
  const float* table;
  __m256 Load8(int64_t i) const {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + i));
    return _mm256_i32gather_ps(table, _mm256_cvtepu8_epi32(b), 4);
  }
  float Load1(int64_t i) const { return table[p[i]]; }
};

// Calls fn(loader) with the loader of dtype over `src`.
template <typename Fn>
auto WithLoader(DType dtype, const void* src, Fn&& fn) {
  switch (dtype) {
    case DType::kF16:
      return fn(LoadF16{static_cast<const uint16_t*>(src)});
    case DType::kBF16:
      return fn(LoadBF16{static_cast<const uint16_t*>(src)});
    case DType::kF8E5M2:
      return fn(LoadF8E5M2{static_cast<const uint8_t*>(src)});
    case DType::kF8E4M3:
      return fn(LoadF8E4M3{static_cast<const uint8_t*>(src), F8E4M3Table().data()});
    default:
      return fn(LoadF32{static_cast<const float*>(src)});
  }
}

// ---------------------------------------------------------------------------
// Horizontal reductions.

float HMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

uint32_t HMaxU32(__m256i v) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}

double HSum(__m256d v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

// Float bits with the sign cleared; >= 0x7F800000 means Inf or NaN.
constexpr uint32_t kAbsMask = 0x7FFFFFFFu;
constexpr uint32_t kInfBits = 0x7F800000u;

uint32_t AbsBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u & kAbsMask;
}

// ---------------------------------------------------------------------------
// Conversion.

void Avx2Convert(DType dtype, const void* src, float* dst, size_t n) {
  if (dtype == DType::kF32) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
  WithLoader(dtype, src, [&](auto ld) {
    const int64_t count = static_cast<int64_t>(n);
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) _mm256_storeu_ps(dst + i, ld.Load8(i));
    for (; i < count; ++i) dst[i] = ld.Load1(i);
    return 0;
  });
}

inline __m256d Widen(__m256 v) {
  return _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                       _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

// Lane k of the result is op over the 8 lanes of v[k] (a transposing
// reduction: 8 groups' min or max in 21 instructions).
template <typename Op>
__m256 TransposeReduce(const __m256* v, Op op) {
  auto pair = [&](__m256 a, __m256 b) {
    return op(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
  };
  auto quad = [&](__m256 a, __m256 b) {
    const __m256d ad = _mm256_castps_pd(a), bd = _mm256_castps_pd(b);
    return op(_mm256_castpd_ps(_mm256_unpacklo_pd(ad, bd)),
              _mm256_castpd_ps(_mm256_unpackhi_pd(ad, bd)));
  };
  const __m256 b0 = quad(pair(v[0], v[1]), pair(v[2], v[3]));  // groups 0-3, two halves
  const __m256 b1 = quad(pair(v[4], v[5]), pair(v[6], v[7]));  // groups 4-7
  return op(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

// ---------------------------------------------------------------------------
// Block scan: groups [b0 + k g, b0 + min((k + 1) g, total)) for k < count.

struct BlockScan {
  __m256 lo;  // lane k: min of group k (0 for k >= count)
  __m256 hi;  // lane k: max of group k
  // True: no NaN or Inf in the block. False: maybe one; with squares the
  // test is that their sum stays finite (NaN and Inf propagate, so it costs
  // nothing extra), which also fails for finite |x| > 1.8e19 whose square
  // overflows: the caller then checks exactly.
  bool clean;
  // Sum of x^2 over the block's elements that the vector loops covered
  // (tails of groups are left to the encoder), float32 partials widened.
  __m256d x2;
};

// Converts the block into buf[0, total) when the source is not float32.
template <bool kSquares, typename Loader>
BlockScan ScanBlock(const Loader& ld, int64_t b0, int64_t g, int64_t count, int64_t total,
                    float* buf) {
  const __m256i abs_mask = _mm256_set1_epi32(static_cast<int>(kAbsMask));
  __m256i vbits = _mm256_setzero_si256();
  uint32_t tail_bits = 0;
  __m256 sa = _mm256_setzero_ps(), sb = _mm256_setzero_ps();
  __m256d x2 = _mm256_setzero_pd();
  int steps = 0;
  __m256 los[8], his[8];
  for (int64_t k = 0; k < count; ++k) {
    const int64_t c0 = k * g;
    const int64_t end = std::min(c0 + g, total);
    __m256 vlo = _mm256_set1_ps(INFINITY);
    __m256 vhi = _mm256_set1_ps(-INFINITY);
    int64_t i = c0;
    for (; i + 16 <= end; i += 16) {
      const __m256 a = ld.Load8(b0 + i);
      const __m256 b = ld.Load8(b0 + i + 8);
      if constexpr (Loader::kCopies) {
        _mm256_storeu_ps(buf + i, a);
        _mm256_storeu_ps(buf + i + 8, b);
      }
      vlo = _mm256_min_ps(vlo, _mm256_min_ps(a, b));
      vhi = _mm256_max_ps(vhi, _mm256_max_ps(a, b));
      if constexpr (!kSquares) {
        // Unsigned max of |bits|: Inf and NaN are the largest patterns.
        const __m256i ab = _mm256_max_epu32(_mm256_and_si256(_mm256_castps_si256(a), abs_mask),
                                            _mm256_and_si256(_mm256_castps_si256(b), abs_mask));
        vbits = _mm256_max_epu32(vbits, ab);
      } else {
        sa = _mm256_fmadd_ps(a, a, sa);
        sb = _mm256_fmadd_ps(b, b, sb);
        if (++steps == 16) {  // at most 16 float additions per lane
          x2 = _mm256_add_pd(x2, Widen(_mm256_add_ps(sa, sb)));
          sa = sb = _mm256_setzero_ps();
          steps = 0;
        }
      }
    }
    for (; i + 8 <= end; i += 8) {
      const __m256 a = ld.Load8(b0 + i);
      if constexpr (Loader::kCopies) _mm256_storeu_ps(buf + i, a);
      vlo = _mm256_min_ps(vlo, a);
      vhi = _mm256_max_ps(vhi, a);
      if constexpr (!kSquares) {
        vbits = _mm256_max_epu32(vbits, _mm256_and_si256(_mm256_castps_si256(a), abs_mask));
      } else {
        sa = _mm256_fmadd_ps(a, a, sa);
      }
    }
    for (; i < end; ++i) {
      const float v = ld.Load1(b0 + i);
      if constexpr (Loader::kCopies) buf[i] = v;
      vlo = _mm256_min_ps(vlo, _mm256_set1_ps(v));
      vhi = _mm256_max_ps(vhi, _mm256_set1_ps(v));
      tail_bits = std::max(tail_bits, AbsBits(v));
    }
    los[k] = vlo;
    his[k] = vhi;
  }
  for (int64_t k = count; k < 8; ++k) los[k] = his[k] = _mm256_setzero_ps();
  if constexpr (kSquares) x2 = _mm256_add_pd(x2, Widen(_mm256_add_ps(sa, sb)));
  const auto vmin = [](__m256 a, __m256 b) { return _mm256_min_ps(a, b); };
  const auto vmax = [](__m256 a, __m256 b) { return _mm256_max_ps(a, b); };
  bool clean = std::max(HMaxU32(vbits), tail_bits) < kInfBits;
  if constexpr (kSquares) clean = clean && std::isfinite(HSum(x2));
  return BlockScan{TransposeReduce(los, vmin), TransposeReduce(his, vmax), clean, x2};
}

// ---------------------------------------------------------------------------
// Error sums of one row.

struct RowSums {
  // Vector part: sums of x^2, x_hat^2, (x - x_hat)^2 flushed from float32
  // partials; sum x * x_hat of this part is (sx2 + sh2 - se2) / 2, which
  // equals it exactly in real arithmetic and keeps the cosine accurate.
  __m256d x2 = _mm256_setzero_pd();
  __m256d h2 = _mm256_setzero_pd();
  __m256d e2 = _mm256_setzero_pd();
  __m256 emax = _mm256_setzero_ps();  // max |x - x_hat| of the vector part
  // Scalar part (tails and groups summed in double), as the scalar path.
  double sx2 = 0, sh2 = 0, sxh = 0, se2 = 0, semax = 0;

  void AddScalar(float x, float xhat) {
    const double xd = x, hd = xhat, e = xd - hd;
    sx2 += xd * xd;
    sh2 += hd * hd;
    sxh += xd * hd;
    se2 += e * e;
    semax = std::max(semax, std::fabs(e));
  }

  void Flush(__m256 fh2, __m256 fe2) {
    h2 = _mm256_add_pd(h2, Widen(fh2));
    e2 = _mm256_add_pd(e2, Widen(fe2));
  }

  void AddTo(ErrorStats* stats, int64_t count) const {
    const double vx2 = HSum(x2), vh2 = HSum(h2), ve2 = HSum(e2);
    stats->sum_x2 += sx2 + vx2;
    stats->sum_xhat2 += sh2 + vh2;
    stats->sum_x_xhat += sxh + 0.5 * (vx2 + vh2 - ve2);
    stats->sum_err2 += se2 + ve2;
    const double vmax = HMax(emax);
    stats->max_abs_err = std::max({stats->max_abs_err, semax, vmax});
    stats->count += count;
  }
};

// ---------------------------------------------------------------------------
// Parameters of up to 8 groups, one per lane: RtnGroupParams' float32
// operations (three divisions for eight groups, no branch per group).

struct BlockParamsResult {
  int overflow;     // index of the first group whose max - min overflows, or -1
  bool float_sums;  // error sums of every group may use float32 partials
};

// Writes scales, zero points and inv = 1.0f / scale of groups [0, count)
// (nothing when a group overflows).
BlockParamsResult BlockParams(__m256 vlo, __m256 vhi, int64_t count, const QuantSpec& spec,
                              float* scales, float* zero_points, float* inv) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(kAbsMask)));
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0x80000000u)));
  const __m256 inf = _mm256_set1_ps(INFINITY), one = _mm256_set1_ps(1.0f);
  const __m256 zero = _mm256_setzero_ps();
  const auto finite = [&](__m256 v) {
    return _mm256_cmp_ps(_mm256_and_ps(v, abs_mask), inf, _CMP_LT_OQ);
  };
  const int lanes = (1 << count) - 1;
  const float q_max = static_cast<float>((1 << spec.bits) - 1);
  int overflow = 0;
  __m256 s, z;
  if (spec.scheme == Scheme::kSymmetric) {
    const __m256 a = _mm256_max_ps(_mm256_and_ps(vlo, abs_mask), _mm256_and_ps(vhi, abs_mask));
    const __m256 m = _mm256_set1_ps(static_cast<float>((1 << (spec.bits - 1)) - 1));
    const __m256 sa = _mm256_div_ps(a, m);
    const __m256 ok = _mm256_and_ps(
        _mm256_and_ps(_mm256_cmp_ps(a, zero, _CMP_GT_OQ), _mm256_cmp_ps(sa, zero, _CMP_NEQ_OQ)),
        finite(_mm256_div_ps(one, sa)));
    s = _mm256_blendv_ps(one, sa, ok);
    z = _mm256_set1_ps(static_cast<float>(1 << (spec.bits - 1)));
  } else {
    const __m256 l = _mm256_add_ps(vlo, zero);  // -0 -> +0, as RtnGroupParams
    const __m256 h = _mm256_add_ps(vhi, zero);
    const __m256 spread = _mm256_cmp_ps(h, l, _CMP_GT_OQ);
    const __m256 sa = _mm256_div_ps(_mm256_sub_ps(h, l), _mm256_set1_ps(q_max));
    const __m256 sa_finite = finite(sa);
    overflow = _mm256_movemask_ps(_mm256_andnot_ps(sa_finite, spread)) & lanes;
    const __m256 ok = _mm256_and_ps(
        _mm256_and_ps(spread, sa_finite),
        _mm256_and_ps(_mm256_cmp_ps(sa, zero, _CMP_NEQ_OQ), finite(_mm256_div_ps(one, sa))));
    const __m256 neg_l = _mm256_xor_ps(l, sign);
    z = _mm256_blendv_ps(neg_l, _mm256_div_ps(neg_l, sa), ok);
    s = _mm256_blendv_ps(one, sa, ok);
  }
  if (overflow != 0) return {__builtin_ctz(static_cast<unsigned>(overflow)), false};
  // Float32 partial sums are safe when squares of every value and of every
  // reconstruction stay far inside float32 range (and are not all tiny).
  const __m256 mag = _mm256_max_ps(_mm256_and_ps(vlo, abs_mask), _mm256_and_ps(vhi, abs_mask));
  const __m256 mag_ok =
      _mm256_or_ps(_mm256_cmp_ps(mag, zero, _CMP_EQ_OQ),
                   _mm256_and_ps(_mm256_cmp_ps(mag, _mm256_set1_ps(0x1p-40f), _CMP_GE_OQ),
                                 _mm256_cmp_ps(mag, _mm256_set1_ps(0x1p40f), _CMP_LE_OQ)));
  const __m256 reach =
      _mm256_mul_ps(_mm256_add_ps(_mm256_set1_ps(q_max), _mm256_and_ps(z, abs_mask)), s);
  const __m256 safe =
      _mm256_and_ps(mag_ok, _mm256_cmp_ps(reach, _mm256_set1_ps(0x1p41f), _CMP_LE_OQ));
  alignas(32) float s_out[8], z_out[8], i_out[8];
  _mm256_store_ps(s_out, s);
  _mm256_store_ps(z_out, z);
  _mm256_store_ps(i_out, _mm256_div_ps(one, s));
  for (int64_t k = 0; k < count; ++k) {
    scales[k] = s_out[k];
    zero_points[k] = z_out[k];
    inv[k] = i_out[k];
  }
  return {-1, (_mm256_movemask_ps(safe) & lanes) == lanes};
}

// ---------------------------------------------------------------------------
// Encoding one group: codes (one byte each) into `codes`, error into sums.

// Eight int32 codes -> eight bytes.
inline void StoreCodes8(__m256i q, uint8_t* dst) {
  const __m256i w = _mm256_packus_epi16(_mm256_packs_epi32(q, q), _mm256_setzero_si256());
  const __m128i lo = _mm256_castsi256_si128(w);
  const __m128i hi = _mm256_extracti128_si256(w, 1);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_unpacklo_epi32(lo, hi));
}

// Thirty-two int32 codes -> thirty-two bytes.
inline void StoreCodes32(__m256i q0, __m256i q1, __m256i q2, __m256i q3, uint8_t* dst) {
  const __m256i w = _mm256_packus_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permutevar8x32_epi32(w, order));
}

template <bool kSymmetric>
struct GroupEncoder {
  float s, z, inv, q_max;
  __m256 vs, vz, vinv, vq, v0;

  // `inverse` is 1.0f / scale (computed by the caller, possibly 8 at once).
  GroupEncoder(float scale, float zero_point, float inverse, float qmax)
      : s(scale), z(zero_point), inv(inverse), q_max(qmax) {
    vs = _mm256_set1_ps(s);
    vz = _mm256_set1_ps(z);
    vinv = _mm256_set1_ps(inv);
    vq = _mm256_set1_ps(q_max);
    v0 = _mm256_setzero_ps();
  }

  // Clamped code as a float (an integer in [0, Q]).
  __m256 Code(__m256 x) const {
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    __m256 t;
    if constexpr (kSymmetric) {
      t = _mm256_add_ps(_mm256_round_ps(_mm256_mul_ps(x, vinv), kRound), vz);
    } else {
      t = _mm256_round_ps(_mm256_add_ps(_mm256_mul_ps(x, vinv), vz), kRound);
    }
    return _mm256_min_ps(_mm256_max_ps(t, v0), vq);
  }

  // The scalar path's formula for one element.
  uint8_t Code1(float x) const {
    float v = kSymmetric ? std::nearbyint(x * inv) + z : std::nearbyint(x * inv + z);
    v = std::min(std::max(v, 0.0f), q_max);
    return static_cast<uint8_t>(v);
  }

  __m256 Dequant(__m256 code) const { return _mm256_mul_ps(_mm256_sub_ps(code, vz), vs); }
  float Dequant1(uint8_t q) const { return (static_cast<float>(q) - z) * s; }
};

// One group without error sums.
template <bool kSymmetric>
void EncodeGroupNoStats(const GroupEncoder<kSymmetric>& enc, const float* x, int64_t n,
                        uint8_t* codes) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i q0 = _mm256_cvttps_epi32(enc.Code(_mm256_loadu_ps(x + i)));
    const __m256i q1 = _mm256_cvttps_epi32(enc.Code(_mm256_loadu_ps(x + i + 8)));
    const __m256i q2 = _mm256_cvttps_epi32(enc.Code(_mm256_loadu_ps(x + i + 16)));
    const __m256i q3 = _mm256_cvttps_epi32(enc.Code(_mm256_loadu_ps(x + i + 24)));
    StoreCodes32(q0, q1, q2, q3, codes + i);
  }
  for (; i + 8 <= n; i += 8) {
    StoreCodes8(_mm256_cvttps_epi32(enc.Code(_mm256_loadu_ps(x + i))), codes + i);
  }
  for (; i < n; ++i) codes[i] = enc.Code1(x[i]);
}

// Sixteen int32 codes -> sixteen bytes.
// (Immediate shuffles only: no index vector to hold in a register.)
inline void StoreCodes16(__m256i q0, __m256i q1, uint8_t* dst) {
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), _MM_SHUFFLE(3, 1, 2, 0));
  const __m128i b = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), b);
}

// Groups [k g, min((k + 1) g, total)) of x, k < count, with parameters s,
// z, inv[k]: codes, and error sums in float32 partials (the caller checked
// that they are safe; it adds the sum of x^2, which the scan computed).
// Sixteen elements per step; the two halves are combined before they meet
// the accumulators, so that the loop carries only three vectors (short
// dependency chains, nothing spilled from the 16 registers), and they stay
// in registers across the groups.
template <bool kSymmetric>
void EncodeRunFloatSums(const float* x, int64_t g, int64_t count, int64_t total,
                        const float* scales, const float* zero_points, const float* inv,
                        float q_max, uint8_t* codes, RowSums* sums) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(kAbsMask)));
  __m256 sh2 = _mm256_setzero_ps(), se2 = _mm256_setzero_ps();
  __m256 emax = sums->emax;
  int steps = 0;
  for (int64_t k = 0; k < count; ++k) {
    const GroupEncoder<kSymmetric> enc(scales[k], zero_points[k], inv[k], q_max);
    const int64_t end = std::min((k + 1) * g, total);
    int64_t i = k * g;
    for (; i + 16 <= end; i += 16) {
      const __m256 x0 = _mm256_loadu_ps(x + i);
      const __m256 c0 = enc.Code(x0);
      const __m256 x1 = _mm256_loadu_ps(x + i + 8);
      const __m256 c1 = enc.Code(x1);
      StoreCodes16(_mm256_cvttps_epi32(c0), _mm256_cvttps_epi32(c1), codes + i);
      const __m256 h0 = enc.Dequant(c0), h1 = enc.Dequant(c1);
      const __m256 e0 = _mm256_sub_ps(x0, h0), e1 = _mm256_sub_ps(x1, h1);
      sh2 = _mm256_add_ps(sh2, _mm256_fmadd_ps(h0, h0, _mm256_mul_ps(h1, h1)));
      se2 = _mm256_add_ps(se2, _mm256_fmadd_ps(e0, e0, _mm256_mul_ps(e1, e1)));
      const __m256 a0 = _mm256_and_ps(e0, abs_mask), a1 = _mm256_and_ps(e1, abs_mask);
      emax = _mm256_max_ps(emax, _mm256_max_ps(a0, a1));
      if (++steps == 16) {  // at most 16 float additions per lane
        sums->Flush(sh2, se2);
        sh2 = se2 = _mm256_setzero_ps();
        steps = 0;
      }
    }
    for (; i + 8 <= end; i += 8) {
      const __m256 xv = _mm256_loadu_ps(x + i);
      const __m256 cv = enc.Code(xv);
      StoreCodes8(_mm256_cvttps_epi32(cv), codes + i);
      const __m256 h = enc.Dequant(cv);
      const __m256 e = _mm256_sub_ps(xv, h);
      sh2 = _mm256_fmadd_ps(h, h, sh2);
      se2 = _mm256_fmadd_ps(e, e, se2);
      emax = _mm256_max_ps(emax, _mm256_and_ps(e, abs_mask));
    }
    for (; i < end; ++i) {
      codes[i] = enc.Code1(x[i]);
      sums->AddScalar(x[i], enc.Dequant1(codes[i]));
    }
  }
  sums->Flush(sh2, se2);
  sums->emax = emax;
}

// The same groups without error sums (sums == nullptr), or with them in
// double from the codes (groups whose squares float32 cannot hold).
template <bool kSymmetric>
void EncodeRunDouble(const float* x, int64_t g, int64_t count, int64_t total, const float* scales,
                     const float* zero_points, const float* inv, float q_max, uint8_t* codes,
                     RowSums* sums) {
  for (int64_t k = 0; k < count; ++k) {
    const GroupEncoder<kSymmetric> enc(scales[k], zero_points[k], inv[k], q_max);
    const int64_t c0 = k * g;
    const int64_t n = std::min(c0 + g, total) - c0;
    EncodeGroupNoStats(enc, x + c0, n, codes + c0);
    if (sums != nullptr) {
      for (int64_t i = c0; i < c0 + n; ++i) sums->AddScalar(x[i], enc.Dequant1(codes[i]));
    }
  }
}

// Codes of a run of groups, and their error (when sums is not null): in
// float32 partials when `float_sums` (x2 is then the run's sum of x^2 from
// the scan), else in double.
void EncodeRun(const QuantSpec& spec, const float* x, int64_t g, int64_t count, int64_t total,
               const float* scales, const float* zero_points, const float* inv, bool float_sums,
               __m256d x2, uint8_t* codes, RowSums* sums) {
  const float q_max = static_cast<float>((1 << spec.bits) - 1);
  const bool sym = spec.scheme == Scheme::kSymmetric;
  if (sums != nullptr && float_sums) {
    if (sym) {
      EncodeRunFloatSums<true>(x, g, count, total, scales, zero_points, inv, q_max, codes, sums);
    } else {
      EncodeRunFloatSums<false>(x, g, count, total, scales, zero_points, inv, q_max, codes, sums);
    }
    sums->x2 = _mm256_add_pd(sums->x2, x2);
  } else if (sym) {
    EncodeRunDouble<true>(x, g, count, total, scales, zero_points, inv, q_max, codes, sums);
  } else {
    EncodeRunDouble<false>(x, g, count, total, scales, zero_points, inv, q_max, codes, sums);
  }
}

// ---------------------------------------------------------------------------
// Packing a row of one-byte codes (FORMAT.md section 3).

void PackCodes(const uint8_t* codes, int64_t cols, int bits, uint8_t* packed_row) {
  const int64_t row_bytes = PackedRowBytes(cols, bits);
  int64_t c = 0;
  if (bits == 4) {
    // maddubs: byte pair (a, b) -> a + 16 b, i.e. a in bits 0-3, b in 4-7.
    const __m256i pair = _mm256_set1_epi16(0x1001);
    for (; c + 64 <= cols; c += 64) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + c));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + c + 32));
      const __m256i w =
          _mm256_packus_epi16(_mm256_maddubs_epi16(a, pair), _mm256_maddubs_epi16(b, pair));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(packed_row + c / 2),
                          _mm256_permute4x64_epi64(w, _MM_SHUFFLE(3, 1, 2, 0)));
    }
  } else if (bits == 2) {
    // (a, b) -> a + 4 b in 16 bits, then (ab, cd) -> ab + 16 cd in 32 bits.
    const __m256i pair = _mm256_set1_epi16(0x0401);
    const __m256i quad = _mm256_set1_epi32(0x00100001);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; c + 128 <= cols; c += 128) {
      __m256i v[4];
      for (int k = 0; k < 4; ++k) {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + c + 32 * k));
        v[k] = _mm256_madd_epi16(_mm256_maddubs_epi16(b, pair), quad);
      }
      const __m256i w =
          _mm256_packus_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(packed_row + c / 4),
                          _mm256_permutevar8x32_epi32(w, order));
    }
  }
  // Tail: whole bytes from c on, unused high bits zero.
  std::fill(packed_row + (c * bits) / 8, packed_row + row_bytes, uint8_t{0});
  for (; c < cols; ++c) {
    packed_row[(c * bits) >> 3] |= static_cast<uint8_t>(codes[c] << ((c * bits) & 7));
  }
}

// Per-thread scratch of a row (one-byte codes, converted groups), reused
// from row to row; TrimScratch after a row releases a buffer larger than
// 1 MiB, so that a thread does not keep one after a very long row.
std::vector<uint8_t>& CodeBuffer() {
  thread_local std::vector<uint8_t> buf;
  return buf;
}

std::vector<float>& FloatBuffer() {
  thread_local std::vector<float> buf;
  return buf;
}

uint8_t* CodeScratch(int64_t n) {
  std::vector<uint8_t>& buf = CodeBuffer();
  if (buf.size() < static_cast<size_t>(n)) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

float* FloatScratch(int64_t n) {
  std::vector<float>& buf = FloatBuffer();
  if (buf.size() < static_cast<size_t>(n)) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

void TrimScratch() {
  constexpr size_t kKeepBytes = size_t{1} << 20;
  if (CodeBuffer().capacity() > kKeepBytes) std::vector<uint8_t>().swap(CodeBuffer());
  if (FloatBuffer().capacity() * sizeof(float) > kKeepBytes) {
    std::vector<float>().swap(FloatBuffer());
  }
}

// ---------------------------------------------------------------------------
// The four RowKernels operations.

// Blocks of up to 8 groups and about 4K elements.
constexpr int64_t kBlockElements = 4096;
int64_t GroupsPerBlock(int64_t g) { return std::clamp<int64_t>(kBlockElements / g, 1, 8); }

Status OverflowError(const BlockScan& scan, int k, const QuantSpec& spec, int64_t row,
                     int64_t group) {
  // RtnGroupParams of {lo, hi} is that of the group (its min is lo, its max
  // hi): it words the error exactly as the scalar path.
  alignas(32) float lo[8], hi[8];
  _mm256_store_ps(lo, scan.lo);
  _mm256_store_ps(hi, scan.hi);
  const float ends[2] = {lo[k], hi[k]};
  float s, z;
  Status st = RtnGroupParams(ends, 2, spec.bits, spec.scheme, &s, &z);
  if (st.ok()) st = Status::Internal("vector and scalar group parameters disagree");
  return st.WithContext("row " + std::to_string(row) + ", group " + std::to_string(group));
}

Status Avx2ChooseParams(const float* x, int64_t cols, const QuantSpec& spec, float* scales,
                        float* zero_points, int64_t row) {
  if (spec.method != Method::kRtn || spec.param_dtype != ParamDType::kF32) {
    return ChooseParamsWith(*Avx2SearchPasses(), x, cols, spec, scales, zero_points, row);
  }
  const int64_t g = spec.group_size;
  const int64_t G = GroupsPerRow(cols, g);
  const int64_t per_block = GroupsPerBlock(g);
  float inv[8];
  for (int64_t j0 = 0; j0 < G; j0 += per_block) {
    const int64_t count = std::min(per_block, G - j0);
    const int64_t b0 = j0 * g;
    const BlockScan scan =
        ScanBlock<false>(LoadF32{x}, b0, g, count, std::min(count * g, cols - b0), nullptr);
    const BlockParamsResult r =
        BlockParams(scan.lo, scan.hi, count, spec, scales + j0, zero_points + j0, inv);
    if (r.overflow >= 0) return OverflowError(scan, r.overflow, spec, row, j0 + r.overflow);
  }
  return Status::OK();
}

void Avx2Encode(const float* x, int64_t cols, const QuantSpec& spec, const float* scales,
                const float* zero_points, uint8_t* packed_row, ErrorStats* stats) {
  uint8_t* codes = spec.bits == 8 ? packed_row : CodeScratch(cols);
  RowSums sums;
  RowSums* sp = stats != nullptr ? &sums : nullptr;
  const int64_t g = spec.group_size;
  const float q_max = static_cast<float>((1 << spec.bits) - 1);
  for (int64_t j = 0, c0 = 0; c0 < cols; ++j, c0 += g) {
    const int64_t n = std::min(g, cols - c0);
    const float inv = 1.0f / scales[j];
    bool float_sums = false;
    __m256d x2 = _mm256_setzero_pd();
    if (sp != nullptr) {
      // The caller's parameters: check the group's range for float32 sums.
      const BlockScan scan = ScanBlock<true>(LoadF32{x}, c0, n, 1, n, nullptr);
      alignas(32) float lo[8], hi[8];
      _mm256_store_ps(lo, scan.lo);
      _mm256_store_ps(hi, scan.hi);
      const float mag = std::max(std::fabs(lo[0]), std::fabs(hi[0]));
      const float reach = (q_max + std::fabs(zero_points[j])) * scales[j];
      float_sums = (mag == 0.0f || (mag >= 0x1p-40f && mag <= 0x1p40f)) && reach <= 0x1p41f;
      x2 = scan.x2;
    }
    EncodeRun(spec, x + c0, n, 1, n, scales + j, zero_points + j, &inv, float_sums, x2, codes + c0,
              sp);
  }
  if (spec.bits != 8) PackCodes(codes, cols, spec.bits, packed_row);
  if (stats != nullptr) sums.AddTo(stats, cols);
  TrimScratch();
}

void Avx2Decode(const uint8_t* packed_row, int64_t cols, const QuantSpec& spec, const float* scales,
                const float* zero_points, float* out) {
  const int bits = spec.bits;
  const int64_t g = spec.group_size;
  const int64_t row_bytes = PackedRowBytes(cols, bits);
  const uint8_t mask = static_cast<uint8_t>((1 << bits) - 1);
  // Lane k takes the code at bit k * bits of a 32-bit word.
  const __m256i shifts =
      _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bits));
  const __m256i vmask = _mm256_set1_epi32(mask);
  for (int64_t j = 0, c0 = 0; c0 < cols; ++j, c0 += g) {
    const int64_t end = std::min(c0 + g, cols);
    const float s = scales[j], z = zero_points[j];
    const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
    int64_t c = c0;
    // Eight codes span at most 8 bytes from the byte holding the first one.
    for (; c + 8 <= end && ((c * bits) >> 3) + 8 <= row_bytes; c += 8) {
      const int64_t bit = c * bits;
      __m256i q;
      if (bits == 8) {
        q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed_row + c)));
      } else {
        uint64_t w;
        std::memcpy(&w, packed_row + (bit >> 3), sizeof w);
        const auto word = static_cast<uint32_t>(w >> (bit & 7));
        q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts),
                             vmask);
      }
      const __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), vz), vs);
      _mm256_storeu_ps(out + c, v);
    }
    for (; c < end; ++c) {
      const uint8_t q = (packed_row[(c * bits) >> 3] >> ((c * bits) & 7)) & mask;
      out[c] = (static_cast<float>(q) - z) * s;
    }
  }
}

// ---------------------------------------------------------------------------
// The fused rtn row, block by block: one scan of the block (conversion,
// min/max, NaN/Inf, squares), its parameters, then codes and errors from the
// converted block while it is in L1.

Status RowFiniteError(DType dtype, const void* src, int64_t cols, int64_t row) {
  std::vector<float> x(static_cast<size_t>(cols));
  ConvertToFloat32(dtype, src, x.data(), x.size());
  return CheckFiniteRow(x.data(), cols, row);
}

template <typename Loader>
Status FusedRow(const Loader& ld, DType dtype, const void* src, int64_t cols, const QuantSpec& spec,
                float* scales, float* zero_points, uint8_t* packed_row, ErrorStats* stats,
                int64_t row) {
  const int64_t g = spec.group_size;
  const int64_t G = GroupsPerRow(cols, g);
  const int64_t per_block = GroupsPerBlock(g);
  float* buf = Loader::kCopies ? FloatScratch(std::min(g * per_block, cols)) : nullptr;
  uint8_t* codes = spec.bits == 8 ? packed_row : CodeScratch(cols);
  RowSums sums;
  RowSums* sp = stats != nullptr ? &sums : nullptr;
  float inv[8];
  bool row_checked = false;  // the whole row is known to be finite
  for (int64_t j0 = 0; j0 < G; j0 += per_block) {
    const int64_t count = std::min(per_block, G - j0);
    const int64_t b0 = j0 * g;  // first column of the block
    const int64_t total = std::min(count * g, cols - b0);
    const BlockScan scan = sp != nullptr ? ScanBlock<true>(ld, b0, g, count, total, buf)
                                         : ScanBlock<false>(ld, b0, g, count, total, buf);
    if (!scan.clean && !row_checked) {
      AQ_RETURN_NOT_OK(RowFiniteError(dtype, src, cols, row));
      row_checked = true;  // a false alarm: huge finite values
    }
    const BlockParamsResult r =
        BlockParams(scan.lo, scan.hi, count, spec, scales + j0, zero_points + j0, inv);
    if (r.overflow >= 0) {
      // The scalar path checks the whole row for NaN/Inf first.
      Status fe = RowFiniteError(dtype, src, cols, row);
      if (!fe.ok()) return fe;
      return OverflowError(scan, r.overflow, spec, row, j0 + r.overflow);
    }
    const float* x;
    if constexpr (Loader::kCopies) {
      x = buf;
    } else {
      x = ld.p + b0;
    }
    EncodeRun(spec, x, g, count, total, scales + j0, zero_points + j0, inv, r.float_sums, scan.x2,
              codes + b0, sp);
  }
  if (spec.bits != 8) PackCodes(codes, cols, spec.bits, packed_row);
  if (stats != nullptr) sums.AddTo(stats, cols);
  TrimScratch();
  return Status::OK();
}

Status Avx2QuantizeRowRtn(DType dtype, const void* src, int64_t cols, const QuantSpec& spec,
                          float* scales, float* zero_points, uint8_t* packed_row, ErrorStats* stats,
                          int64_t row) {
  return WithLoader(dtype, src, [&](auto ld) {
    return FusedRow(ld, dtype, src, cols, spec, scales, zero_points, packed_row, stats, row);
  });
}

const RowKernels kAvx2 = {"avx2",           Avx2SearchPasses(), Avx2Convert,
                          Avx2ChooseParams, Avx2Encode,         Avx2Decode};

}  // namespace

bool CpuHasAvx2() {
  // The build compiles this file with -mavx2 -mf16c -mfma; run it only on a
  // CPU that has all three and an OS that saves the YMM registers. CPUID
  // directly (not __builtin_cpu_supports, which clang 14 lacks for f16c).
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
    const bool fma = (c & bit_FMA) != 0, f16c = (c & bit_F16C) != 0;
    const bool osxsave = (c & bit_OSXSAVE) != 0, avx = (c & bit_AVX) != 0;
    if (!(fma && f16c && osxsave && avx)) return false;
    unsigned xcr0_lo = 0, xcr0_hi = 0;
    __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & 0x6u) != 0x6u) return false;  // XMM and YMM state enabled
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    return (b & bit_AVX2) != 0;
  }();
  return ok;
}

const RowKernels* Avx2Kernels() { return CpuHasAvx2() ? &kAvx2 : nullptr; }

FusedRtnRowFn SelectFusedRtn(bool force_scalar) {
  return (!force_scalar && CpuHasAvx2()) ? Avx2QuantizeRowRtn : nullptr;
}

}  // namespace arrowquant::kernels
