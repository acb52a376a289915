// ggml tensor types and their block codecs: llama.cpp's Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
// K-quants Q2_K..Q6_K and i-quants IQ4_NL / IQ4_XS, written from ArrowQuant's
// error-minimizing search (or, on request, by plain rounding), and decoded
// exactly as ggml and gguf-py decode them. The GGUF container (writer and
// reader) is gguf.h; this component knows nothing of files.
//
// Layouts (little-endian; f16 = IEEE half; "sub" = sub-block; QK = 256):
//   Q8_0    32 values, 34 bytes: f16 d | int8 q[32]                y = q * d
//   Q4_0    32 values, 18 bytes: f16 d | 16 nibble bytes           y = d * (q - 8)
//   Q4_1    32 values, 20 bytes: f16 d | f16 m | 16 nibble bytes   y = d * q + m
//           (nibble byte j: element j low, element j + 16 high)
//   Q5_0    32 values, 22 bytes: f16 d | u32 qh | 16 nibble bytes  y = d * (q - 16)
//   Q5_1    32 values, 24 bytes: f16 d | f16 m | u32 qh | 16 nibble bytes  y = d * q + m
//           (bit 4 of element j's code in qh bit j)
//   IQ4_NL  32 values, 18 bytes: f16 d | 16 nibble bytes          y = d * kIq4nlGrid[q]
//   Q2_K    QK, 84 bytes: scales[16] (sc | m << 4, sub of 16) | qs[64] 2-bit | f16 d | f16 dmin
//   Q3_K    QK, 110 bytes: hmask[32] | qs[64] 2-bit | scales[12] (16 6-bit, -32) | f16 d
//   Q4_K    QK, 144 bytes: f16 d | f16 dmin | scales[12] (8 6-bit sc, 8 6-bit m) | qs[128]
//   Q5_K    QK, 176 bytes: f16 d | f16 dmin | scales[12] | qh[32] | qs[128]
//   Q6_K    QK, 210 bytes: ql[128] | qh[64] | int8 scales[16] | f16 d
//   IQ4_XS  QK, 136 bytes: f16 d | u16 scales_h | scales_l[4] | qs[128] (8 subs of 32)
// K-quants decode y = (d * sc) * q - (dmin * m) (Q2_K, Q4_K, Q5_K; q >= 0) or
// y = (d * sc) * q (Q3_K: q in -4..3, sc in -32..31; Q6_K: q in -32..31, sc
// int8); IQ4_XS y = (d * ls) * kIq4nlGrid[q], ls in -32..31. Every product
// and difference is one float32 operation in that order (no FMA), as in
// ggml's dequantize_row_* and gguf-py's gguf.quants, so decoded values are
// bit for bit theirs. docs/gguf.md ("Block types") has the bit positions and
// the search.
#pragma once

#include <cstdint>
#include <string>

#include "arrowquant/quantize.h"
#include "arrowquant/status.h"

namespace arrowquant::gguf {

// ggml tensor types (the values of enum ggml_type).
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kIQ4_NL = 20,
  kIQ4_XS = 23,
  kI8 = 24,
  kI16 = 25,
  kI32 = 26,
  kI64 = 27,
  kF64 = 28,
  kBF16 = 30,
};

// The 16 values of IQ4_NL / IQ4_XS codes (ggml's kvalues_iq4nl).
inline constexpr int8_t kIq4nlGrid[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                          1,    13,   25,  38,  53,  69,  89,  113};

// Elements per block and bytes per block of any type ggml defines (the reader
// bounds every tensor with it); FormatError for an unknown type id.
struct TypeTraits {
  int64_t block_size;
  int64_t block_bytes;
};
Result<TypeTraits> GetTypeTraits(uint32_t type);
const char* GgmlTypeName(uint32_t type);  // "Q4_K", ...; "unknown" otherwise

// The quantized types QuantizeBlocks encodes: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K,
// Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS.
bool IsBlockType(GgmlType type);
// Those and F16 / F32: what QuantizeBlocks and DequantizeBlocks accept.
bool IsCodecType(GgmlType type);
// A codec type by name (case-insensitive: "q4_k", "IQ4_XS", "F16", ...).
Result<GgmlType> ParseCodecType(const std::string& name);

// How QuantizeBlocks chooses the bytes.
enum class BlockMode : uint8_t {
  // Error-minimizing search (docs/gguf.md): per block, the stored parameters
  // (f16 scales and mins, sub-block scale and min codes) with the least
  // squared error, importance-weighted when weights are given, the element
  // codes the nearest ones. Per block never worse than kReference in that
  // error (both are decoded and compared).
  kSearch,
  // Plain rounding. Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1: llama.cpp's reference quantizer
  // (quantize_row_*_ref), byte for byte gguf.quants.quantize. Other types:
  // per sub-block min/max (Q2_K, Q4_K, Q5_K: the range widened to include
  // 0) or signed max-abs mapped to the most negative code (Q3_K, Q6_K, IQ4),
  // f16 units from the largest sub-block scale / min, nearest codes.
  kReference,
};
const char* BlockModeName(BlockMode mode);  // "search", "reference"
Result<BlockMode> ParseBlockMode(const std::string& name);

struct BlockOptions {
  BlockMode mode = BlockMode::kSearch;
  // Optional per-column weights (length cols, finite, >= 0), e.g. the mean
  // squared input activation of each column (the role of llama.cpp's
  // imatrix): the search minimizes sum_c w_c (x - x_hat)^2. Null:
  // unweighted. Mode kReference takes none.
  const float* importance = nullptr;
  ExecOptions exec;
  // Row number of x's first row in error messages (a writer streaming a
  // tensor in chunks names rows of the whole tensor).
  int64_t first_row = 0;
};

// Encodes rows x cols float32 values (row-major) into rows * RowBytes(cols)
// bytes at `out`. cols must be a multiple of the type's block size (32, or
// 256 for K-quants and IQ4_XS): the caller (a planner) picks another type
// for rows that do not fit. The bytes do not depend on the thread count or
// on the SIMD path (scalar and AVX2 give identical bytes). When `stats` is
// given, the (unweighted) error of the decoded values is added to it.
// Invalid status: NaN / Inf (naming row, column and element), a value too
// large for the type's float16 scale, bad importance weights.
Status QuantizeBlocks(GgmlType type, const float* x, int64_t rows, int64_t cols, uint8_t* out,
                      const BlockOptions& opts = {}, ErrorStats* stats = nullptr);

// Decodes rows x cols values of `type` (any codec type) into float32.
Status DequantizeBlocks(GgmlType type, const uint8_t* data, int64_t rows, int64_t cols, float* out,
                        const ExecOptions& exec = {});

// Bytes of one row of `cols` values of `type`; Invalid when cols is not a
// positive multiple of the block size.
Result<uint64_t> RowBytes(GgmlType type, int64_t cols);

// Name of the block kernels QuantizeBlocks uses here ("avx2" or "scalar").
const char* ActiveBlockKernelName();

}  // namespace arrowquant::gguf
