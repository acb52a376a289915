// AVX-512 GEMV of the quantized matmul: the AVX2 kernel's algorithm
// (matmul_avx2.cc) on 16 lanes, blocks of 32 codes (16 bytes at INT4, 8 at
// INT2, 32 at INT8) decoded into two registers. Half the instructions per
// weight: the memory-bound GEMV is limited by instruction throughput before
// bandwidth on cores that run 512-bit operations in two halves (Zen 4).
// Everything else (GEMM, conversions, parameters) is the AVX2 table's.
// Used when the CPU has AVX-512 F/BW/VL (and the OS saves ZMM state) and the
// group size is a multiple of 32.
// GCC 12's AVX-512 headers start conversions from _mm512_undefined_*(),
// which -Wmaybe-uninitialized reports inside every inlined caller (GCC bug
// 105593); the values are all written before use.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "arrowquant/quantize.h"
#include "kernels/matmul_kernels.h"

namespace arrowquant::kernels {
namespace {

constexpr int64_t kBlock = 32;  // codes per decoded block

bool CpuHasAvx512() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
    if ((c & bit_OSXSAVE) == 0) return false;
    unsigned xcr0_lo = 0, xcr0_hi = 0;
    __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & 0xE6u) != 0xE6u) return false;  // XMM, YMM, opmask, ZMM state
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    return (b & bit_AVX512F) && (b & bit_AVX512BW) && (b & bit_AVX512VL);
  }();
  return ok;
}

bool Fused(const QuantMatrix& w) { return w.group_size % kBlock == 0; }

inline float Reduce(__m512 v) {
  const __m256 lo = _mm512_castps512_ps256(v);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  const __m256 s8 = _mm256_add_ps(lo, hi);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

// Lane t of the two decoded vectors holds code kOrder[t] of the block.
void BlockOrder(int bits, int* order) {
  for (int t = 0; t < kBlock; ++t) {
    if (bits == 8) {
      order[t] = t;
    } else if (bits == 4) {
      order[t] = t < 16 ? 2 * t : 2 * (t - 16) + 1;
    } else {
      order[t] = 4 * (t % 8) + t / 8;
    }
  }
}

size_t PrepFloats(const QuantMatrix& w, int64_t nb) {
  if (!Fused(w)) return Avx2MatmulKernels()->gemv_prep_floats(w, nb);
  return static_cast<size_t>(nb * (w.cols + GroupsPerRow(w.cols, w.group_size)));
}

void Prepare(const QuantMatrix& w, const float* x, int64_t nb, float* prep) {
  if (!Fused(w)) return Avx2MatmulKernels()->gemv_prepare(w, x, nb, prep);
  const int64_t K = w.cols, G = GroupsPerRow(K, w.group_size);
  int order[kBlock];
  BlockOrder(w.bits, order);
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

template <int kBits>
inline void DecodeBlock(const uint8_t* p, __m512* q0, __m512* q1) {
  if constexpr (kBits == 8) {
    *q0 = _mm512_cvtepi32_ps(
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    *q1 = _mm512_cvtepi32_ps(
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
  } else if constexpr (kBits == 4) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    *q0 = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
    *q1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
  } else {
    int64_t word;
    std::memcpy(&word, p, sizeof word);
    const __m512i v = _mm512_cvtepu8_epi32(_mm_set1_epi64x(word));
    const __m512i three = _mm512_set1_epi32(3);
    const __m512i sh0 = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i sh1 = _mm512_set_epi32(6, 6, 6, 6, 6, 6, 6, 6, 4, 4, 4, 4, 4, 4, 4, 4);
    *q0 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(v, sh0), three));
    *q1 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(v, sh1), three));
  }
}

template <int kBits, int kNB>
void GemvRows(const QuantMatrix& w, const float* prep, int64_t r0, int64_t r1, float* y,
              int64_t ldy) {
  constexpr int kChains = kNB <= 2 ? 4 : 2;
  constexpr int64_t kBytes = kBlock * kBits / 8;
  const int64_t K = w.cols, g = w.group_size, G = GroupsPerRow(K, g);
  const int64_t full = K / kBlock * kBlock;
  const int64_t row_bytes = PackedRowBytes(K, kBits);
  const float* xp = prep;
  const float* xsum = prep + kNB * K;
  const uint8_t mask = static_cast<uint8_t>((1 << kBits) - 1);
  const MatmulKernels& base = *Avx2MatmulKernels();
  std::vector<float> s(G), z(G);
  for (int64_t r = r0; r < r1; ++r) {
    base.row_params(w, r, s.data(), z.data());
    const uint8_t* row = w.codes + r * row_bytes;
    __m512 tot[kNB];
    for (int b = 0; b < kNB; ++b) tot[b] = _mm512_setzero_ps();
    for (int64_t j = 0; j < G; ++j) {
      const int64_t c0 = j * g, c1 = std::min(c0 + g, full);
      if (c0 >= c1) break;
      __m512 acc[kNB][kChains];
      for (int b = 0; b < kNB; ++b) {
        for (int h = 0; h < kChains; ++h) acc[b][h] = _mm512_setzero_ps();
      }
      int64_t c = c0;
      if constexpr (kChains == 4) {
        for (; c + 2 * kBlock <= c1; c += 2 * kBlock) {
          __m512 q0, q1, q2, q3;
          DecodeBlock<kBits>(row + c * kBits / 8, &q0, &q1);
          DecodeBlock<kBits>(row + c * kBits / 8 + kBytes, &q2, &q3);
          for (int b = 0; b < kNB; ++b) {
            const float* xc = xp + b * K + c;
            acc[b][0] = _mm512_fmadd_ps(q0, _mm512_loadu_ps(xc), acc[b][0]);
            acc[b][1] = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xc + 16), acc[b][1]);
            acc[b][2] = _mm512_fmadd_ps(q2, _mm512_loadu_ps(xc + 32), acc[b][2]);
            acc[b][3] = _mm512_fmadd_ps(q3, _mm512_loadu_ps(xc + 48), acc[b][3]);
          }
        }
      }
      for (; c < c1; c += kBlock) {
        __m512 q0, q1;
        DecodeBlock<kBits>(row + c * kBits / 8, &q0, &q1);
        for (int b = 0; b < kNB; ++b) {
          const float* xc = xp + b * K + c;
          acc[b][0] = _mm512_fmadd_ps(q0, _mm512_loadu_ps(xc), acc[b][0]);
          acc[b][1] = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xc + 16), acc[b][1]);
        }
      }
      const __m512 vs = _mm512_set1_ps(s[j]);
      for (int b = 0; b < kNB; ++b) {
        __m512 a = _mm512_add_ps(acc[b][0], acc[b][1]);
        if constexpr (kChains == 4) a = _mm512_add_ps(a, _mm512_add_ps(acc[b][2], acc[b][3]));
        tot[b] = _mm512_fmadd_ps(a, vs, tot[b]);
      }
    }
    float rest[kNB] = {};
    for (int64_t c = full; c < K; ++c) {
      const float q = static_cast<float>((row[(c * kBits) >> 3] >> ((c * kBits) & 7)) & mask);
      for (int b = 0; b < kNB; ++b) rest[b] += s[c / g] * (xp[b * K + c] * q);
    }
    for (int b = 0; b < kNB; ++b) {
      __m512 off = _mm512_setzero_ps();
      int64_t t = 0;
      for (; t + 16 <= G; t += 16) {
        off = _mm512_fmadd_ps(
            _mm512_mul_ps(_mm512_loadu_ps(z.data() + t), _mm512_loadu_ps(s.data() + t)),
            _mm512_loadu_ps(xsum + b * G + t), off);
      }
      float o = Reduce(off);
      for (; t < G; ++t) o += (z[t] * s[t]) * xsum[b * G + t];
      y[b * ldy + r] = (Reduce(tot[b]) + rest[b]) - o;
    }
  }
}

// sum_{c >= full} s_j x_c q_c - sum_j z_j s_j xsum_j for one weight row and
// one row of x (xp, xsum of that row).
template <int kBits>
float RestMinusOffset(const uint8_t* row, const float* s, const float* z, const float* xp,
                      const float* xsum, int64_t K, int64_t g, int64_t G, int64_t full) {
  const uint8_t mask = static_cast<uint8_t>((1 << kBits) - 1);
  float rest = 0.f;
  for (int64_t c = full; c < K; ++c) {
    const float q = static_cast<float>((row[(c * kBits) >> 3] >> ((c * kBits) & 7)) & mask);
    rest += s[c / g] * (xp[c] * q);
  }
  __m512 off = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + 16 <= G; t += 16) {
    off = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_loadu_ps(z + t), _mm512_loadu_ps(s + t)),
                          _mm512_loadu_ps(xsum + t), off);
  }
  float o = Reduce(off);
  for (; t < G; ++t) o += (z[t] * s[t]) * xsum[t];
  return rest - o;
}

// Two to four rows of x: two weight rows per step, so that every x vector
// loaded serves both (the loads of x, not the decoding, bound this case).
template <int kBits, int kNB>
void GemvRowPairs(const QuantMatrix& w, const float* prep, int64_t r0, int64_t r1, float* y,
                  int64_t ldy) {
  const int64_t K = w.cols, g = w.group_size, G = GroupsPerRow(K, g);
  const int64_t full = K / kBlock * kBlock;
  const int64_t row_bytes = PackedRowBytes(K, kBits);
  const float* xp = prep;
  const float* xsum = prep + kNB * K;
  const MatmulKernels& base = *Avx2MatmulKernels();
  std::vector<float> sa(G), za(G), sb(G), zb(G);
  int64_t r = r0;
  for (; r + 2 <= r1; r += 2) {
    base.row_params(w, r, sa.data(), za.data());
    base.row_params(w, r + 1, sb.data(), zb.data());
    const uint8_t* ra = w.codes + r * row_bytes;
    const uint8_t* rb = ra + row_bytes;
    __m512 tot_a[kNB], tot_b[kNB];
    for (int b = 0; b < kNB; ++b) tot_a[b] = tot_b[b] = _mm512_setzero_ps();
    for (int64_t j = 0; j < G; ++j) {
      const int64_t c0 = j * g, c1 = std::min(c0 + g, full);
      if (c0 >= c1) break;
      __m512 acc_a[kNB][2], acc_b[kNB][2];
      for (int b = 0; b < kNB; ++b) {
        acc_a[b][0] = acc_a[b][1] = acc_b[b][0] = acc_b[b][1] = _mm512_setzero_ps();
      }
      for (int64_t c = c0; c < c1; c += kBlock) {
        const int64_t off = c * kBits / 8;
        __m512 qa0, qa1, qb0, qb1;
        DecodeBlock<kBits>(ra + off, &qa0, &qa1);
        DecodeBlock<kBits>(rb + off, &qb0, &qb1);
        for (int b = 0; b < kNB; ++b) {
          const __m512 x0 = _mm512_loadu_ps(xp + b * K + c);
          const __m512 x1 = _mm512_loadu_ps(xp + b * K + c + 16);
          acc_a[b][0] = _mm512_fmadd_ps(qa0, x0, acc_a[b][0]);
          acc_a[b][1] = _mm512_fmadd_ps(qa1, x1, acc_a[b][1]);
          acc_b[b][0] = _mm512_fmadd_ps(qb0, x0, acc_b[b][0]);
          acc_b[b][1] = _mm512_fmadd_ps(qb1, x1, acc_b[b][1]);
        }
      }
      const __m512 vsa = _mm512_set1_ps(sa[j]), vsb = _mm512_set1_ps(sb[j]);
      for (int b = 0; b < kNB; ++b) {
        tot_a[b] = _mm512_fmadd_ps(_mm512_add_ps(acc_a[b][0], acc_a[b][1]), vsa, tot_a[b]);
        tot_b[b] = _mm512_fmadd_ps(_mm512_add_ps(acc_b[b][0], acc_b[b][1]), vsb, tot_b[b]);
      }
    }
    for (int b = 0; b < kNB; ++b) {
      const float* xpb = xp + b * K;
      const float* xsb = xsum + b * G;
      y[b * ldy + r] = Reduce(tot_a[b]) +
                       RestMinusOffset<kBits>(ra, sa.data(), za.data(), xpb, xsb, K, g, G, full);
      y[b * ldy + r + 1] = Reduce(tot_b[b]) + RestMinusOffset<kBits>(rb, sb.data(), zb.data(), xpb,
                                                                     xsb, K, g, G, full);
    }
  }
  if (r < r1) GemvRows<kBits, kNB>(w, prep, r, r1, y, ldy);
}

template <int kBits>
void GemvNB(const QuantMatrix& w, int64_t nb, const float* prep, int64_t r0, int64_t r1, float* y,
            int64_t ldy) {
  switch (nb) {
    case 1:
      return GemvRows<kBits, 1>(w, prep, r0, r1, y, ldy);
    case 2:
      return GemvRows<kBits, 2>(w, prep, r0, r1, y, ldy);
    case 3:
      return GemvRows<kBits, 3>(w, prep, r0, r1, y, ldy);
    default:
      return GemvRows<kBits, 4>(w, prep, r0, r1, y, ldy);
  }
}

void Gemv(const QuantMatrix& w, const float* x, int64_t nb, const float* prep, int64_t r0,
          int64_t r1, float* y, int64_t ldy) {
  static_assert(kGemvMaxBatch == 4, "GemvNB handles up to 4 rows of x");
  if (!Fused(w)) return Avx2MatmulKernels()->gemv(w, x, nb, prep, r0, r1, y, ldy);
  switch (w.bits) {
    case 8:
      return GemvNB<8>(w, nb, prep, r0, r1, y, ldy);
    case 4:
      return GemvNB<4>(w, nb, prep, r0, r1, y, ldy);
    default:
      return GemvNB<2>(w, nb, prep, r0, r1, y, ldy);
  }
}

}  // namespace

const MatmulKernels* Avx512MatmulKernels() {
  static const MatmulKernels* table = []() -> const MatmulKernels* {
    const MatmulKernels* avx2 = Avx2MatmulKernels();
    if (avx2 == nullptr || !CpuHasAvx512()) return nullptr;
    static MatmulKernels k = *avx2;
    k.name = "avx512";
    k.gemv_prep_floats = PrepFloats;
    k.gemv_prepare = Prepare;
    k.gemv = Gemv;
    return &k;
  }();
  return table;
}

}  // namespace arrowquant::kernels
