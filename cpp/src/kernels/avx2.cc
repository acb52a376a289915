// AVX2 + F16C kernels: the scalar path's float32 arithmetic on 8 lanes at a
// time, giving the same bytes and parameters (avx2_test.cc compares them).
//
// Why the results are identical: conversions are exact; min/max is exact in
// any order (-0/+0 are canonicalized by RtnGroupParams, which does all
// parameter arithmetic); the code formula uses the same operations in the
// same order (mul, add, round half to even, max, min) and no FMA; the inverse
// 1/scale is the same float the scalar path computes.
//
// Only the error sums use FMA and a different summation order; they are
// metrics, compared with a tolerance. Within a group they are accumulated in
// float32 (flushed to double every few hundred elements) when the group's
// magnitudes keep squares far from float32 overflow and underflow; otherwise
// they are accumulated in double like the scalar path.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

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
    case DType::kF16: return fn(LoadF16{static_cast<const uint16_t*>(src)});
    case DType::kBF16: return fn(LoadBF16{static_cast<const uint16_t*>(src)});
    case DType::kF8E5M2: return fn(LoadF8E5M2{static_cast<const uint8_t*>(src)});
    case DType::kF8E4M3:
      return fn(LoadF8E4M3{static_cast<const uint8_t*>(src), F8E4M3Table().data()});
    default: return fn(LoadF32{static_cast<const float*>(src)});
  }
}

// ---------------------------------------------------------------------------
// Horizontal reductions.

float HMin(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

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

// ---------------------------------------------------------------------------
// Group scan: min, max and finiteness of elements [c0, c0 + n), copying the
// converted values to buf[0, n) when the source is not float32.

struct GroupRange {
  float lo;
  float hi;
  bool finite;
};

template <typename Loader>
GroupRange ScanGroup(const Loader& ld, int64_t c0, int64_t n, float* buf) {
  __m256 vlo = _mm256_set1_ps(INFINITY);
  __m256 vhi = _mm256_set1_ps(-INFINITY);
  const __m256i abs_mask = _mm256_set1_epi32(static_cast<int>(kAbsMask));
  __m256i vbits = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = ld.Load8(c0 + i);
    const __m256 b = ld.Load8(c0 + i + 8);
    if constexpr (Loader::kCopies) {
      _mm256_storeu_ps(buf + i, a);
      _mm256_storeu_ps(buf + i + 8, b);
    }
    vlo = _mm256_min_ps(vlo, _mm256_min_ps(a, b));
    vhi = _mm256_max_ps(vhi, _mm256_max_ps(a, b));
    // Unsigned max of |bits|: Inf and NaN are the largest patterns.
    const __m256i ab = _mm256_max_epu32(_mm256_and_si256(_mm256_castps_si256(a), abs_mask),
                                        _mm256_and_si256(_mm256_castps_si256(b), abs_mask));
    vbits = _mm256_max_epu32(vbits, ab);
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 a = ld.Load8(c0 + i);
    if constexpr (Loader::kCopies) _mm256_storeu_ps(buf + i, a);
    vlo = _mm256_min_ps(vlo, a);
    vhi = _mm256_max_ps(vhi, a);
    vbits = _mm256_max_epu32(vbits, _mm256_and_si256(_mm256_castps_si256(a), abs_mask));
  }
  float lo = HMin(vlo);
  float hi = HMax(vhi);
  uint32_t bits = HMaxU32(vbits);
  for (; i < n; ++i) {
    const float v = ld.Load1(c0 + i);
    if constexpr (Loader::kCopies) buf[i] = v;
    lo = std::min(lo, v);
    hi = std::max(hi, v);
    bits = std::max(bits, AbsBits(v));
  }
  return GroupRange{lo, hi, bits < kInfBits};
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
  __m256 emax = _mm256_setzero_ps();
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

  static __m256d Widen(__m256 v) {
    return _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                         _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }

  void Flush(__m256 fx2, __m256 fh2, __m256 fe2) {
    x2 = _mm256_add_pd(x2, Widen(fx2));
    h2 = _mm256_add_pd(h2, Widen(fh2));
    e2 = _mm256_add_pd(e2, Widen(fe2));
  }

  void AddTo(ErrorStats* stats, int64_t count) const {
    const double vx2 = HSum(x2), vh2 = HSum(h2), ve2 = HSum(e2);
    stats->sum_x2 += sx2 + vx2;
    stats->sum_xhat2 += sh2 + vh2;
    stats->sum_x_xhat += sxh + 0.5 * (vx2 + vh2 - ve2);
    stats->sum_err2 += se2 + ve2;
    stats->max_abs_err = std::max({stats->max_abs_err, semax, static_cast<double>(HMax(emax))});
    stats->count += count;
  }
};

// Float32 partial sums are safe when squares of every value and of every
// reconstruction stay far inside float32 range (and are not all tiny).
bool FloatSumsSafe(float magnitude, float scale, float zero_point, float q_max) {
  const float reach = (q_max + std::fabs(zero_point)) * scale;
  return (magnitude == 0.0f || (magnitude >= 0x1p-40f && magnitude <= 0x1p40f)) &&
         reach <= 0x1p41f;
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

  GroupEncoder(float scale, float zero_point, float qmax)
      : s(scale), z(zero_point), inv(1.0f / scale), q_max(qmax) {
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

// One group with error sums in float32 partials (FloatSumsSafe holds).
template <bool kSymmetric>
void EncodeGroupFloatSums(const GroupEncoder<kSymmetric>& enc, const float* x, int64_t n,
                          uint8_t* codes, RowSums* sums) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(kAbsMask)));
  __m256 ax2 = _mm256_setzero_ps(), ah2 = _mm256_setzero_ps(), ae2 = _mm256_setzero_ps();
  __m256 bx2 = _mm256_setzero_ps(), bh2 = _mm256_setzero_ps(), be2 = _mm256_setzero_ps();
  __m256 emax = sums->emax;
  auto accumulate = [&](__m256 xv, __m256 cv, __m256& sx2, __m256& sh2, __m256& se2) {
    const __m256 h = enc.Dequant(cv);
    const __m256 e = _mm256_sub_ps(xv, h);
    sx2 = _mm256_fmadd_ps(xv, xv, sx2);
    sh2 = _mm256_fmadd_ps(h, h, sh2);
    se2 = _mm256_fmadd_ps(e, e, se2);
    emax = _mm256_max_ps(emax, _mm256_and_ps(e, abs_mask));
  };
  int64_t i = 0;
  int64_t since_flush = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256 x0 = _mm256_loadu_ps(x + i);
    const __m256 x1 = _mm256_loadu_ps(x + i + 8);
    const __m256 x2 = _mm256_loadu_ps(x + i + 16);
    const __m256 x3 = _mm256_loadu_ps(x + i + 24);
    const __m256 c0 = enc.Code(x0), c1 = enc.Code(x1), c2 = enc.Code(x2), c3 = enc.Code(x3);
    StoreCodes32(_mm256_cvttps_epi32(c0), _mm256_cvttps_epi32(c1), _mm256_cvttps_epi32(c2),
                 _mm256_cvttps_epi32(c3), codes + i);
    accumulate(x0, c0, ax2, ah2, ae2);
    accumulate(x1, c1, bx2, bh2, be2);
    accumulate(x2, c2, ax2, ah2, ae2);
    accumulate(x3, c3, bx2, bh2, be2);
    // Flush every 256 elements: at most 16 float additions per lane.
    if (++since_flush == 8) {
      sums->Flush(_mm256_add_ps(ax2, bx2), _mm256_add_ps(ah2, bh2), _mm256_add_ps(ae2, be2));
      ax2 = ah2 = ae2 = bx2 = bh2 = be2 = _mm256_setzero_ps();
      since_flush = 0;
    }
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    const __m256 cv = enc.Code(xv);
    StoreCodes8(_mm256_cvttps_epi32(cv), codes + i);
    accumulate(xv, cv, ax2, ah2, ae2);
  }
  sums->Flush(_mm256_add_ps(ax2, bx2), _mm256_add_ps(ah2, bh2), _mm256_add_ps(ae2, be2));
  sums->emax = emax;
  for (; i < n; ++i) {
    codes[i] = enc.Code1(x[i]);
    sums->AddScalar(x[i], enc.Dequant1(codes[i]));
  }
}

// Codes of one group; sums (if any) in float32 partials when safe, else in
// double from the codes.
template <bool kSymmetric>
void EncodeGroup(const float* x, int64_t n, float scale, float zero_point, float q_max,
                 float magnitude, uint8_t* codes, RowSums* sums) {
  const GroupEncoder<kSymmetric> enc(scale, zero_point, q_max);
  if (sums != nullptr && FloatSumsSafe(magnitude, scale, zero_point, q_max)) {
    EncodeGroupFloatSums(enc, x, n, codes, sums);
    return;
  }
  EncodeGroupNoStats(enc, x, n, codes);
  if (sums != nullptr) {
    for (int64_t i = 0; i < n; ++i) sums->AddScalar(x[i], enc.Dequant1(codes[i]));
  }
}

void EncodeGroupAny(const QuantSpec& spec, const float* x, int64_t n, float scale,
                    float zero_point, float magnitude, uint8_t* codes, RowSums* sums) {
  const float q_max = static_cast<float>((1 << spec.bits) - 1);
  if (spec.scheme == Scheme::kSymmetric) {
    EncodeGroup<true>(x, n, scale, zero_point, q_max, magnitude, codes, sums);
  } else {
    EncodeGroup<false>(x, n, scale, zero_point, q_max, magnitude, codes, sums);
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
      const __m256i w = _mm256_packus_epi16(_mm256_maddubs_epi16(a, pair),
                                            _mm256_maddubs_epi16(b, pair));
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
        const __m256i b =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + c + 32 * k));
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

// Per-thread scratch (rows of one-byte codes, converted groups).
uint8_t* CodeScratch(int64_t n) {
  thread_local std::vector<uint8_t> buf;
  if (buf.size() < static_cast<size_t>(n)) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

float* FloatScratch(int64_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < static_cast<size_t>(n)) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

// ---------------------------------------------------------------------------
// The four RowKernels operations.

Status Avx2ChooseParams(const float* x, int64_t cols, const QuantSpec& spec, float* scales,
                        float* zero_points, int64_t row) {
  if (spec.method != Method::kRtn || spec.param_dtype != ParamDType::kF32) {
    return ScalarKernels().choose_params(x, cols, spec, scales, zero_points, row);
  }
  const int64_t g = spec.group_size;
  for (int64_t j = 0, c0 = 0; c0 < cols; ++j, c0 += g) {
    const int64_t n = std::min(g, cols - c0);
    const GroupRange r = ScanGroup(LoadF32{x}, c0, n, nullptr);
    // RtnGroupParams of {lo, hi} equals that of the group: its min is lo,
    // its max hi, its max |x| max(|lo|, |hi|).
    const float ends[2] = {r.lo, r.hi};
    Status st = RtnGroupParams(ends, 2, spec.bits, spec.scheme, &scales[j], &zero_points[j]);
    if (!st.ok()) {
      return st.WithContext("row " + std::to_string(row) + ", group " + std::to_string(j));
    }
  }
  return Status::OK();
}

float MaxAbs(const float* x, int64_t n) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(kAbsMask)));
  __m256 m = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask));
  float r = HMax(m);
  for (; i < n; ++i) r = std::max(r, std::fabs(x[i]));
  return r;
}

void Avx2Encode(const float* x, int64_t cols, const QuantSpec& spec, const float* scales,
                const float* zero_points, uint8_t* packed_row, ErrorStats* stats) {
  uint8_t* codes = spec.bits == 8 ? packed_row : CodeScratch(cols);
  RowSums sums;
  RowSums* sp = stats != nullptr ? &sums : nullptr;
  const int64_t g = spec.group_size;
  for (int64_t j = 0, c0 = 0; c0 < cols; ++j, c0 += g) {
    const int64_t n = std::min(g, cols - c0);
    const float magnitude = sp != nullptr ? MaxAbs(x + c0, n) : 0.0f;
    EncodeGroupAny(spec, x + c0, n, scales[j], zero_points[j], magnitude, codes + c0, sp);
  }
  if (spec.bits != 8) PackCodes(codes, cols, spec.bits, packed_row);
  if (stats != nullptr) sums.AddTo(stats, cols);
}

void Avx2Decode(const uint8_t* packed_row, int64_t cols, const QuantSpec& spec,
                const float* scales, const float* zero_points, float* out) {
  const int bits = spec.bits;
  const int64_t g = spec.group_size;
  const int64_t row_bytes = PackedRowBytes(cols, bits);
  const uint8_t mask = static_cast<uint8_t>((1 << bits) - 1);
  // Lane k takes the code at bit k * bits of a 32-bit word.
  const __m256i shifts = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                            _mm256_set1_epi32(bits));
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
        q = _mm256_cvtepu8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed_row + c)));
      } else {
        uint64_t w;
        std::memcpy(&w, packed_row + (bit >> 3), sizeof w);
        const auto word = static_cast<uint32_t>(w >> (bit & 7));
        q = _mm256_and_si256(
            _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts), vmask);
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
// The fused rtn row: one scan per group (convert + min/max + finiteness),
// then codes and error from the converted group while it is in L1.

Status RowFiniteError(DType dtype, const void* src, int64_t cols, int64_t row) {
  std::vector<float> x(static_cast<size_t>(cols));
  ConvertToFloat32(dtype, src, x.data(), x.size());
  return CheckFiniteRow(x.data(), cols, row);
}

template <typename Loader>
Status FusedRow(const Loader& ld, DType dtype, const void* src, int64_t cols,
                const QuantSpec& spec, float* scales, float* zero_points, uint8_t* packed_row,
                ErrorStats* stats, int64_t row) {
  const int64_t g = spec.group_size;
  float* buf = Loader::kCopies ? FloatScratch(std::min(g, cols)) : nullptr;
  uint8_t* codes = spec.bits == 8 ? packed_row : CodeScratch(cols);
  RowSums sums;
  RowSums* sp = stats != nullptr ? &sums : nullptr;
  for (int64_t j = 0, c0 = 0; c0 < cols; ++j, c0 += g) {
    const int64_t n = std::min(g, cols - c0);
    const GroupRange r = ScanGroup(ld, c0, n, buf);
    if (!r.finite) return RowFiniteError(dtype, src, cols, row);
    const float ends[2] = {r.lo, r.hi};
    Status st = RtnGroupParams(ends, 2, spec.bits, spec.scheme, &scales[j], &zero_points[j]);
    if (!st.ok()) {
      // The scalar path checks the whole row for NaN/Inf first.
      Status fe = RowFiniteError(dtype, src, cols, row);
      if (!fe.ok()) return fe;
      return st.WithContext("row " + std::to_string(row) + ", group " + std::to_string(j));
    }
    const float* x;
    if constexpr (Loader::kCopies) {
      x = buf;
    } else {
      x = ld.p + c0;
    }
    const float magnitude = std::max(std::fabs(r.lo), std::fabs(r.hi));
    EncodeGroupAny(spec, x, n, scales[j], zero_points[j], magnitude, codes + c0, sp);
  }
  if (spec.bits != 8) PackCodes(codes, cols, spec.bits, packed_row);
  if (stats != nullptr) sums.AddTo(stats, cols);
  return Status::OK();
}

Status Avx2QuantizeRowRtn(DType dtype, const void* src, int64_t cols, const QuantSpec& spec,
                          float* scales, float* zero_points, uint8_t* packed_row,
                          ErrorStats* stats, int64_t row) {
  return WithLoader(dtype, src, [&](auto ld) {
    return FusedRow(ld, dtype, src, cols, spec, scales, zero_points, packed_row, stats, row);
  });
}

const RowKernels kAvx2 = {"avx2", Avx2Convert, Avx2ChooseParams, Avx2Encode, Avx2Decode};

bool CpuHasAvx2() {
  // The build compiles this file with -mavx2 -mf16c -mfma; run it only on a
  // CPU (and OS, which GCC's check includes) that supports all three.
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                         __builtin_cpu_supports("fma");
  return ok;
}

}  // namespace

const RowKernels* Avx2Kernels() { return CpuHasAvx2() ? &kAvx2 : nullptr; }

FusedRtnRowFn SelectFusedRtn(bool force_scalar) {
  return (!force_scalar && CpuHasAvx2()) ? Avx2QuantizeRowRtn : nullptr;
}

}  // namespace arrowquant::kernels
