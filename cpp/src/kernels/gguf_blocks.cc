// ggml block codecs (see gguf_blocks.h): the type table, exact decoders,
// llama.cpp's reference rounding for Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1, plain rounding for
// the other types, and the error-minimizing search of every layout. The
// search is scalar code shared by every path; only its evaluation passes
// (gguf_block_passes.h) have SIMD twins, so the choices and bytes are the
// same on every CPU.
#include "arrowquant/gguf_blocks.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "arrowquant/dtype.h"
#include "arrowquant/parallel.h"
#include "kernels/gguf_block_passes.h"
#include "kernels/param_search.h"
#include "kernels/row_kernels.h"

namespace arrowquant {

// ---- scalar evaluation passes ------------------------------------------------

namespace kernels {
namespace {

template <bool kWeighted, bool kOffset>
void ScalarEvalAffineT(const float* x0, const float* w0, int n, const BlockCand* c,
                       const uint8_t* sub, int k, float lo, float hi, bool sums, BlockFit* out) {
  for (int j = 0; j < k; ++j) {
    const int64_t off = sub != nullptr ? static_cast<int64_t>(sub[j]) * n : 0;
    const float* x = x0 + off;
    const float* w = kWeighted ? w0 + off : nullptr;
    const float a = c[j].a, b = c[j].b;
    const float inv = a != 0.0f ? 1.0f / a : 0.0f;
    float err[8] = {0}, sv[8] = {0}, svv[8] = {0}, sxv[8] = {0};
    for (int i = 0; i < n; ++i) {
      const float t = kOffset ? (x[i] + b) * inv : x[i] * inv;
      const float v = std::min(std::max(std::nearbyint(t), lo), hi);
      const float e = x[i] - (kOffset ? a * v - b : a * v);
      if constexpr (kWeighted) {
        err[i & 7] += w[i] * (e * e);
        if (sums) {
          const float wv = w[i] * v;
          if (kOffset) sv[i & 7] += wv;
          svv[i & 7] += wv * v;
          sxv[i & 7] += wv * x[i];
        }
      } else {
        err[i & 7] += e * e;
        if (sums) {
          if (kOffset) sv[i & 7] += v;
          svv[i & 7] += v * v;
          sxv[i & 7] += v * x[i];
        }
      }
    }
    BlockFit f{ReduceLanes(err), 0.0f, 0.0f, 0.0f};
    if (sums) {
      f.sv = ReduceLanes(sv);
      f.svv = ReduceLanes(svv);
      f.sxv = ReduceLanes(sxv);
    }
    out[j] = f;
  }
}

void ScalarEvalAffine(const float* x, const float* w, int n, const BlockCand* c, const uint8_t* sub,
                      int k, float lo, float hi, bool sums, BlockFit* out) {
  if (w != nullptr) {
    ScalarEvalAffineT<true, true>(x, w, n, c, sub, k, lo, hi, sums, out);
  } else {
    ScalarEvalAffineT<false, true>(x, w, n, c, sub, k, lo, hi, sums, out);
  }
}

void ScalarEvalSymmetric(const float* x, const float* w, int n, const BlockCand* c,
                         const uint8_t* sub, int k, float lo, float hi, bool sums, BlockFit* out) {
  if (w != nullptr) {
    ScalarEvalAffineT<true, false>(x, w, n, c, sub, k, lo, hi, sums, out);
  } else {
    ScalarEvalAffineT<false, false>(x, w, n, c, sub, k, lo, hi, sums, out);
  }
}

template <bool kWeighted>
void ScalarEvalGridT(const float* x0, const float* w0, int n, const BlockCand* c,
                     const uint8_t* sub, int k, const CodeGrid& g, bool sums, BlockFit* out) {
  for (int j = 0; j < k; ++j) {
    const int64_t off = sub != nullptr ? static_cast<int64_t>(sub[j]) * n : 0;
    const float* x = x0 + off;
    const float* w = kWeighted ? w0 + off : nullptr;
    const float a = c[j].a;
    const float inv = a != 0.0f ? 1.0f / a : 0.0f;
    float err[8] = {0}, svv[8] = {0}, sxv[8] = {0};
    for (int i = 0; i < n; ++i) {
      const float t = x[i] * inv;
      int idx = 0;
      for (int m = 0; m < 15; ++m) idx += t > g.mid[m] ? 1 : 0;
      const float v = g.value[idx];
      const float e = x[i] - a * v;
      if constexpr (kWeighted) {
        err[i & 7] += w[i] * (e * e);
        if (sums) {
          const float wv = w[i] * v;
          svv[i & 7] += wv * v;
          sxv[i & 7] += wv * x[i];
        }
      } else {
        err[i & 7] += e * e;
        if (sums) {
          svv[i & 7] += v * v;
          sxv[i & 7] += v * x[i];
        }
      }
    }
    BlockFit f{ReduceLanes(err), 0.0f, 0.0f, 0.0f};
    if (sums) {
      f.svv = ReduceLanes(svv);
      f.sxv = ReduceLanes(sxv);
    }
    out[j] = f;
  }
}

void ScalarEvalGrid(const float* x, const float* w, int n, const BlockCand* c, const uint8_t* sub,
                    int k, const CodeGrid& g, bool sums, BlockFit* out) {
  if (w != nullptr) {
    ScalarEvalGridT<true>(x, w, n, c, sub, k, g, sums, out);
  } else {
    ScalarEvalGridT<false>(x, w, n, c, sub, k, g, sums, out);
  }
}

void ScalarCodesAffine(const float* x, int n, BlockCand c, float lo, float hi, int8_t* q) {
  const float inv = c.a != 0.0f ? 1.0f / c.a : 0.0f;
  for (int i = 0; i < n; ++i) {
    q[i] = static_cast<int8_t>(std::min(std::max(std::nearbyint((x[i] + c.b) * inv), lo), hi));
  }
}

void ScalarCodesGrid(const float* x, int n, float a, const CodeGrid& g, int8_t* q) {
  const float inv = a != 0.0f ? 1.0f / a : 0.0f;
  for (int i = 0; i < n; ++i) {
    const float t = x[i] * inv;
    int idx = 0;
    for (int m = 0; m < 15; ++m) idx += t > g.mid[m] ? 1 : 0;
    q[i] = static_cast<int8_t>(idx);
  }
}

void ScalarMoments(const float* x, const float* w, int n, BlockMoments* out) {
  float lo = x[0], hi = x[0], amax = 0.0f;
  float sw[8] = {0}, swx[8] = {0}, swxx[8] = {0};
  for (int i = 0; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
    amax = std::max(amax, std::fabs(x[i]));
    const float wi = w != nullptr ? w[i] : 1.0f;
    const float wx = w != nullptr ? wi * x[i] : x[i];
    sw[i & 7] += wi;
    swx[i & 7] += wx;
    swxx[i & 7] += wx * x[i];
  }
  *out = BlockMoments{lo + 0.0f,       hi + 0.0f,        amax,
                      ReduceLanes(sw), ReduceLanes(swx), ReduceLanes(swxx)};
}

bool ScalarAllFinite(const float* x, int n) {
  for (int i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) return false;
  }
  return true;
}

double ScalarErrorF64(const float* x, const float* w, const float* y, int n) {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  for (int i = 0; i < n; ++i) {
    const double e = static_cast<double>(x[i]) - static_cast<double>(y[i]);
    acc[i & 3] += w != nullptr ? static_cast<double>(w[i]) * (e * e) : e * e;
  }
  return (acc[0] + acc[2]) + (acc[1] + acc[3]);
}

const BlockPasses kScalarBlockPasses = {
    "scalar",        ScalarEvalAffine, ScalarEvalSymmetric, ScalarEvalGrid, ScalarCodesAffine,
    ScalarCodesGrid, ScalarMoments,    ScalarAllFinite,     ScalarErrorF64, &ScalarSearchPasses()};

}  // namespace

const BlockPasses& ScalarBlockPasses() { return kScalarBlockPasses; }

const BlockPasses& SelectBlockPasses(bool force_scalar) {
  if (!force_scalar) {
    if (const BlockPasses* avx2 = Avx2BlockPasses()) return *avx2;
  }
  return kScalarBlockPasses;
}

}  // namespace kernels

namespace gguf {

using kernels::BlockCand;
using kernels::BlockFit;
using kernels::BlockPasses;
using kernels::CodeGrid;

// ---- types -------------------------------------------------------------------

namespace {

struct TypeEntry {
  uint32_t type;
  const char* name;
  int64_t block_size;
  int64_t block_bytes;
};

// Block geometry of the ggml types (GGML_QUANT_SIZES); the reader needs it to
// bound every tensor, the codecs below handle the quantized types of
// IsBlockType plus F16 and F32.
constexpr TypeEntry kTypes[] = {
    {0, "F32", 1, 4},         {1, "F16", 1, 2},         {2, "Q4_0", 32, 18},
    {3, "Q4_1", 32, 20},      {6, "Q5_0", 32, 22},      {7, "Q5_1", 32, 24},
    {8, "Q8_0", 32, 34},      {9, "Q8_1", 32, 40},      {10, "Q2_K", 256, 84},
    {11, "Q3_K", 256, 110},   {12, "Q4_K", 256, 144},   {13, "Q5_K", 256, 176},
    {14, "Q6_K", 256, 210},   {15, "Q8_K", 256, 292},   {16, "IQ2_XXS", 256, 66},
    {17, "IQ2_XS", 256, 74},  {18, "IQ3_XXS", 256, 98}, {19, "IQ1_S", 256, 50},
    {20, "IQ4_NL", 32, 18},   {21, "IQ3_S", 256, 110},  {22, "IQ2_S", 256, 82},
    {23, "IQ4_XS", 256, 136}, {24, "I8", 1, 1},         {25, "I16", 1, 2},
    {26, "I32", 1, 4},        {27, "I64", 1, 8},        {28, "F64", 1, 8},
    {29, "IQ1_M", 256, 56},   {30, "BF16", 1, 2},
};

const TypeEntry* FindType(uint32_t type) {
  for (const TypeEntry& e : kTypes) {
    if (e.type == type) return &e;
  }
  return nullptr;
}

constexpr GgmlType kBlockTypes[] = {GgmlType::kQ8_0, GgmlType::kQ4_0,   GgmlType::kQ4_1,
                                    GgmlType::kQ5_0, GgmlType::kQ5_1,   GgmlType::kQ2_K,
                                    GgmlType::kQ3_K, GgmlType::kQ4_K,   GgmlType::kQ5_K,
                                    GgmlType::kQ6_K, GgmlType::kIQ4_NL, GgmlType::kIQ4_XS};

const char* TypeName(GgmlType t) { return GgmlTypeName(static_cast<uint32_t>(t)); }

}  // namespace

Result<TypeTraits> GetTypeTraits(uint32_t type) {
  const TypeEntry* e = FindType(type);
  if (e == nullptr) return Status::FormatError("unknown ggml tensor type " + std::to_string(type));
  return TypeTraits{e->block_size, e->block_bytes};
}

const char* GgmlTypeName(uint32_t type) {
  const TypeEntry* e = FindType(type);
  return e == nullptr ? "unknown" : e->name;
}

bool IsBlockType(GgmlType type) {
  return std::find(std::begin(kBlockTypes), std::end(kBlockTypes), type) != std::end(kBlockTypes);
}

bool IsCodecType(GgmlType type) {
  return type == GgmlType::kF32 || type == GgmlType::kF16 || IsBlockType(type);
}

Result<GgmlType> ParseCodecType(const std::string& name) {
  std::string upper;
  for (char c : name)
    upper.push_back(static_cast<char>(std::toupper(static_cast<unsigned char>(c))));
  std::string all;
  for (const TypeEntry& e : kTypes) {
    const GgmlType t = static_cast<GgmlType>(e.type);
    if (!IsCodecType(t)) continue;
    if (upper == e.name) return t;
    all += (all.empty() ? "" : ", ") + std::string(e.name);
  }
  return Status::Invalid("GGUF type must be one of " + all + "; got '" + name + "'");
}

const char* BlockModeName(BlockMode mode) {
  return mode == BlockMode::kSearch ? "search" : "reference";
}

Result<BlockMode> ParseBlockMode(const std::string& name) {
  if (name == "search") return BlockMode::kSearch;
  if (name == "reference") return BlockMode::kReference;
  return Status::Invalid("block mode must be 'search' or 'reference', got '" + name + "'");
}

Result<uint64_t> RowBytes(GgmlType type, int64_t cols) {
  AQ_ASSIGN_OR_RETURN(TypeTraits t, GetTypeTraits(static_cast<uint32_t>(type)));
  if (cols <= 0 || cols % t.block_size != 0) {
    return Status::Invalid("row length " + std::to_string(cols) + " is not a multiple of " +
                           std::to_string(t.block_size) + " as " + TypeName(type) + " needs");
  }
  return static_cast<uint64_t>(cols / t.block_size) * static_cast<uint64_t>(t.block_bytes);
}

const char* ActiveBlockKernelName() { return kernels::SelectBlockPasses(false).name; }

namespace {

// ---- bytes ------------------------------------------------------------------

void PutHalf(uint8_t* p, float v) {
  const uint16_t h = FloatToHalf(v);
  p[0] = static_cast<uint8_t>(h);
  p[1] = static_cast<uint8_t>(h >> 8);
}
float GetHalf(const uint8_t* p) { return HalfToFloat(static_cast<uint16_t>(p[0] | (p[1] << 8))); }

// float16 storage of a positive scale (RoundScaleF16 of param_search.h):
// round to nearest even, a scale that would round to 0 stored as 2^-24.
float RoundScale(const BlockPasses& p, float s) {
  return arrowquant::kernels::RoundScaleWith(*p.search, s);
}
// The same for a scale of either sign (never 0 for s != 0); 0 stays +0.
float RoundSignedScale(const BlockPasses& p, float s) {
  if (s == 0.0f) return 0.0f;
  const float r = RoundScale(p, std::fabs(s));
  return s < 0.0f ? -r : r;
}
float RoundF16(const BlockPasses& p, float v) { return p.search->round_f16(v) + 0.0f; }

// The parameters and codes of one block as the layouts store them: d and
// dmin (Q4_1: m) are float16 values; sc / mn are sub-block scale and min
// codes; q are element codes (signed where the layout is: Q8_0 -127..127,
// Q4_0 -8..7, Q3_K -4..3, Q6_K -32..31; IQ4: grid indices 0..15).
struct BlockCode {
  float d = 0.0f;
  float dmin = 0.0f;
  int sc[16] = {};
  int mn[16] = {};
  int8_t q[256];  // every element is set by the encoder before packing
};

void PackBlock(GgmlType type, const BlockCode& c, uint8_t* out) {
  switch (type) {
    case GgmlType::kQ8_0:
      PutHalf(out, c.d);
      for (int j = 0; j < 32; ++j) out[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(c.q[j]));
      return;
    case GgmlType::kQ4_0:
      PutHalf(out, c.d);
      for (int j = 0; j < 16; ++j) {
        out[2 + j] = static_cast<uint8_t>((c.q[j] + 8) | ((c.q[j + 16] + 8) << 4));
      }
      return;
    case GgmlType::kQ4_1:
      PutHalf(out, c.d);
      PutHalf(out + 2, c.dmin);
      for (int j = 0; j < 16; ++j) out[4 + j] = static_cast<uint8_t>(c.q[j] | (c.q[j + 16] << 4));
      return;
    case GgmlType::kIQ4_NL:
      PutHalf(out, c.d);
      for (int j = 0; j < 16; ++j) out[2 + j] = static_cast<uint8_t>(c.q[j] | (c.q[j + 16] << 4));
      return;
    case GgmlType::kQ5_0:
    case GgmlType::kQ5_1: {
      // u = q (+ 16 for Q5_0) in 0..31: bit 4 of element j in qh bit j (a
      // little-endian uint32), low nibbles as Q4_0 / Q4_1.
      const bool q51 = type == GgmlType::kQ5_1;
      const int bias = q51 ? 0 : 16;
      PutHalf(out, c.d);
      if (q51) PutHalf(out + 2, c.dmin);
      uint8_t* qh = out + (q51 ? 4 : 2);
      uint32_t h = 0;
      for (int j = 0; j < 32; ++j) h |= static_cast<uint32_t>(((c.q[j] + bias) >> 4) & 1) << j;
      for (int b = 0; b < 4; ++b) qh[b] = static_cast<uint8_t>(h >> (8 * b));
      for (int j = 0; j < 16; ++j) {
        qh[4 + j] =
            static_cast<uint8_t>(((c.q[j] + bias) & 15) | (((c.q[j + 16] + bias) & 15) << 4));
      }
      return;
    }
    case GgmlType::kQ2_K: {
      for (int j = 0; j < 16; ++j) out[j] = static_cast<uint8_t>(c.sc[j] | (c.mn[j] << 4));
      // byte h * 32 + l: elements h * 128 + s * 32 + l at bits 2 s
      for (int h = 0; h < 2; ++h) {
        const int8_t* q = c.q + h * 128;
        for (int l = 0; l < 32; ++l) {
          out[16 + h * 32 + l] =
              static_cast<uint8_t>(q[l] | (q[32 + l] << 2) | (q[64 + l] << 4) | (q[96 + l] << 6));
        }
      }
      PutHalf(out + 80, c.d);
      PutHalf(out + 82, c.dmin);
      return;
    }
    case GgmlType::kQ3_K: {
      std::memset(out + 96, 0, 12);
      // u = q + 4 in 0..7: bit 2 in hmask[l] bit e / 32, bits 0-1 as Q2_K's.
      for (int l = 0; l < 32; ++l) {
        int m = 0;
        for (int b = 0; b < 8; ++b) m |= ((c.q[b * 32 + l] + 4) >> 2) << b;
        out[l] = static_cast<uint8_t>(m);
      }
      for (int h = 0; h < 2; ++h) {
        const int8_t* q = c.q + h * 128;
        for (int l = 0; l < 32; ++l) {
          out[32 + h * 32 + l] =
              static_cast<uint8_t>(((q[l] + 4) & 3) | (((q[32 + l] + 4) & 3) << 2) |
                                   (((q[64 + l] + 4) & 3) << 4) | (((q[96 + l] + 4) & 3) << 6));
        }
      }
      uint8_t* sc = out + 96;
      for (int i = 0; i < 16; ++i) {
        const int u = c.sc[i] + 32;  // 0..63
        if (i < 8) {
          sc[i] |= static_cast<uint8_t>(u & 15);
        } else {
          sc[i - 8] |= static_cast<uint8_t>((u & 15) << 4);
        }
        sc[8 + i % 4] |= static_cast<uint8_t>((u >> 4) << (2 * (i / 4)));
      }
      PutHalf(out + 108, c.d);
      return;
    }
    case GgmlType::kQ4_K:
    case GgmlType::kQ5_K: {
      const bool q5 = type == GgmlType::kQ5_K;
      // (every byte is written below)
      PutHalf(out, c.d);
      PutHalf(out + 2, c.dmin);
      uint8_t* s = out + 4;
      for (int j = 0; j < 4; ++j) {
        s[j] = static_cast<uint8_t>(c.sc[j] | ((c.sc[j + 4] >> 4) << 6));
        s[j + 4] = static_cast<uint8_t>(c.mn[j] | ((c.mn[j + 4] >> 4) << 6));
        s[j + 8] = static_cast<uint8_t>((c.sc[j + 4] & 15) | ((c.mn[j + 4] & 15) << 4));
      }
      uint8_t* qs = out + (q5 ? 48 : 16);
      // byte ch * 32 + l: element ch * 64 + l low, ch * 64 + 32 + l high nibble
      for (int ch = 0; ch < 4; ++ch) {
        const int8_t* q = c.q + ch * 64;
        for (int l = 0; l < 32; ++l) {
          qs[ch * 32 + l] = static_cast<uint8_t>((q[l] & 15) | ((q[32 + l] & 15) << 4));
        }
      }
      if (q5) {  // bit 4 of element b * 32 + l in qh[l] bit b
        for (int l = 0; l < 32; ++l) {
          int m = 0;
          for (int b = 0; b < 8; ++b) m |= (c.q[b * 32 + l] >> 4) << b;
          out[16 + l] = static_cast<uint8_t>(m);
        }
      }
      return;
    }
    case GgmlType::kQ6_K: {
      // u = q + 32 in 0..63; per half h: ql[h * 64 + l] holds elements
      // h * 128 + l (low nibble) and + 64 (high); qh[h * 32 + l] bits 2 s
      // the top two bits of element h * 128 + s * 32 + l.
      for (int h = 0; h < 2; ++h) {
        const int8_t* q = c.q + h * 128;
        for (int l = 0; l < 64; ++l) {
          out[h * 64 + l] =
              static_cast<uint8_t>(((q[l] + 32) & 15) | (((q[64 + l] + 32) & 15) << 4));
        }
        for (int l = 0; l < 32; ++l) {
          out[128 + h * 32 + l] =
              static_cast<uint8_t>(((q[l] + 32) >> 4) | (((q[32 + l] + 32) >> 4) << 2) |
                                   (((q[64 + l] + 32) >> 4) << 4) | (((q[96 + l] + 32) >> 4) << 6));
        }
      }
      for (int i = 0; i < 16; ++i)
        out[192 + i] = static_cast<uint8_t>(static_cast<int8_t>(c.sc[i]));
      PutHalf(out + 208, c.d);
      return;
    }
    case GgmlType::kIQ4_XS: {
      std::memset(out, 0, 136);
      PutHalf(out, c.d);
      uint16_t sh = 0;
      for (int i = 0; i < 8; ++i) {
        const int u = c.sc[i] + 32;  // 0..63
        out[4 + i / 2] |= static_cast<uint8_t>((u & 15) << (4 * (i % 2)));
        sh = static_cast<uint16_t>(sh | ((u >> 4) << (2 * i)));
      }
      out[2] = static_cast<uint8_t>(sh);
      out[3] = static_cast<uint8_t>(sh >> 8);
      for (int ib = 0; ib < 8; ++ib) {
        for (int j = 0; j < 16; ++j) {
          out[8 + ib * 16 + j] =
              static_cast<uint8_t>(c.q[ib * 32 + j] | (c.q[ib * 32 + j + 16] << 4));
        }
      }
      return;
    }
    default:
      return;
  }
}

// Decodes one block exactly as ggml's dequantize_row_* and gguf.quants do:
// each product and difference one float32 operation, in their order.
void DecodeBlock(GgmlType type, const uint8_t* p, float* y) {
  switch (type) {
    case GgmlType::kQ8_0: {
      const float d = GetHalf(p);
      for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(static_cast<int8_t>(p[2 + j])) * d;
      return;
    }
    case GgmlType::kQ4_0: {
      const float d = GetHalf(p);
      for (int j = 0; j < 16; ++j) {
        y[j] = d * static_cast<float>((p[2 + j] & 15) - 8);
        y[j + 16] = d * static_cast<float>((p[2 + j] >> 4) - 8);
      }
      return;
    }
    case GgmlType::kQ4_1: {
      const float d = GetHalf(p), m = GetHalf(p + 2);
      for (int j = 0; j < 16; ++j) {
        const float a = d * static_cast<float>(p[4 + j] & 15);
        const float b = d * static_cast<float>(p[4 + j] >> 4);
        y[j] = a + m;
        y[j + 16] = b + m;
      }
      return;
    }
    case GgmlType::kQ5_0:
    case GgmlType::kQ5_1: {
      const bool q51 = type == GgmlType::kQ5_1;
      const float d = GetHalf(p), m = q51 ? GetHalf(p + 2) : 0.0f;
      const uint8_t* qh = p + (q51 ? 4 : 2);
      const uint32_t h = static_cast<uint32_t>(qh[0]) | (static_cast<uint32_t>(qh[1]) << 8) |
                         (static_cast<uint32_t>(qh[2]) << 16) |
                         (static_cast<uint32_t>(qh[3]) << 24);
      for (int j = 0; j < 16; ++j) {
        const int u0 = (qh[4 + j] & 15) | static_cast<int>(((h >> j) & 1) << 4);
        const int u1 = (qh[4 + j] >> 4) | static_cast<int>(((h >> (j + 16)) & 1) << 4);
        if (q51) {
          const float a = d * static_cast<float>(u0);
          const float b = d * static_cast<float>(u1);
          y[j] = a + m;
          y[j + 16] = b + m;
        } else {
          y[j] = d * static_cast<float>(u0 - 16);
          y[j + 16] = d * static_cast<float>(u1 - 16);
        }
      }
      return;
    }
    case GgmlType::kIQ4_NL: {
      const float d = GetHalf(p);
      for (int j = 0; j < 16; ++j) {
        y[j] = d * static_cast<float>(kIq4nlGrid[p[2 + j] & 15]);
        y[j + 16] = d * static_cast<float>(kIq4nlGrid[p[2 + j] >> 4]);
      }
      return;
    }
    case GgmlType::kQ2_K: {
      const float d = GetHalf(p + 80), dmin = GetHalf(p + 82);
      for (int e = 0; e < 256; ++e) {
        const int j = e / 16;
        const float dl = d * static_cast<float>(p[j] & 15);
        const float ml = dmin * static_cast<float>(p[j] >> 4);
        const int h = e / 128, s = (e % 128) / 32, l = e % 32;
        const float q = static_cast<float>((p[16 + h * 32 + l] >> (2 * s)) & 3);
        y[e] = dl * q - ml;
      }
      return;
    }
    case GgmlType::kQ3_K: {
      const float d = GetHalf(p + 108);
      const uint8_t* sc = p + 96;
      for (int e = 0; e < 256; ++e) {
        const int i = e / 16;
        const int low = (i < 8 ? sc[i] : sc[i - 8] >> 4) & 15;
        const int high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
        const float dl = d * static_cast<float>((low | (high << 4)) - 32);
        const int h = e / 128, s = (e % 128) / 32, l = e % 32;
        const int ql = (p[32 + h * 32 + l] >> (2 * s)) & 3;
        const int hb = (p[l] >> (e / 32)) & 1;
        y[e] = dl * static_cast<float>(ql - (hb ? 0 : 4));
      }
      return;
    }
    case GgmlType::kQ4_K:
    case GgmlType::kQ5_K: {
      const bool q5 = type == GgmlType::kQ5_K;
      const float d = GetHalf(p), dmin = GetHalf(p + 2);
      const uint8_t* s = p + 4;
      const uint8_t* qs = p + (q5 ? 48 : 16);
      for (int j = 0; j < 8; ++j) {
        int sc, mn;
        if (j < 4) {
          sc = s[j] & 63;
          mn = s[j + 4] & 63;
        } else {
          sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
          mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
        const float dl = d * static_cast<float>(sc);
        const float ml = dmin * static_cast<float>(mn);
        for (int k = 0; k < 32; ++k) {
          const int e = j * 32 + k;
          int q = (qs[(e / 64) * 32 + k] >> (4 * ((e % 64) / 32))) & 15;
          if (q5) q |= ((p[16 + k] >> j) & 1) << 4;
          y[e] = dl * static_cast<float>(q) - ml;
        }
      }
      return;
    }
    case GgmlType::kQ6_K: {
      const float d = GetHalf(p + 208);
      for (int e = 0; e < 256; ++e) {
        const float dl = d * static_cast<float>(static_cast<int8_t>(p[192 + e / 16]));
        const int h = e / 128, r = e % 128;
        const int lo = (p[h * 64 + r % 64] >> (4 * (r / 64))) & 15;
        const int hi = (p[128 + h * 32 + r % 32] >> (2 * (r / 32))) & 3;
        y[e] = dl * static_cast<float>((lo | (hi << 4)) - 32);
      }
      return;
    }
    case GgmlType::kIQ4_XS: {
      const float d = GetHalf(p);
      const int sh = p[2] | (p[3] << 8);
      for (int ib = 0; ib < 8; ++ib) {
        const int u = ((p[4 + ib / 2] >> (4 * (ib % 2))) & 15) | (((sh >> (2 * ib)) & 3) << 4);
        const float dl = d * static_cast<float>(u - 32);
        for (int j = 0; j < 16; ++j) {
          const uint8_t b = p[8 + ib * 16 + j];
          y[ib * 32 + j] = dl * static_cast<float>(kIq4nlGrid[b & 15]);
          y[ib * 32 + j + 16] = dl * static_cast<float>(kIq4nlGrid[b >> 4]);
        }
      }
      return;
    }
    default:
      return;
  }
}

// ---- llama.cpp's reference rounding (quantize_row_*_ref) -----------------------
//
// Q8_0: d = max|x| / 127, q = roundf(x / d) (half away from zero).
// Q4_0: m = the x of largest |x| (first one), d = m / -8,
//   q = min(15, trunc(x / d + 8.5)).
// Q4_1: d = (max - min) / 15, q = min(15, trunc((x - min) / d + 0.5)).
// "/ d" is a multiplication by id = 1/d computed from the float32 d (0 when d
// is 0) before d is rounded to f16.

// trunc(v) as an int (v is within [0, 16.5] up to rounding); 0 for inf / NaN.
int TruncCode(float v) { return std::fabs(v) <= 64.0f ? static_cast<int>(v) : 0; }

void ReferenceQ8_0(const float* x, uint8_t* out) {
  float amax = 0.0f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  PutHalf(out, d);
  for (int j = 0; j < 32; ++j) {
    // roundf without the libm call: v - trunc(v) is exact for |v| <= 127.
    // (A subnormal block makes id infinite; ggml's conversion of the
    // resulting inf / NaN gives 0 on x86, and so does this one, without the
    // undefined cast.)
    const float v = x[j] * id;
    if (!(std::fabs(v) <= 128.0f)) {
      out[2 + j] = 0;
      continue;
    }
    int q = static_cast<int>(v);
    const float frac = v - static_cast<float>(q);
    if (frac >= 0.5f) {
      ++q;
    } else if (frac <= -0.5f) {
      --q;
    }
    out[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(q));
  }
}

void ReferenceQ4_0(const float* x, uint8_t* out) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < 32; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  const float d = max / -8.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  PutHalf(out, d);
  for (int j = 0; j < 16; ++j) {
    // x * id lies in [-8, 8], so the truncation is in [0, 16] (an infinite
    // id, from a subnormal block, gives code 0 as ggml's cast does on x86).
    const int q0 = std::min(15, TruncCode(x[j] * id + 8.5f));
    const int q1 = std::min(15, TruncCode(x[j + 16] * id + 8.5f));
    out[2 + j] = static_cast<uint8_t>(q0 | (q1 << 4));
  }
}

void ReferenceQ4_1(const float* x, uint8_t* out) {
  float lo = std::numeric_limits<float>::max();
  float hi = -std::numeric_limits<float>::max();
  for (int j = 0; j < 32; ++j) {
    lo = std::min(lo, x[j]);
    hi = std::max(hi, x[j]);
  }
  const float d = (hi - lo) / 15.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  PutHalf(out, d);
  PutHalf(out + 2, lo);
  for (int j = 0; j < 16; ++j) {
    const int q0 = std::min(15, TruncCode((x[j] - lo) * id + 0.5f));
    const int q1 = std::min(15, TruncCode((x[j + 16] - lo) * id + 0.5f));
    out[4 + j] = static_cast<uint8_t>(q0 | (q1 << 4));
  }
}

// Q5_0 / Q5_1: Q4_0 / Q4_1 with 32 levels (d = m / -16, q = min(31,
// trunc(x / d + 16.5)); d = (max - min) / 31, q = min(31, trunc((x - min) / d
// + 0.5))), the fifth bit of each code in qh.
void ReferenceQ5(bool q51, const float* x, uint8_t* out) {
  BlockCode c;
  float id = 0.0f, lo = 0.0f;
  if (q51) {
    lo = std::numeric_limits<float>::max();
    float hi = -std::numeric_limits<float>::max();
    for (int j = 0; j < 32; ++j) {
      lo = std::min(lo, x[j]);
      hi = std::max(hi, x[j]);
    }
    c.d = (hi - lo) / 31.0f;
    c.dmin = lo;
  } else {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; ++j) {
      if (amax < std::fabs(x[j])) {
        amax = std::fabs(x[j]);
        max = x[j];
      }
    }
    c.d = max / -16.0f;
  }
  id = c.d != 0.0f ? 1.0f / c.d : 0.0f;
  for (int j = 0; j < 32; ++j) {
    const int u = q51 ? std::min(31, TruncCode((x[j] - lo) * id + 0.5f))
                      : std::min(31, TruncCode(x[j] * id + 16.5f));
    c.q[j] = static_cast<int8_t>(q51 ? u : u - 16);
  }
  // PackBlock rounds d (and m) to float16 as the reference does.
  PackBlock(q51 ? GgmlType::kQ5_1 : GgmlType::kQ5_0, c, out);
}

// ---- layouts as the search sees them ----------------------------------------------

enum class Form : uint8_t {
  kAffine,     // x_hat = A q - B, q in [0, Q], B >= 0 for two-level (K mins)
  kSymmetric,  // x_hat = A q, q signed in [qlo, qhi]
  kGrid,       // x_hat = A g[q], g = kIq4nlGrid
};

struct Layout {
  GgmlType type;
  int block;  // values per block
  int sub;    // values per sub-block (== block: one level)
  Form form;
  float qlo, qhi;  // element code range (integer forms)
  int alo, ahi;    // sub-block scale codes (two levels)
  int bmax;        // sub-block min codes (two-level affine)
  // Stage-1 starts after the plain one (docs/gguf.md): clipped and anchored
  // ranges (ArrowQuant's superblock stage 1: MseClips-like fractions, then
  // kSuperblockAnchorClips), and / or a grid of scales: grid_n scales that
  // put the extreme t code steps beyond (or inside) the end of the code range,
  // t evenly spaced in [-grid_span, grid_span] (affine: anchored at the
  // minimum; hi_grid_n more anchored at the maximum; symmetric and grid
  // forms: the extreme at either end).
  const float* clips;
  int n_clips;
  int grid_n;
  float grid_span;
  int hi_grid_n;
  // Stage 2: how far the neighbours' min codes go (+-), affine forms.
  int min_reach;
  // Filled by Layouts() from the above: the grid's scales as factors of the
  // range (affine: 1 / (Q + t); hi_frac: Q / (Q + t), the anchored range's
  // fraction) or of the extreme (1 / (lo - t), 1 / (hi + t)), and 1 / Q.
  float lo_f[8] = {};
  float hi_f[8] = {};
  float hi_frac[8] = {};
  bool grid_zero[8] = {};  // t = 0: the plain start itself
  float inv_q = 0.0f;
  float inv_lo = 0.0f, inv_hi = 0.0f;  // symmetric and grid forms: 1 / code-range ends
  bool two_level() const { return sub != block; }
  int subs() const { return block / sub; }
};

constexpr float kClips2[] = {0.8f, 0.6f};

// The start sets were chosen by measurement (numpy model of the search on
// Gaussian and importance-weighted blocks, docs/gguf.md): ranges win at
// 2 bits, scale grids at 3 bits and more. Q2_K's min codes (4 bits) move by
// +-1 in stage 2 (+-2 costs 20% of its time for 0.00-0.07 dB).
const Layout kLayoutSpecs[] = {
    {GgmlType::kQ8_0, 32, 32, Form::kSymmetric, -127.0f, 127.0f, 0, 0, 0, nullptr, 0, 4, 1.0f, 0,
     2},
    {GgmlType::kQ4_0, 32, 32, Form::kSymmetric, -8.0f, 7.0f, 0, 0, 0, nullptr, 0, 4, 1.0f, 0, 2},
    {GgmlType::kQ4_1, 32, 32, Form::kAffine, 0.0f, 15.0f, 0, 0, 0, nullptr, 0, 5, 1.0f, 4, 2},
    {GgmlType::kQ5_0, 32, 32, Form::kSymmetric, -16.0f, 15.0f, 0, 0, 0, nullptr, 0, 4, 1.0f, 0, 2},
    {GgmlType::kQ5_1, 32, 32, Form::kAffine, 0.0f, 31.0f, 0, 0, 0, nullptr, 0, 5, 1.0f, 4, 2},
    {GgmlType::kIQ4_NL, 32, 32, Form::kGrid, 0.0f, 0.0f, 0, 0, 0, nullptr, 0, 4, 1.0f, 0, 2},
    {GgmlType::kQ2_K, 256, 16, Form::kAffine, 0.0f, 3.0f, 0, 15, 15, kClips2, 2, 0, 0.0f, 0, 1},
    {GgmlType::kQ3_K, 256, 16, Form::kSymmetric, -4.0f, 3.0f, -32, 31, 0, nullptr, 0, 4, 1.0f, 0,
     2},
    {GgmlType::kQ4_K, 256, 32, Form::kAffine, 0.0f, 15.0f, 0, 63, 63, nullptr, 0, 5, 1.0f, 4, 2},
    {GgmlType::kQ5_K, 256, 32, Form::kAffine, 0.0f, 31.0f, 0, 63, 63, nullptr, 0, 5, 1.0f, 4, 2},
    {GgmlType::kQ6_K, 256, 16, Form::kSymmetric, -32.0f, 31.0f, -128, 127, 0, nullptr, 0, 4, 2.0f,
     0, 2},
    {GgmlType::kIQ4_XS, 256, 32, Form::kGrid, 0.0f, 0.0f, -32, 31, 0, nullptr, 0, 4, 1.0f, 0, 2},
};

float GridT(int i, int n, float span);

// The layouts with their derived factors.
const std::vector<Layout>& Layouts() {
  static const std::vector<Layout> all = [] {
    std::vector<Layout> v(std::begin(kLayoutSpecs), std::end(kLayoutSpecs));
    for (Layout& l : v) {
      const bool grid = l.form == Form::kGrid;
      const float lo = grid ? static_cast<float>(kIq4nlGrid[0]) : l.qlo;
      const float hi = grid ? static_cast<float>(kIq4nlGrid[15]) : l.qhi;
      const float step = grid ? (hi - lo) / 15.0f : 1.0f;
      for (int i = 0; i < l.grid_n; ++i) {
        const float t = GridT(i, l.grid_n, l.grid_span);
        l.grid_zero[i] = t == 0.0f;
        if (l.form == Form::kAffine) {
          l.lo_f[i] = 1.0f / (l.qhi + t);
        } else {
          l.lo_f[i] = 1.0f / (lo - t * step);
          l.hi_f[i] = 1.0f / (hi + t * step);
        }
      }
      for (int i = 0; i < l.hi_grid_n; ++i) {
        l.hi_frac[i] = l.qhi / (l.qhi + GridT(i, l.hi_grid_n, l.grid_span));
      }
      l.inv_q = l.form == Form::kAffine ? 1.0f / l.qhi : 0.0f;
      if (l.form != Form::kAffine) {
        l.inv_lo = 1.0f / lo;
        l.inv_hi = 1.0f / hi;
      }
    }
    return v;
  }();
  return all;
}

const Layout* FindLayout(GgmlType type) {
  for (const Layout& l : Layouts()) {
    if (l.type == type) return &l;
  }
  return nullptr;
}

const CodeGrid& Iq4Grid() {
  static const CodeGrid g = [] {
    CodeGrid c;
    for (int k = 0; k < 16; ++k) c.value[k] = static_cast<float>(kIq4nlGrid[k]);
    for (int k = 0; k < 15; ++k) c.mid[k] = (c.value[k] + c.value[k + 1]) * 0.5f;  // exact
    return c;
  }();
  return g;
}

// Ranks of the starting candidates' anchored ranges (shared with ArrowQuant's
// superblock stage 1, docs/FORMAT.md 9.6).
using arrowquant::kernels::kSuperblockAnchorClips;

// ---- one sub-block ----------------------------------------------------------------

// The integer code nearest to v (ties to even), clamped to [lo, hi] (|lo|,
// |hi| < 2^21): v is clamped to [lo - 1, hi + 1] first, then rounded by the
// 1.5 * 2^23 trick (exact in round-to-nearest-even, no libm call).
int NearestCode(float v, int lo, int hi) {
  v = std::min(std::max(v, static_cast<float>(lo - 1)), static_cast<float>(hi + 1));
  const float r = (v + 0x1.8p23f) - 0x1.8p23f;
  return std::min(std::max(static_cast<int>(r), lo), hi);
}

// Sums of one sub-block that do not depend on the candidate.
struct SubStats {
  float lo = 0.0f, hi = 0.0f;   // min, max (+0 for a zero)
  float m = 0.0f;               // the value of largest magnitude (the first one)
  float sw = 0.0f, swx = 0.0f;  // sum w and sum w x (unweighted: n and sum x), lane order
  float swxx = 0.0f;            // sum w x^2
};

SubStats Moments(const BlockPasses& p, const float* x, const float* w, int n) {
  kernels::BlockMoments bm;
  p.moments(x, w, n, &bm);
  SubStats s;
  s.lo = bm.lo;
  s.hi = bm.hi;
  for (int i = 0; i < n; ++i) {  // the first value of largest magnitude
    if (std::fabs(x[i]) == bm.amax) {
      s.m = x[i] + 0.0f;
      break;
    }
  }
  s.sw = bm.sw;
  s.swx = bm.swx;
  s.swxx = bm.swxx;
  return s;
}

// Finite, and 1 / a finite unless a is 0 (|a| >= 2^-126 is enough).
bool Usable(const BlockCand& c) {
  return std::isfinite(c.a) && std::isfinite(c.b) && (c.a == 0.0f || std::fabs(c.a) >= 0x1p-126f);
}

// Evaluates candidates of one sub-block with the layout's code formula.
class SubEval {
 public:
  SubEval(const BlockPasses& p, const Layout& l, const float* x, const float* w, int n)
      : p_(p), l_(l), x_(x), w_(w), n_(n) {}

  // Candidate j on sub-block sub[j] (the n values at x + sub[j] * n; sub
  // null: all on the first).
  void Eval(const BlockCand* c, const uint8_t* sub, int k, bool sums, BlockFit* out) const {
    if (l_.form == Form::kGrid) {
      p_.eval_grid(x_, w_, n_, c, sub, k, Iq4Grid(), sums, out);
    } else if (l_.form == Form::kSymmetric) {
      p_.eval_symmetric(x_, w_, n_, c, sub, k, l_.qlo, l_.qhi, sums, out);
    } else {
      p_.eval_affine(x_, w_, n_, c, sub, k, l_.qlo, l_.qhi, sums, out);
    }
  }
  void Eval(const BlockCand* c, int k, bool sums, BlockFit* out) const {
    Eval(c, nullptr, k, sums, out);
  }

  // The element codes of candidate c, exactly as the passes compute them
  // (integer forms: the code value; grid: the index).
  void Codes(const BlockCand& c, int8_t* q) const {
    if (l_.form == Form::kGrid) {
      p_.codes_grid(x_, n_, c.a, Iq4Grid(), q);
    } else {
      p_.codes_affine(x_, n_, c, l_.qlo, l_.qhi, q);
    }
  }

  const Layout& layout() const { return l_; }
  const BlockPasses& passes() const { return p_; }
  const float* x() const { return x_; }
  int n() const { return n_; }

 private:
  const BlockPasses& p_;
  const Layout& l_;
  const float* x_;
  const float* w_;
  int n_;
};

// Least-squares parameters for the codes behind a fit (float64): affine
// x ~ a v - b (b >= 0 when b_nonneg; a > 0), otherwise x ~ a v (a of either
// sign). False when degenerate or not finite.
bool Refit(const Layout& l, const BlockFit& f, const SubStats& s, bool b_nonneg, BlockCand* out) {
  const double svv = f.svv, sxv = f.sxv;
  if (l.form != Form::kAffine) {
    if (!(svv > 0.0)) return false;
    const BlockCand c{static_cast<float>(sxv / svv), 0.0f};
    if (c.a == 0.0f || !Usable(c)) return false;
    *out = c;
    return true;
  }
  const double sw = s.sw, sx = s.swx, sv = f.sv;
  const double det = sw * svv - sv * sv;
  if (!(det > 0.0)) return false;
  // b >= 0 iff a sv >= sx, i.e. (sw sxv - sx sv) sv >= sx det: one division.
  double a = 0.0, b = 0.0;
  const double num = sw * sxv - sx * sv;
  if (b_nonneg && num * sv < sx * det) {
    a = sxv / svv;
  } else {
    a = num / det;
    b = (a * sv - sx) / sw;
  }
  if (!(a > 0.0)) return false;
  const BlockCand c{static_cast<float>(a), static_cast<float>(b) + 0.0f};
  if (!Usable(c) || c.a == 0.0f) return false;
  *out = c;
  return true;
}

// The stored precision of a one-level candidate: a to float16 (a scale of
// either sign for symmetric / grid forms, >= 0 for affine) and Q4_1's min
// m = -b to float16. False when not representable.
bool StoreF16(const BlockPasses& p, const Layout& l, BlockCand* c) {
  if (l.form == Form::kAffine) {
    c->a = c->a > 0.0f ? RoundScale(p, c->a) : 0.0f;
    c->b = -RoundF16(p, -c->b);
  } else {
    c->a = RoundSignedScale(p, c->a);
    c->b = 0.0f;
  }
  return Usable(*c);
}

// The float32 candidate of a range [lo, hi] (affine forms): a = (hi - lo) / Q,
// b = -lo; when b_nonneg (K-quant mins are >= 0) lo is lowered to <= 0, the
// range stretching to reach 0. False when a or b is not finite.
bool RangeCand(const Layout& l, float lo, float hi, bool b_nonneg, BlockCand* c) {
  if (b_nonneg) lo = std::min(lo, 0.0f);
  if (hi < lo) hi = lo;
  c->a = (hi - lo) / l.qhi;
  c->b = -lo + 0.0f;
  return std::isfinite(c->a) && std::isfinite(c->b);
}

// t of grid point i of n in [-span, span].
float GridT(int i, int n, float span) {
  return n > 1 ? -span + 2.0f * span * static_cast<float>(i) / static_cast<float>(n - 1) : 0.0f;
}

// Starting candidates of stage 1, in order (docs/gguf.md): the plain rounding
// start, then the layout's clipped and anchored ranges and scale grids.
// Candidates equal to an earlier one are dropped.
int Starts(const BlockPasses& p, const Layout& l, const SubStats& s, bool b_nonneg, bool f16,
           BlockCand* out) {
  // All candidates first (straight-line code), then the filter.
  int n = 0;
  if (l.form == Form::kAffine) {
    const float lo0 = b_nonneg ? std::min(s.lo, 0.0f) : s.lo;
    const float hi0 = s.hi;
    BlockCand c;
    if (RangeCand(l, lo0, hi0, b_nonneg, &c)) out[n++] = c;
    const float r = hi0 - lo0;
    if (r > 0.0f && std::isfinite(r)) {
      const float mid = lo0 + r * 0.5f;
      for (int j = 0; j < l.n_clips; ++j) {
        const float half = r * l.clips[j] * 0.5f;
        if (RangeCand(l, mid - half, mid + half, b_nonneg, &c)) out[n++] = c;
      }
      if (l.n_clips > 0) {
        for (const float cl : kSuperblockAnchorClips) {
          if (RangeCand(l, lo0, lo0 + r * cl, b_nonneg, &c)) out[n++] = c;
          if (RangeCand(l, hi0 - r * cl, hi0, b_nonneg, &c)) out[n++] = c;
        }
      }
      for (int i = 0; i < l.grid_n; ++i) {
        if (!l.grid_zero[i]) out[n++] = BlockCand{r * l.lo_f[i], -lo0 + 0.0f};
      }
      for (int i = 0; i < l.hi_grid_n; ++i) {
        float lo1 = hi0 - r * l.hi_frac[i];
        if (b_nonneg) lo1 = std::min(lo1, 0.0f);
        out[n++] = BlockCand{(hi0 - lo1) * l.inv_q, -lo1 + 0.0f};
      }
    }
  } else if (s.m == 0.0f) {
    out[n++] = BlockCand{0.0f, 0.0f};
  } else {
    // The extreme on the longer (negative) side first: the plain start (a
    // multiplication by 1 / lo here).
    const bool both = l.inv_hi != -l.inv_lo;  // an asymmetric code range: try either end
    out[n++] = BlockCand{s.m * l.inv_lo, 0.0f};
    for (int j = 0; j < l.n_clips; ++j) {
      out[n++] = BlockCand{s.m * l.clips[j] * l.inv_lo, 0.0f};
      if (both) out[n++] = BlockCand{s.m * l.clips[j] * l.inv_hi, 0.0f};
    }
    for (int i = 0; i < l.grid_n; ++i) {
      if (!l.grid_zero[i]) out[n++] = BlockCand{s.m * l.lo_f[i], 0.0f};
      if (both) out[n++] = BlockCand{s.m * l.hi_f[i], 0.0f};
    }
  }
  int k = 0;
  for (int i = 0; i < n; ++i) {
    BlockCand c = out[i];
    if (f16) {
      if (!StoreF16(p, l, &c)) continue;
      // Rounded to float16, neighbouring starts often coincide.
      bool dup = false;
      for (int j = 0; j < k; ++j) dup |= out[j].a == c.a && out[j].b == c.b;
      if (dup) continue;
    }
    if (!Usable(c)) continue;
    out[k++] = c;
  }
  if (f16 && k > 0 && l.type == GgmlType::kQ8_0) {
    // The float16 neighbours of the plain start: at 8 bits the rounding of
    // the scale itself matters as much as the grid.
    const uint16_t h = FloatToHalf(std::fabs(out[0].a));
    const float sign = out[0].a < 0.0f ? -1.0f : 1.0f;
    for (int dh : {-1, 1}) {
      const int hn = static_cast<int>(h) + dh;
      if (hn <= 0 || hn >= 0x7C00) continue;
      const BlockCand c{sign * HalfToFloat(static_cast<uint16_t>(hn)), 0.0f};
      bool dup = false;
      for (int j = 0; j < k; ++j) dup |= out[j].a == c.a;
      if (!dup && Usable(c)) out[k++] = c;
    }
  }
  return k;
}

// The least error of any float32 parameters for the codes behind fit f
// (what Refit would reach, before rounding), from the sums; the fit's own
// error when the refit is degenerate.
double LeastSquaresError(const Layout& l, const BlockFit& f, const SubStats& s, bool b_nonneg) {
  const double svv = f.svv, sxv = f.sxv, sxx = s.swxx;
  if (l.form != Form::kAffine) return svv > 0.0 ? sxx - sxv * sxv / svv : f.err;
  if (!(s.sw > 0.0f)) return f.err;
  // Centered sums: the optimum a = cxv / cvv, b = (a sv - sx) / sw, error
  // sxx - sx^2 / sw - cxv^2 / cvv; b >= 0 iff cxv sv >= sx cvv.
  const double sx = s.swx, sv = f.sv, inv_sw = 1.0 / static_cast<double>(s.sw);
  const double cxv = sxv - sx * sv * inv_sw, cvv = svv - sv * sv * inv_sw;
  if (!(cvv > 0.0)) return f.err;
  if (b_nonneg && cxv * sv < sx * cvv) {
    return (svv > 0.0 && sxv > 0.0) ? sxx - sxv * sxv / svv : f.err;
  }
  if (!(cxv > 0.0)) return f.err;
  return sxx - sx * sx * inv_sw - cxv * cxv / cvv;
}

constexpr int kMaxStarts = 32;
constexpr int kFinalRefits = 3;

// Stage 1 of one sub-block (or the whole search of a one-level block): the
// starts, then kFinalRefits least-squares refits from the best so far; the
// candidate with the least error wins, ties keep the earlier one. f16:
// every candidate at float16 storage precision (one-level layouts). False
// when no candidate is usable.
constexpr int kMaxSubs = 16;

// Stage 1 of every sub-block of a block (or the whole search of a one-level
// block: subs = 1): for each sub-block its starts, then kFinalRefits
// least-squares refits from the start whose codes promise the least error;
// the candidate with the least error wins, ties keep the earlier one. The
// sub-blocks are searched side by side, each evaluation call serving all of
// them (the decisions are each sub-block's own). f16: every candidate at
// float16 storage precision (one-level layouts). found[j] is false when
// sub-block j had no usable candidate.
void SearchSubs(const SubEval& ev, const SubStats* st, int subs, bool b_nonneg, bool f16,
                BlockCand* best_c, BlockFit* best_f, bool* found) {
  const Layout& l = ev.layout();
  // The least-squares refit of a fit's codes at the stored precision.
  auto refit = [&](const SubStats& s, const BlockFit& from, BlockCand* c) {
    if (!Refit(l, from, s, b_nonneg, c)) return false;
    if (f16) {
      if (l.form == Form::kAffine) {
        // Round the scale, then the offset that is best for it.
        const float a16 = RoundScale(ev.passes(), c->a);
        const double b = (static_cast<double>(a16) * from.sv - s.swx) / s.sw;
        *c = BlockCand{a16, static_cast<float>(b)};
      }
      if (!StoreF16(ev.passes(), l, c)) return false;
    }
    return true;
  };
  BlockCand cand[kMaxSubs * kMaxStarts];
  BlockFit fit[kMaxSubs * kMaxStarts];
  uint8_t sub[kMaxSubs * kMaxStarts];
  int begin[kMaxSubs + 1];
  int total = 0;
  for (int j = 0; j < subs; ++j) {
    begin[j] = total;
    const int k = Starts(ev.passes(), l, st[j], b_nonneg, f16, cand + total);
    for (int i = 0; i < k; ++i) sub[total + i] = static_cast<uint8_t>(j);
    total += k;
  }
  begin[subs] = total;
  if (total > 0) ev.Eval(cand, sub, total, true, fit);
  BlockCand fc[kMaxSubs];
  BlockFit from[kMaxSubs];
  bool active[kMaxSubs];
  for (int j = 0; j < subs; ++j) {
    found[j] = active[j] = begin[j + 1] > begin[j];
    if (!found[j]) continue;
    // The best start by its own error, and the start whose codes promise the
    // least error after a refit (the refit's error for those codes, computed
    // from the sums, bounds its true error): the refits follow that one.
    int bi = begin[j], si = begin[j];
    double best_score = 0.0;
    for (int i = begin[j]; i < begin[j + 1]; ++i) {
      if (fit[i].err < fit[bi].err) bi = i;
      // (At float16 the refit is rounded afterwards; the unrounded optimum
      // ranks the starts as well.)
      const double score =
          std::min(static_cast<double>(fit[i].err), LeastSquaresError(l, fit[i], st[j], b_nonneg));
      if (i == begin[j] || score < best_score) {
        best_score = score;
        si = i;
      }
    }
    best_c[j] = cand[bi];
    best_f[j] = fit[bi];
    fc[j] = cand[si];
    from[j] = fit[si];
  }
  for (int t = 0; t < kFinalRefits; ++t) {
    int m = 0;
    for (int j = 0; j < subs; ++j) {
      if (!active[j]) continue;
      BlockCand c;
      const BlockCand& bc = best_c[j];
      if (!refit(st[j], from[j], &c) || (c.a == bc.a && c.b == bc.b) ||
          (c.a == fc[j].a && c.b == fc[j].b)) {  // degenerate, or a fixed point
        active[j] = false;
        continue;
      }
      cand[m] = c;
      sub[m++] = static_cast<uint8_t>(j);
    }
    if (m == 0) break;
    ev.Eval(cand, sub, m, true, fit);
    for (int i = 0; i < m; ++i) {
      const int j = sub[i];
      fc[j] = cand[i];
      from[j] = fit[i];
      if (fit[i].err < best_f[j].err) {
        best_c[j] = cand[i];
        best_f[j] = fit[i];
      }
    }
  }
}

// ---- two levels ---------------------------------------------------------------------

// Stage 2 of every sub-block of a block: codes (a, b) of each sub-block's
// scale and min under the super-block's units (A = d a, B = dmin b),
// searched by their true error: the nearest codes of stage 1, a
// least-squares requant, the neighbours (scale code +-1 x min code +-2 for
// affine; scale code +-1, +-2 otherwise) and a last requant (docs/FORMAT.md
// 9.6 step 5, for these formulas). A candidate replaces a sub-block's best
// only when its error is strictly smaller. As in stage 1, the sub-blocks go
// side by side, each evaluation call serving all of them.
class CodeSearch {
 public:
  CodeSearch(const SubEval& ev, const SubStats* st, int subs, float d, float dmin)
      : ev_(ev),
        l_(ev.layout()),
        st_(st),
        subs_(subs),
        d_(d),
        dmin_(dmin),
        inv_d_(d != 0.0f ? 1.0f / d : 0.0f),
        inv_dmin_(dmin != 0.0f ? 1.0f / dmin : 0.0f) {}

  // Codes nearest to a float32 candidate: a * (1 / d), b * (1 / dmin).
  void Nearest(const BlockCand& c, int* a, int* b) const {
    *a = d_ != 0.0f ? NearestCode(c.a * inv_d_, l_.alo, l_.ahi) : 0;
    *b = (l_.form == Form::kAffine && dmin_ > 0.0f)
             ? NearestCode(std::max(c.b, 0.0f) * inv_dmin_, 0, l_.bmax)
             : 0;
  }

  BlockCand Cand(int a, int b) const {
    return BlockCand{d_ * static_cast<float>(a), dmin_ * static_cast<float>(b)};
  }

  // The search from each sub-block's stage-1 parameters start[j].
  void Run(const BlockCand* start) {
    for (int j = 0; j < subs_; ++j) {
      Nearest(start[j], &a_[j], &b_[j]);
      Add(j, a_[j], b_[j]);
    }
    EvalPending(true, /*first=*/true);
    Requant();
    // The neighbours of each sub-block's best. Offsets that leave the code
    // range are skipped: clamped, they would repeat the best or another one.
    const bool affine = l_.form == Form::kAffine;
    const int breach = affine ? l_.min_reach : 0;
    const int areach = affine ? 1 : 2;
    for (int j = 0; j < subs_; ++j) {
      const int a0 = a_[j], b0 = b_[j];
      for (int i = -areach; i <= areach; ++i) {
        for (int t = -breach; t <= breach; ++t) {
          const int a2 = a0 + i, b2 = b0 + t;
          if ((i == 0 && t == 0) || a2 < l_.alo || a2 > l_.ahi || b2 < 0 || b2 > l_.bmax) continue;
          Add(j, a2, b2);
        }
      }
    }
    EvalPending(false, false);
    Requant();
  }

  int a(int j) const { return a_[j]; }
  int b(int j) const { return b_[j]; }

 private:
  static constexpr int kMaxPending = kMaxSubs * 16;

  void Add(int j, int a, int b) {
    pa_[n_] = a;
    pb_[n_] = b;
    sub_[n_] = static_cast<uint8_t>(j);
    cand_[n_++] = Cand(a, b);
  }

  // Evaluates the pending candidates (with the refit sums or the error
  // only) and keeps each one that is strictly better than its sub-block's
  // best (first: the sub-blocks have no best yet).
  void EvalPending(bool sums, bool first) {
    if (n_ == 0) return;
    ev_.Eval(cand_, sub_, n_, sums, fit_);
    for (int i = 0; i < n_; ++i) {
      const int j = sub_[i];
      if (first || fit_[i].err < best_[j].err) {
        if (sums) {
          best_[j] = fit_[i];
        } else {
          best_[j].err = fit_[i].err;
        }
        a_[j] = pa_[i];
        b_[j] = pb_[i];
        sums_current_[j] = sums;
      }
    }
    n_ = 0;
  }

  // The least-squares refit of each sub-block's best codes, then its nearest
  // codes, evaluated when they differ from the best.
  void Requant() {
    for (int j = 0; j < subs_; ++j) {  // refresh the sums of bests found by error only
      if (!sums_current_[j]) Add(j, a_[j], b_[j]);
    }
    if (n_ > 0) {
      ev_.Eval(cand_, sub_, n_, true, fit_);
      for (int i = 0; i < n_; ++i) {
        const int j = sub_[i];
        const float err = best_[j].err;
        best_[j] = fit_[i];
        best_[j].err = err;  // the same value, from the same pass
        sums_current_[j] = true;
      }
      n_ = 0;
    }
    for (int j = 0; j < subs_; ++j) {
      BlockCand c;
      if (!Refit(l_, best_[j], st_[j], /*b_nonneg=*/true, &c)) continue;
      int a = 0, b = 0;
      Nearest(c, &a, &b);
      if (a != a_[j] || b != b_[j]) Add(j, a, b);
    }
    EvalPending(true, false);
  }

  const SubEval& ev_;
  const Layout& l_;
  const SubStats* st_;
  int subs_;
  float d_, dmin_, inv_d_, inv_dmin_;
  BlockFit best_[kMaxSubs];
  bool sums_current_[kMaxSubs] = {};
  int a_[kMaxSubs] = {}, b_[kMaxSubs] = {};
  // pending candidates
  BlockCand cand_[kMaxPending];
  BlockFit fit_[kMaxPending];
  uint8_t sub_[kMaxPending];
  int pa_[kMaxPending], pb_[kMaxPending];
  int n_ = 0;
};

// The f16 units of a super-block from its sub-blocks' float32 parameters:
// affine d = Rs(max A / ahi), dmin = Rs(max B / bmax); symmetric and grid
// d = Rs(A_ext / alo) for the A of largest magnitude (it gets the most
// negative code). 0 when every parameter is 0. False when a unit overflows
// float16.
bool Units(const BlockPasses& ps, const Layout& l, const BlockCand* p, int subs, float* d,
           float* dmin) {
  if (l.form == Form::kAffine) {
    float amax = 0.0f, bmax = 0.0f;
    for (int j = 0; j < subs; ++j) {
      amax = std::max(amax, p[j].a);
      bmax = std::max(bmax, p[j].b);
    }
    *d = amax > 0.0f ? RoundScale(ps, amax / static_cast<float>(l.ahi)) : 0.0f;
    *dmin = bmax > 0.0f ? RoundScale(ps, bmax / static_cast<float>(l.bmax)) : 0.0f;
    return std::isfinite(*d) && std::isfinite(*dmin);
  }
  float ext = 0.0f;
  for (int j = 0; j < subs; ++j) {
    if (std::fabs(p[j].a) > std::fabs(ext)) ext = p[j].a;
  }
  *d = RoundSignedScale(ps, ext / static_cast<float>(l.alo));
  *dmin = 0.0f;
  return std::isfinite(*d);
}

// Fills the codes of a two-level block from each sub-block's (A, B): units,
// nearest codes, element codes. search: the code search of each sub-block
// instead of the nearest codes. False when a unit overflows.
// Factors of the maxima units tried by RefineUnits.
constexpr float kUnitFactors[] = {0.94f, 0.88f};

// The unit (of the scales: kind 0; of the mins: kind 1) among u0,
// u0 * kUnitFactors and the least-squares unit for the best one's codes (at
// float16) that minimizes sum_j c_j (p_j - u q_j)^2,
// q_j the nearest code: each sub-block's stage-1 parameter p_j rounded to the
// unit's grid, weighted by the curvature c_j of the sub-block's error in that
// parameter (sum w v^2 for a scale, sum w for a min). Ties keep u0.
float RefineUnit(const BlockPasses& ps, const Layout& l, const BlockCand* p, const float* curv,
                 int subs, int kind, float u0) {
  if (u0 == 0.0f) return u0;
  const int lo = kind == 0 ? l.alo : 0, hi = kind == 0 ? l.ahi : l.bmax;
  auto cost = [&](float u) {
    const float inv = 1.0f / u;
    double c = 0.0;
    for (int j = 0; j < subs; ++j) {
      const float v = kind == 0 ? p[j].a : std::max(p[j].b, 0.0f);
      const double e =
          static_cast<double>(v) - static_cast<double>(u) * NearestCode(v * inv, lo, hi);
      c += static_cast<double>(curv[j]) * e * e;
    }
    return c;
  };
  float best = u0;
  double best_cost = cost(u0);
  auto consider = [&](float u) {
    if (!std::isfinite(u) || u == 0.0f || u == best) return;
    const double c = cost(u);
    if (c < best_cost) {
      best_cost = c;
      best = u;
    }
  };
  for (const float f : kUnitFactors) consider(RoundSignedScale(ps, u0 * f));
  // and the least-squares unit for the best's codes
  const float inv = 1.0f / best;
  double num = 0.0, den = 0.0;
  for (int j = 0; j < subs; ++j) {
    const float v = kind == 0 ? p[j].a : std::max(p[j].b, 0.0f);
    const double q = NearestCode(v * inv, lo, hi);
    num += static_cast<double>(curv[j]) * v * q;
    den += static_cast<double>(curv[j]) * q * q;
  }
  if (den > 0.0) consider(RoundSignedScale(ps, static_cast<float>(num / den)));
  return best;
}

bool TwoLevelCodes(const BlockPasses& p, const Layout& l, const float* x, const float* w,
                   const SubStats* st, const BlockCand* params, bool search, BlockCode* code,
                   const float* curv_a = nullptr, const float* curv_b = nullptr) {
  const int subs = l.subs();
  float d = 0.0f, dmin = 0.0f;
  if (!Units(p, l, params, subs, &d, &dmin)) return false;
  if (curv_a != nullptr) d = RefineUnit(p, l, params, curv_a, subs, 0, d);
  if (curv_b != nullptr) dmin = RefineUnit(p, l, params, curv_b, subs, 1, dmin);
  code->d = d;
  code->dmin = dmin;
  const SubEval ev(p, l, x, w, l.sub);
  CodeSearch cs(ev, st, subs, d, dmin);
  if (search) {
    cs.Run(params);
    for (int j = 0; j < subs; ++j) {
      code->sc[j] = cs.a(j);
      code->mn[j] = cs.b(j);
    }
  } else {
    for (int j = 0; j < subs; ++j) cs.Nearest(params[j], &code->sc[j], &code->mn[j]);
  }
  for (int j = 0; j < subs; ++j) {
    const SubEval evj(p, l, x + j * l.sub, w != nullptr ? w + j * l.sub : nullptr, l.sub);
    evj.Codes(cs.Cand(code->sc[j], code->mn[j]), code->q + j * l.sub);
  }
  return true;
}

// The plain rounding of one sub-block (docs: kReference): affine the range
// [min(lo, 0), max]; symmetric and grid the value of largest magnitude
// mapped to the most negative code.
BlockCand PlainParams(const Layout& l, const SubStats& s, bool b_nonneg) {
  if (l.form == Form::kAffine) {
    BlockCand c{0.0f, 0.0f};
    if (!RangeCand(l, b_nonneg ? std::min(s.lo, 0.0f) : s.lo, s.hi, b_nonneg, &c)) {
      c = BlockCand{std::numeric_limits<float>::infinity(), 0.0f};
    }
    return c;
  }
  const float lo = l.form == Form::kGrid ? Iq4Grid().value[0] : l.qlo;
  return BlockCand{s.m / lo, 0.0f};
}

Status TooLarge(const Layout& l) {
  return Status::Invalid(std::string("values too large for the float16 scales of ") +
                         TypeName(l.type) + "; store this tensor as F16 or F32");
}

// The decoded values of a block's codes: y = A v - B per sub-block with
// A = d * sc (two levels) or d, B = dmin * m (two-level affine), -m (Q4_1)
// or 0, and v the code (or its grid value): the same float32 operations as
// DecodeBlock on the packed bytes (x - (-m) is x + m; a * v - 0 is a * v),
// so the values are the decoder's.
void Reconstruct(const Layout& l, const BlockCode& c, float* y) {
  const CodeGrid& g = Iq4Grid();
  for (int j = 0; j < l.subs(); ++j) {
    float a = c.d, b = 0.0f;
    if (l.two_level()) {
      a = c.d * static_cast<float>(c.sc[j]);
      if (l.form == Form::kAffine) b = c.dmin * static_cast<float>(c.mn[j]);
    } else if (l.form == Form::kAffine) {
      b = -c.dmin;
    }
    const int8_t* q = c.q + j * l.sub;
    float* o = y + j * l.sub;
    if (l.form == Form::kGrid) {
      for (int i = 0; i < l.sub; ++i) o[i] = a * g.value[q[i]];
    } else if (l.form == Form::kAffine) {
      for (int i = 0; i < l.sub; ++i) o[i] = a * static_cast<float>(q[i]) - b;
    } else {
      for (int i = 0; i < l.sub; ++i) o[i] = a * static_cast<float>(q[i]);
    }
  }
}

// One-level blocks encoded together (consecutive blocks of a row).
constexpr int kGroupBlocks = 8;

// `count` consecutive blocks of one row (count 1 for two-level layouts, up
// to kGroupBlocks for one-level ones, searched side by side): plain rounding
// (mode kReference) or the search, whose result replaces the plain rounding
// of a block only when its decoded (weighted) error is not larger. y
// receives the decoded values. On error *failed is the failing block.
Status EncodeBlocks(const BlockPasses& p, const Layout& l, BlockMode mode, const float* x,
                    const float* w, int count, uint8_t* out, float* y, int* failed) {
  const int64_t bytes = GetTypeTraits(static_cast<uint32_t>(l.type))->block_bytes;
  BlockCode code[kGroupBlocks];
  SubStats st[kMaxSubs];
  BlockCand params[kMaxSubs];
  const int subs = l.two_level() ? l.subs() : count;  // sub-blocks, or the blocks
  for (int j = 0; j < subs; ++j) {
    st[j] = Moments(p, x + j * l.sub, w != nullptr ? w + j * l.sub : nullptr, l.sub);
  }
  // Plain rounding: bytes (llama.cpp's reference types) or codes.
  const bool plain_bytes = l.type == GgmlType::kQ8_0 || l.type == GgmlType::kQ4_0 ||
                           l.type == GgmlType::kQ4_1 || l.type == GgmlType::kQ5_0 ||
                           l.type == GgmlType::kQ5_1;
  for (int k = 0; k < count; ++k) {
    *failed = k;
    const float* xk = x + k * l.block;
    uint8_t* outk = out + k * bytes;
    float* yk = y + k * l.block;
    if (plain_bytes) {
      if (l.type == GgmlType::kQ8_0) {
        ReferenceQ8_0(xk, outk);
      } else if (l.type == GgmlType::kQ4_0) {
        ReferenceQ4_0(xk, outk);
      } else if (l.type == GgmlType::kQ5_0 || l.type == GgmlType::kQ5_1) {
        ReferenceQ5(l.type == GgmlType::kQ5_1, xk, outk);
      } else {
        ReferenceQ4_1(xk, outk);
      }
      DecodeBlock(l.type, outk, yk);
      // A float16 parameter that overflowed (the reference keeps it) cannot be stored.
      for (int i = 0; i < l.block; ++i) {
        if (!std::isfinite(yk[i])) return TooLarge(l);
      }
      continue;
    }
    if (l.two_level()) {
      for (int j = 0; j < subs; ++j) params[j] = PlainParams(l, st[j], true);
      if (!TwoLevelCodes(p, l, x, w, st, params, false, &code[0])) return TooLarge(l);
    } else {  // IQ4_NL
      BlockCand c = PlainParams(l, st[k], false);
      if (!StoreF16(p, l, &c)) return TooLarge(l);
      code[k].d = c.a;
      const SubEval ev(p, l, xk, w != nullptr ? w + k * l.block : nullptr, l.sub);
      ev.Codes(c, code[k].q);
    }
    Reconstruct(l, code[k], yk);
  }
  *failed = 0;
  bool done[kGroupBlocks] = {};  // the search's bytes are written
  if (mode == BlockMode::kSearch) {
    BlockCode sc[kGroupBlocks];
    bool ok[kGroupBlocks] = {};
    if (l.two_level()) {
      float curv_a[kMaxSubs], curv_b[kMaxSubs];
      BlockFit f[kMaxSubs];
      bool found[kMaxSubs];
      const SubEval ev(p, l, x, w, l.sub);
      SearchSubs(ev, st, subs, /*b_nonneg=*/true, /*f16=*/false, params, f, found);
      for (int j = 0; j < subs; ++j) {
        // No usable float32 start (values so small that 1 / scale overflows):
        // the plain parameters, which the float16 units can still follow.
        if (!found[j]) {
          params[j] = PlainParams(l, st[j], true);
          f[j].svv = 0.0f;
        }
        curv_a[j] = f[j].svv;
        curv_b[j] = st[j].sw;
      }
      ok[0] = TwoLevelCodes(p, l, x, w, st, params, true, &sc[0], curv_a,
                            l.form == Form::kAffine ? curv_b : nullptr);
    } else {
      const SubEval ev(p, l, x, w, l.sub);
      BlockFit f[kGroupBlocks];
      SearchSubs(ev, st, count, /*b_nonneg=*/false, /*f16=*/true, params, f, ok);
      for (int k = 0; k < count; ++k) {
        if (!ok[k]) continue;
        sc[k].d = params[k].a;
        sc[k].dmin = -params[k].b + 0.0f;  // Q4_1's / Q5_1's min
        const SubEval evk(p, l, x + k * l.block, w != nullptr ? w + k * l.block : nullptr, l.sub);
        evk.Codes(params[k], sc[k].q);
      }
    }
    for (int k = 0; k < count; ++k) {
      if (!ok[k]) continue;
      const float* xk = x + k * l.block;
      const float* wk = w != nullptr ? w + k * l.block : nullptr;
      float ys[256];
      Reconstruct(l, sc[k], ys);
      if (p.error_f64(xk, wk, ys, l.block) <= p.error_f64(xk, wk, y + k * l.block, l.block)) {
        PackBlock(l.type, sc[k], out + k * bytes);
        std::memcpy(y + k * l.block, ys, static_cast<size_t>(l.block) * sizeof(float));
        done[k] = true;
      }
    }
  }
  if (!plain_bytes) {
    for (int k = 0; k < count; ++k) {
      if (!done[k]) PackBlock(l.type, code[k], out + k * bytes);
    }
  }
  return Status::OK();
}

void AddStats(const float* x, const float* y, int64_t n, ErrorStats* s) {
  for (int64_t j = 0; j < n; ++j) {
    const double xv = x[j], yv = y[j], e = xv - yv;
    s->sum_x2 += xv * xv;
    s->sum_xhat2 += yv * yv;
    s->sum_x_xhat += xv * yv;
    s->sum_err2 += e * e;
    s->max_abs_err = std::max(s->max_abs_err, std::fabs(e));
  }
  s->count += n;
}

Status CheckShape(GgmlType type, int64_t rows, int64_t cols, int64_t* block) {
  if (!IsCodecType(type)) {
    return Status::Invalid(std::string("no block codec for GGUF type ") + TypeName(type));
  }
  const TypeTraits t = *GetTypeTraits(static_cast<uint32_t>(type));
  if (rows < 0) return Status::Invalid("negative row count " + std::to_string(rows));
  if (cols <= 0 || cols % t.block_size != 0) {
    return Status::Invalid("row length " + std::to_string(cols) + " is not a multiple of " +
                           std::to_string(t.block_size) + " as " + TypeName(type) + " needs");
  }
  *block = t.block_size;
  return Status::OK();
}

std::string Where(int64_t row, int64_t col, int64_t cols) {
  return "row " + std::to_string(row) + ", column " + std::to_string(col) + " (element " +
         std::to_string(row * cols + col) + ")";
}

}  // namespace

Status QuantizeBlocks(GgmlType type, const float* x, int64_t rows, int64_t cols, uint8_t* out,
                      const BlockOptions& opts, ErrorStats* stats) {
  int64_t bs = 0;
  AQ_RETURN_NOT_OK(CheckShape(type, rows, cols, &bs));
  if (opts.importance != nullptr) {
    if (opts.mode == BlockMode::kReference) {
      return Status::Invalid(
          "importance weights need block mode 'search' (plain rounding has none)");
    }
    if (!IsBlockType(type)) {
      return Status::Invalid(std::string("importance weights apply to block types, not ") +
                             TypeName(type));
    }
    for (int64_t c = 0; c < cols; ++c) {
      const float v = opts.importance[c];
      if (!std::isfinite(v) || v < 0.0f) {
        return Status::Invalid("importance weight of column " + std::to_string(c) + " is " +
                               std::to_string(v) + "; weights must be finite and >= 0");
      }
    }
  }
  if (rows == 0) return Status::OK();
  const int64_t bpr = cols / bs;
  const int64_t total = rows * bpr;
  const int64_t bbytes = GetTypeTraits(static_cast<uint32_t>(type))->block_bytes;
  const int threads = ResolveThreads(opts.exec.threads);

  if (!IsBlockType(type)) {  // F32 / F16: one element per "block"
    OrderedStats parts;
    ParallelFor(rows, threads, 64, [&](int64_t r0, int64_t r1) {
      ErrorStats local;
      std::vector<float> y(static_cast<size_t>(cols));
      for (int64_t r = r0; r < r1; ++r) {
        const float* xr = x + r * cols;
        uint8_t* o = out + r * cols * bbytes;
        if (type == GgmlType::kF32) {
          std::memcpy(o, xr, static_cast<size_t>(cols) * 4);
          std::memcpy(y.data(), xr, static_cast<size_t>(cols) * 4);
        } else {
          for (int64_t c = 0; c < cols; ++c) {
            PutHalf(o + 2 * c, xr[c]);
            y[static_cast<size_t>(c)] = GetHalf(o + 2 * c);
          }
        }
        if (stats != nullptr) AddStats(xr, y.data(), cols, &local);
      }
      if (stats != nullptr) parts.Add(r0, local);
    });
    if (stats != nullptr) parts.MergeInto(stats);
    return Status::OK();
  }

  const Layout& layout = *FindLayout(type);
  const BlockPasses& passes = kernels::SelectBlockPasses(opts.exec.force_scalar);
  std::mutex mu;
  int64_t first_bad = -1;
  Status first_status;
  OrderedStats parts;
  const int64_t min_blocks = std::max<int64_t>(1, 8192 / bs);
  ParallelFor(total, threads, min_blocks, [&](int64_t b0, int64_t b1) {
    float y[256];
    ErrorStats local;
    auto fail = [&](int64_t b, Status st) {
      std::lock_guard<std::mutex> lock(mu);
      if (first_bad < 0 || b < first_bad) {
        first_bad = b;
        first_status = std::move(st);
      }
    };
    for (int64_t b = b0; b < b1;) {
      const int64_t r = b / bpr, c0 = (b % bpr) * bs;
      // One-level blocks go kGroupBlocks at a time (within a row).
      const int count = static_cast<int>(
          layout.two_level() ? 1 : std::min<int64_t>({kGroupBlocks, b1 - b, bpr - b % bpr}));
      const float* xb = x + r * cols + c0;
      if (!passes.all_finite(xb, static_cast<int>(bs * count))) {
        int64_t i = 0;
        while (std::isfinite(xb[i])) ++i;
        fail(b + i / bs, kernels::NonFiniteAt(xb[i], (opts.first_row + r) * cols + c0 + i, cols));
        return;
      }
      const float* wb = opts.importance != nullptr ? opts.importance + c0 : nullptr;
      int failed = 0;
      Status st =
          EncodeBlocks(passes, layout, opts.mode, xb, wb, count, out + b * bbytes, y, &failed);
      if (!st.ok()) {
        fail(b + failed,
             st.WithContext("block at " + Where(opts.first_row + r, c0 + failed * bs, cols)));
        return;
      }
      if (stats != nullptr) AddStats(xb, y, bs * count, &local);
      b += count;
    }
    if (stats != nullptr) parts.Add(b0, local);
  });
  if (!first_status.ok()) return first_status;
  if (stats != nullptr) parts.MergeInto(stats);
  return Status::OK();
}

Status DequantizeBlocks(GgmlType type, const uint8_t* data, int64_t rows, int64_t cols, float* out,
                        const ExecOptions& exec) {
  int64_t bs = 0;
  AQ_RETURN_NOT_OK(CheckShape(type, rows, cols, &bs));
  const int64_t bbytes = GetTypeTraits(static_cast<uint32_t>(type))->block_bytes;
  const int64_t total = rows * (cols / bs);
  ParallelFor(total, ResolveThreads(exec.threads), std::max<int64_t>(1, 16384 / bs),
              [&](int64_t b0, int64_t b1) {
                if (type == GgmlType::kF32) {
                  std::memcpy(out + b0, data + b0 * 4, static_cast<size_t>(b1 - b0) * 4);
                } else if (type == GgmlType::kF16) {
                  for (int64_t j = b0; j < b1; ++j) out[j] = GetHalf(data + 2 * j);
                } else {
                  for (int64_t b = b0; b < b1; ++b)
                    DecodeBlock(type, data + b * bbytes, out + b * bs);
                }
              });
  return Status::OK();
}

}  // namespace gguf
}  // namespace arrowquant
