// AVX2 + FMA + F16C kernels of the quantized matmul (see matmul_kernels.h).
//
// GEMV: a block of 16 codes (8 bytes at INT8 and INT4, 4 at INT2) becomes
// two float vectors in registers; x was rearranged once per call so that
// its 16 values of the block line up with the lanes the decoder fills (no
// shuffle per block). Per group the kernel sums x * q, then adds
// s * sum - (z * s) * sum(x) to the row: the weight is streamed once.
// Groups whose size is not a multiple of 16 take the generic path (row
// decoded into L1, then dots).
//
// GEMM: a block of weight rows is dequantized KC columns at a time into a
// buffer; a 6 x 16 register-blocked kernel multiplies it with x^T packed in
// panels of 16 rows of x (FMA, explicit intrinsics: the build has
// -ffp-contract=off).
#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "arrowquant/quantize.h"
#include "kernels/matmul_kernels.h"
#include "kernels/row_kernels.h"

namespace arrowquant::kernels {

namespace {

constexpr int64_t kBlock = 16;          // codes per decoded block (GEMV)
constexpr int64_t kMr = 6;              // GEMM: weight rows per register tile
constexpr int64_t kNr = 16;             // GEMM: rows of x per register tile (two vectors)
constexpr int64_t kKc = 256;            // GEMM: columns per dequantized slice
constexpr int64_t kRowBlock = 8 * kMr;  // GEMM: weight rows sharing one slice of x

inline float HSum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

inline float Half(uint16_t h) { return _cvtsh_ss(h); }

// ---------------------------------------------------------------------------
// Activations in and out.

void Avx2LoadX(DType dtype, const void* src, const float* input_scales, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v;
    if (dtype == DType::kF32) {
      v = _mm256_loadu_ps(static_cast<const float*>(src) + i);
    } else {
      const __m128i h =
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(src) + i));
      v = dtype == DType::kF16
              ? _mm256_cvtph_ps(h)
              : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    if (input_scales) v = _mm256_div_ps(v, _mm256_loadu_ps(input_scales + i));
    _mm256_storeu_ps(dst + i, v);
  }
  for (; i < n; ++i) {
    float v;
    switch (dtype) {
      case DType::kBF16:
        v = BFloat16ToFloat(static_cast<const uint16_t*>(src)[i]);
        break;
      case DType::kF16:
        v = Half(static_cast<const uint16_t*>(src)[i]);
        break;
      default:
        v = static_cast<const float*>(src)[i];
    }
    dst[i] = input_scales ? v / input_scales[i] : v;
  }
}

inline __m256 LoadAny(DType dtype, const void* p, int64_t i) {
  if (dtype == DType::kF32) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  const __m128i h =
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
  return dtype == DType::kF16
             ? _mm256_cvtph_ps(h)
             : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// float32 -> bfloat16, round to nearest even, NaN kept quiet.
inline __m128i ToBf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                         _mm256_set1_epi32(0x7F800000));
  const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  r = _mm256_blendv_epi8(r, qnan, nan);
  // 8 x 32-bit -> 8 x 16-bit (values fit in 16 bits: no saturation).
  const __m256i packed = _mm256_packus_epi32(r, r);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

void Avx2StoreY(const float* src, const void* bias, DType bias_dtype, int64_t n, DType dtype,
                void* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(src + i);
    if (bias) v = _mm256_add_ps(v, LoadAny(bias_dtype, bias, i));
    if (dtype == DType::kF32) {
      _mm256_storeu_ps(static_cast<float*>(dst) + i, v);
    } else {
      const __m128i h =
          dtype == DType::kF16 ? _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT) : ToBf16(v);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(dst) + i), h);
    }
  }
  if (i < n)
    ScalarMatmulKernels().store_y(
        src + i, bias ? static_cast<const uint8_t*>(bias) + i * DTypeSize(bias_dtype) : nullptr,
        bias_dtype, n - i, dtype, static_cast<uint8_t*>(dst) + i * DTypeSize(dtype));
}

// ---------------------------------------------------------------------------
// Parameters and decoding.

void Avx2RowParams(const QuantMatrix& w, int64_t r, float* scales, float* zero_points) {
  const int64_t G = GroupsPerRow(w.cols, w.group_size);
  if (w.params == ParamStorage::kF16) {
    const auto* s = static_cast<const uint16_t*>(w.scales) + r * G;
    const auto* z = static_cast<const uint16_t*>(w.zero_points) + r * G;
    int64_t j = 0;
    for (; j + 8 <= G; j += 8) {
      _mm256_storeu_ps(scales + j,
                       _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + j))));
      _mm256_storeu_ps(zero_points + j,
                       _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z + j))));
    }
    for (; j < G; ++j) {
      scales[j] = Half(s[j]);
      zero_points[j] = Half(z[j]);
    }
    return;
  }
  if (w.params == ParamStorage::kSuperblock) {
    const int64_t K = w.superblock_groups;
    const int64_t S = (G + K - 1) / K;
    const auto* d = static_cast<const uint16_t*>(w.scales) + r * S;
    const auto* dz = static_cast<const uint16_t*>(w.zero_points) + r * S;
    for (int64_t t = 0, j = 0; t < S; ++t) {
      const float du = Half(d[t]), zu = Half(dz[t]);
      for (const int64_t end = std::min(G, j + K); j < end; ++j) {
        uint32_t a = 0, c = 0;
        ReadParamCodePair(w.param_codes, r * G + j, w.param_code_bits, &a, &c);
        scales[j] = du * static_cast<float>(a);
        zero_points[j] = zu * static_cast<float>(c);
      }
    }
    return;
  }
  ScalarMatmulKernels().row_params(w, r, scales, zero_points);
}

void Avx2DecodeRange(const QuantMatrix& w, int64_t r, const float* scales, const float* zero_points,
                     int64_t c0, int64_t c1, float* out) {
  const int bits = w.bits;
  const int64_t g = w.group_size;
  const int64_t row_bytes = PackedRowBytes(w.cols, bits);
  const uint8_t* row = w.codes + r * row_bytes;
  const uint8_t mask = static_cast<uint8_t>((1 << bits) - 1);
  const __m256i shifts =
      _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bits));
  const __m256i vmask = _mm256_set1_epi32(mask);
  int64_t c = c0;
  while (c < c1) {
    const int64_t j = c / g;
    const int64_t end = std::min(c1, (j + 1) * g);
    const float s = scales[j], z = zero_points[j];
    const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
    // Eight codes lie in the 8 bytes from the one holding the first.
    for (; c + 8 <= end && ((c * bits) >> 3) + 8 <= row_bytes; c += 8) {
      __m256i q;
      if (bits == 8) {
        q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + c)));
      } else {
        const int64_t bit = c * bits;
        uint64_t word;
        std::memcpy(&word, row + (bit >> 3), sizeof word);
        const auto w32 = static_cast<uint32_t>(word >> (bit & 7));
        q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w32)), shifts),
                             vmask);
      }
      _mm256_storeu_ps(out + (c - c0), _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), vz), vs));
    }
    for (; c < end; ++c) {
      const uint8_t q = (row[(c * bits) >> 3] >> ((c * bits) & 7)) & mask;
      out[c - c0] = (static_cast<float>(q) - z) * s;
    }
  }
}

// ---------------------------------------------------------------------------
// GEMV.

// The code index behind lane t of a decoded block (x is stored in this order).
constexpr int kOrder8[kBlock] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
constexpr int kOrder4[kBlock] = {0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15};
constexpr int kOrder2[kBlock] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};

bool Fused(const QuantMatrix& w) { return w.group_size % kBlock == 0; }

size_t Avx2GemvPrepFloats(const QuantMatrix& w, int64_t nb) {
  if (!Fused(w)) return 0;
  return static_cast<size_t>(nb * (w.cols + GroupsPerRow(w.cols, w.group_size)));
}

// prep = x in decoder order (nb x cols: blocks of 16 rearranged, the tail as
// is), then the group sums of x (nb x G).
void Avx2GemvPrepare(const QuantMatrix& w, const float* x, int64_t nb, float* prep) {
  if (!Fused(w)) return;
  const int64_t K = w.cols, G = GroupsPerRow(K, w.group_size);
  const int* order = w.bits == 8 ? kOrder8 : w.bits == 4 ? kOrder4 : kOrder2;
  const int64_t full = K / kBlock * kBlock;
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * K;
    float* xp = prep + b * K;
    for (int64_t c = 0; c < full; c += kBlock) {
      for (int t = 0; t < kBlock; ++t) xp[c + t] = xb[c + order[t]];
    }
    for (int64_t c = full; c < K; ++c) xp[c] = xb[c];
    float* xs = prep + nb * K + b * G;
    for (int64_t j = 0; j < G; ++j) {
      const int64_t end = std::min(K, (j + 1) * w.group_size);
      float s = 0.f;
      for (int64_t c = j * w.group_size; c < end; ++c) s += xb[c];
      xs[j] = s;
    }
  }
}

// 16 codes at `p` as two float vectors, lanes in kOrder<bits>.
template <int kBits>
inline void DecodeBlock(const uint8_t* p, __m256* q0, __m256* q1) {
  if constexpr (kBits == 8) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    *q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
    *q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(v, v)));
  } else if constexpr (kBits == 4) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    *q0 = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
    *q1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
  } else {
    int32_t word;
    std::memcpy(&word, p, sizeof word);
    const __m256i v = _mm256_cvtepu8_epi32(_mm_set1_epi32(word));
    const __m256i three = _mm256_set1_epi32(3);
    *q0 = _mm256_cvtepi32_ps(
        _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2)), three));
    *q1 = _mm256_cvtepi32_ps(
        _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)), three));
  }
}

template <int kBits, int kNB>
void GemvFused(const QuantMatrix& w, const float*, const float* prep, int64_t r0, int64_t r1,
               float* y, int64_t ldy) {
  // Enough independent accumulator chains to cover the FMA latency: four
  // per row of x for one or two rows, two for three or four.
  constexpr int kChains = kNB <= 2 ? 4 : 2;
  constexpr int64_t kBytes = kBlock * kBits / 8;
  const int64_t K = w.cols, g = w.group_size, G = GroupsPerRow(K, g);
  const int64_t full = K / kBlock * kBlock;
  const int64_t row_bytes = PackedRowBytes(K, kBits);
  const float* xp = prep;
  const float* xsum = prep + kNB * K;
  const uint8_t mask = static_cast<uint8_t>((1 << kBits) - 1);
  std::vector<float> s(G), z(G);
  for (int64_t r = r0; r < r1; ++r) {
    Avx2RowParams(w, r, s.data(), z.data());
    const uint8_t* row = w.codes + r * row_bytes;
    __m256 tot[kNB];
    for (int b = 0; b < kNB; ++b) tot[b] = _mm256_setzero_ps();
    for (int64_t j = 0; j < G; ++j) {
      const int64_t c0 = j * g, c1 = std::min(c0 + g, full);
      if (c0 >= c1) break;
      __m256 acc[kNB][kChains];
      for (int b = 0; b < kNB; ++b) {
        for (int h = 0; h < kChains; ++h) acc[b][h] = _mm256_setzero_ps();
      }
      int64_t c = c0;
      if constexpr (kChains == 4) {
        for (; c + 2 * kBlock <= c1; c += 2 * kBlock) {
          __m256 q0, q1, q2, q3;
          DecodeBlock<kBits>(row + c * kBits / 8, &q0, &q1);
          DecodeBlock<kBits>(row + c * kBits / 8 + kBytes, &q2, &q3);
          for (int b = 0; b < kNB; ++b) {
            const float* xc = xp + b * K + c;
            acc[b][0] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(xc), acc[b][0]);
            acc[b][1] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xc + 8), acc[b][1]);
            acc[b][2] = _mm256_fmadd_ps(q2, _mm256_loadu_ps(xc + 16), acc[b][2]);
            acc[b][3] = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xc + 24), acc[b][3]);
          }
        }
      }
      for (; c < c1; c += kBlock) {
        __m256 q0, q1;
        DecodeBlock<kBits>(row + c * kBits / 8, &q0, &q1);
        for (int b = 0; b < kNB; ++b) {
          const float* xc = xp + b * K + c;
          acc[b][0] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(xc), acc[b][0]);
          acc[b][1] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xc + 8), acc[b][1]);
        }
      }
      const __m256 vs = _mm256_set1_ps(s[j]);
      for (int b = 0; b < kNB; ++b) {
        __m256 a = _mm256_add_ps(acc[b][0], acc[b][1]);
        if constexpr (kChains == 4) a = _mm256_add_ps(a, _mm256_add_ps(acc[b][2], acc[b][3]));
        tot[b] = _mm256_fmadd_ps(a, vs, tot[b]);
      }
    }
    // Columns after the last whole block (x in natural order there).
    float rest[kNB] = {};
    for (int64_t c = full; c < K; ++c) {
      const int64_t j = c / g;
      const float q = static_cast<float>((row[(c * kBits) >> 3] >> ((c * kBits) & 7)) & mask);
      for (int b = 0; b < kNB; ++b) rest[b] += s[j] * (xp[b * K + c] * q);
    }
    // Zero-point term: sum_j z_j s_j sum_{c in j} x_c.
    __m256 off[kNB];
    for (int b = 0; b < kNB; ++b) off[b] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= G; j += 8) {
      const __m256 zs = _mm256_mul_ps(_mm256_loadu_ps(z.data() + j), _mm256_loadu_ps(s.data() + j));
      for (int b = 0; b < kNB; ++b) {
        off[b] = _mm256_fmadd_ps(zs, _mm256_loadu_ps(xsum + b * G + j), off[b]);
      }
    }
    for (int b = 0; b < kNB; ++b) {
      float o = HSum(off[b]);
      for (int64_t t = j; t < G; ++t) o += (z[t] * s[t]) * xsum[b * G + t];
      y[b * ldy + r] = (HSum(tot[b]) + rest[b]) - o;
    }
  }
}

// sum_{c >= full} s_j x_c q_c - sum_j z_j s_j xsum_j for one row and one row
// of x: the columns after the last whole block, and the zero-point term.
template <int kBits>
float RowRestMinusOffset(const uint8_t* row, const float* s, const float* z, const float* xp,
                         const float* xsum, int64_t K, int64_t g, int64_t G, int64_t full) {
  const uint8_t mask = static_cast<uint8_t>((1 << kBits) - 1);
  float rest = 0.f;
  for (int64_t c = full; c < K; ++c) {
    const float q = static_cast<float>((row[(c * kBits) >> 3] >> ((c * kBits) & 7)) & mask);
    rest += s[c / g] * (xp[c] * q);
  }
  __m256 off = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= G; j += 8) {
    off = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(z + j), _mm256_loadu_ps(s + j)),
                          _mm256_loadu_ps(xsum + j), off);
  }
  float o = HSum(off);
  for (; j < G; ++j) o += (z[j] * s[j]) * xsum[j];
  return rest - o;
}

// One row of x, two weight rows at a time: the x vectors are loaded once
// for both rows and eight accumulator chains run side by side.
template <int kBits>
void GemvFusedPairs(const QuantMatrix& w, const float* prep, int64_t r0, int64_t r1, float* y) {
  constexpr int64_t kBytes = kBlock * kBits / 8;
  const int64_t K = w.cols, g = w.group_size, G = GroupsPerRow(K, g);
  const int64_t full = K / kBlock * kBlock;
  const int64_t row_bytes = PackedRowBytes(K, kBits);
  const float* xp = prep;
  const float* xsum = prep + K;
  std::vector<float> sa(G), za(G), sb(G), zb(G);
  int64_t r = r0;
  for (; r + 2 <= r1; r += 2) {
    Avx2RowParams(w, r, sa.data(), za.data());
    Avx2RowParams(w, r + 1, sb.data(), zb.data());
    const uint8_t* ra = w.codes + r * row_bytes;
    const uint8_t* rb = ra + row_bytes;
    __m256 tot_a = _mm256_setzero_ps(), tot_b = _mm256_setzero_ps();
    for (int64_t j = 0; j < G; ++j) {
      const int64_t c0 = j * g, c1 = std::min(c0 + g, full);
      if (c0 >= c1) break;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      int64_t c = c0;
      for (; c + 2 * kBlock <= c1; c += 2 * kBlock) {
        const __m256 x0 = _mm256_loadu_ps(xp + c), x1 = _mm256_loadu_ps(xp + c + 8);
        const __m256 x2 = _mm256_loadu_ps(xp + c + 16), x3 = _mm256_loadu_ps(xp + c + 24);
        const int64_t off = c * kBits / 8;
        __m256 q0, q1, q2, q3;
        DecodeBlock<kBits>(ra + off, &q0, &q1);
        DecodeBlock<kBits>(ra + off + kBytes, &q2, &q3);
        a0 = _mm256_fmadd_ps(q0, x0, a0);
        a1 = _mm256_fmadd_ps(q1, x1, a1);
        a2 = _mm256_fmadd_ps(q2, x2, a2);
        a3 = _mm256_fmadd_ps(q3, x3, a3);
        DecodeBlock<kBits>(rb + off, &q0, &q1);
        DecodeBlock<kBits>(rb + off + kBytes, &q2, &q3);
        b0 = _mm256_fmadd_ps(q0, x0, b0);
        b1 = _mm256_fmadd_ps(q1, x1, b1);
        b2 = _mm256_fmadd_ps(q2, x2, b2);
        b3 = _mm256_fmadd_ps(q3, x3, b3);
      }
      for (; c < c1; c += kBlock) {
        const __m256 x0 = _mm256_loadu_ps(xp + c), x1 = _mm256_loadu_ps(xp + c + 8);
        const int64_t off = c * kBits / 8;
        __m256 q0, q1;
        DecodeBlock<kBits>(ra + off, &q0, &q1);
        a0 = _mm256_fmadd_ps(q0, x0, a0);
        a1 = _mm256_fmadd_ps(q1, x1, a1);
        DecodeBlock<kBits>(rb + off, &q0, &q1);
        b0 = _mm256_fmadd_ps(q0, x0, b0);
        b1 = _mm256_fmadd_ps(q1, x1, b1);
      }
      const __m256 sum_a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
      const __m256 sum_b = _mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3));
      tot_a = _mm256_fmadd_ps(sum_a, _mm256_set1_ps(sa[j]), tot_a);
      tot_b = _mm256_fmadd_ps(sum_b, _mm256_set1_ps(sb[j]), tot_b);
    }
    y[r] =
        HSum(tot_a) + RowRestMinusOffset<kBits>(ra, sa.data(), za.data(), xp, xsum, K, g, G, full);
    y[r + 1] =
        HSum(tot_b) + RowRestMinusOffset<kBits>(rb, sb.data(), zb.data(), xp, xsum, K, g, G, full);
  }
  if (r < r1) GemvFused<kBits, 1>(w, nullptr, prep, r, r1, y, 0);
}

// Any group size: row decoded into a buffer, then dot products.
void GemvDecoded(const QuantMatrix& w, const float* x, int64_t nb, int64_t r0, int64_t r1, float* y,
                 int64_t ldy) {
  const int64_t K = w.cols, G = GroupsPerRow(K, w.group_size);
  std::vector<float> s(G), z(G), row(K);
  for (int64_t r = r0; r < r1; ++r) {
    Avx2RowParams(w, r, s.data(), z.data());
    Avx2DecodeRange(w, r, s.data(), z.data(), 0, K, row.data());
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + b * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t c = 0;
      for (; c + 16 <= K; c += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(row.data() + c), _mm256_loadu_ps(xb + c), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(row.data() + c + 8), _mm256_loadu_ps(xb + c + 8), a1);
      }
      float acc = HSum(_mm256_add_ps(a0, a1));
      for (; c < K; ++c) acc += row[c] * xb[c];
      y[b * ldy + r] = acc;
    }
  }
}

template <int kBits>
void GemvFusedNB(const QuantMatrix& w, const float* x, int64_t nb, const float* prep, int64_t r0,
                 int64_t r1, float* y, int64_t ldy) {
  switch (nb) {
    case 1:
      return GemvFusedPairs<kBits>(w, prep, r0, r1, y);
    case 2:
      return GemvFused<kBits, 2>(w, x, prep, r0, r1, y, ldy);
    case 3:
      return GemvFused<kBits, 3>(w, x, prep, r0, r1, y, ldy);
    default:
      return GemvFused<kBits, 4>(w, x, prep, r0, r1, y, ldy);
  }
}

void Avx2Gemv(const QuantMatrix& w, const float* x, int64_t nb, const float* prep, int64_t r0,
              int64_t r1, float* y, int64_t ldy) {
  static_assert(kGemvMaxBatch == 4, "GemvFusedNB handles up to 4 rows of x");
  if (!Fused(w)) return GemvDecoded(w, x, nb, r0, r1, y, ldy);
  switch (w.bits) {
    case 8:
      return GemvFusedNB<8>(w, x, nb, prep, r0, r1, y, ldy);
    case 4:
      return GemvFusedNB<4>(w, x, nb, prep, r0, r1, y, ldy);
    default:
      return GemvFusedNB<2>(w, x, nb, prep, r0, r1, y, ldy);
  }
}

// ---------------------------------------------------------------------------
// GEMM.

int64_t Panels(int64_t batch) { return (batch + kNr - 1) / kNr; }

size_t Avx2GemmPrepFloats(const QuantMatrix& w, int64_t batch) {
  return static_cast<size_t>(Panels(batch) * kNr * w.cols);
}

// x^T in panels of 16 rows of x: prep[(q * cols + k) * 16 + i] = x[q*16 + i][k]
// (zero past the last row).
void Avx2GemmPrepare(const QuantMatrix& w, const float* x, int64_t batch, float* prep) {
  const int64_t K = w.cols;
  for (int64_t q = 0; q < Panels(batch); ++q) {
    float* panel = prep + q * K * kNr;
    for (int64_t i = 0; i < kNr; ++i) {
      const int64_t b = q * kNr + i;
      if (b < batch) {
        const float* xb = x + b * K;
        for (int64_t k = 0; k < K; ++k) panel[k * kNr + i] = xb[k];
      } else {
        for (int64_t k = 0; k < K; ++k) panel[k * kNr + i] = 0.f;
      }
    }
  }
}

// C (6 x 16, row stride ldc) (+)= A (6 rows of stride lda, kl columns) * B (kl x 16).
void Tile6x16(const float* a, int64_t lda, const float* b, int64_t kl, float* c, int64_t ldc,
              bool first) {
  __m256 acc[kMr][2];
  for (int i = 0; i < kMr; ++i) {
    acc[i][0] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + i * ldc);
    acc[i][1] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + i * ldc + 8);
  }
  for (int64_t k = 0; k < kl; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * kNr), b1 = _mm256_loadu_ps(b + k * kNr + 8);
    for (int i = 0; i < kMr; ++i) {
      const __m256 ai = _mm256_broadcast_ss(a + i * lda + k);
      acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
    }
  }
  for (int i = 0; i < kMr; ++i) {
    _mm256_storeu_ps(c + i * ldc, acc[i][0]);
    _mm256_storeu_ps(c + i * ldc + 8, acc[i][1]);
  }
}

void Avx2Gemm(const QuantMatrix& w, const float*, int64_t batch, const float* prep, int64_t r0,
              int64_t r1, float* y, int64_t ldy) {
  const int64_t K = w.cols, G = GroupsPerRow(K, w.group_size);
  const int64_t Q = Panels(batch), ldc = Q * kNr;
  std::vector<float> s(kRowBlock * G), z(kRowBlock * G);
  std::vector<float> a(kRowBlock * kKc), acc(kRowBlock * ldc);
  for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
    const int64_t nr = std::min(kRowBlock, r1 - rb);
    const int64_t tiles = (nr + kMr - 1) / kMr;
    for (int64_t i = 0; i < nr; ++i) Avx2RowParams(w, rb + i, &s[i * G], &z[i * G]);
    std::fill(a.begin() + nr * kKc, a.begin() + tiles * kMr * kKc, 0.f);  // padding rows
    for (int64_t kc = 0; kc < K; kc += kKc) {
      const int64_t kl = std::min(kKc, K - kc);
      for (int64_t i = 0; i < nr; ++i) {
        Avx2DecodeRange(w, rb + i, &s[i * G], &z[i * G], kc, kc + kl, &a[i * kKc]);
      }
      for (int64_t q = 0; q < Q; ++q) {
        const float* bp = prep + (q * K + kc) * kNr;
        for (int64_t t = 0; t < tiles; ++t) {
          Tile6x16(&a[t * kMr * kKc], kKc, bp, kl, &acc[t * kMr * ldc + q * kNr], ldc, kc == 0);
        }
      }
    }
    for (int64_t i = 0; i < nr; ++i) {
      for (int64_t b = 0; b < batch; ++b) y[b * ldy + rb + i] = acc[i * ldc + b];
    }
  }
}

const MatmulKernels kAvx2Matmul = {
    "avx2",          Avx2LoadX, Avx2StoreY, Avx2RowParams,      Avx2DecodeRange, Avx2GemvPrepFloats,
    Avx2GemvPrepare, Avx2Gemv,  kRowBlock,  Avx2GemmPrepFloats, Avx2GemmPrepare, Avx2Gemm,
};

}  // namespace

const MatmulKernels* Avx2MatmulKernels() { return CpuHasAvx2() ? &kAvx2Matmul : nullptr; }

}  // namespace arrowquant::kernels
