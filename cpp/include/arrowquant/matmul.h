// y = x @ W^T + b with W kept as ArrowQuant packs it (docs/FORMAT.md
// sections 1-3, 7, 9): INT8 / INT4 / INT2 codes packed per row, per-group
// float32 or float16 scales and zero points, or two-level (superblock)
// parameters, and optional channel-equalization scales s (W = W_hat / s per
// column, so x is divided by s once per call). The weight is never
// materialized as a whole:
//
// * GEMV path (a few rows of x): every weight row is streamed once; a
//   block of codes is decoded into registers and multiplied with each x row,
//   per group  sum_c x_c (q_c - z) s = s * (sum_c x_c q_c - z * sum_c x_c),
//   the group sums of x computed once per call.
// * GEMM path (many rows of x): a panel of weight rows is dequantized into a
//   cache-sized float32 buffer and multiplied by a register-blocked kernel.
//
// Accumulation is float32, in an order that differs from a plain dot
// product; this matmul is not part of the bit-exact quantization contract
// and may use FMA. Against dequantize + exact matmul, every output obeys
//   |y - y_exact| <= gamma(n) * (sum_c |x'_c| (|q_c| + |z|) |s| + |b|),
//   gamma(n) = n u / (1 - n u), u = 2^-24, n = MatmulErrorTerms(cols, G),
// with x'_c = x_c / s_c (the equalized input), plus the output rounding of
// bfloat16 / float16 results (matmul_test.cc and tests/test_runtime.py check it).
#pragma once

#include <cstdint>

#include "arrowquant/dtype.h"
#include "arrowquant/status.h"

namespace arrowquant {

// How the group parameters of a quantized matrix are held in memory (the
// file's storage, unchanged: resident bytes stay the quantized size).
enum class ParamStorage : uint8_t {
  kF32,         // scales / zero_points: float[rows * G]
  kF16,         // scales / zero_points: float16 bits, uint16_t[rows * G]
  kSuperblock,  // scales / zero_points: float16 units d / dz, uint16_t[rows * S];
                // param_codes: the FORMAT.md 9.3 stream of all rows (rows * G pairs)
};

// A quantized weight of rows x cols (not owned).
struct QuantMatrix {
  const uint8_t* codes = nullptr;  // rows * PackedRowBytes(cols, bits)
  int64_t rows = 0;
  int64_t cols = 0;
  int bits = 4;
  int64_t group_size = 128;
  ParamStorage params = ParamStorage::kF32;
  const void* scales = nullptr;
  const void* zero_points = nullptr;
  const uint8_t* param_codes = nullptr;  // kSuperblock only
  int param_code_bits = 0;               // kSuperblock only: p in 1..8
  int64_t superblock_groups = 0;         // kSuperblock only: K >= 1
  const float* input_scales = nullptr;   // length cols, or null
};

enum class MatmulPath : uint8_t { kAuto, kGemv, kGemm };

struct MatmulOptions {
  int threads = 0;            // 0: all cores
  bool force_scalar = false;  // the scalar reference (tests compare every path)
  bool force_avx2 = false;    // the AVX2 kernels even where AVX-512 runs
  MatmulPath path = MatmulPath::kAuto;
};

// Rows of x up to which kAuto takes the GEMV path (it reads the weight once
// per call; the GEMM path reads it once per call too but pays the
// dequantization into a buffer, which only many rows of x amortize).
inline constexpr int64_t kGemvMaxBatch = 4;

// Checks a matrix description (bits, group size, parameter layout).
Status ValidateQuantMatrix(const QuantMatrix& w);

// Bytes of the buffers a matrix of this shape needs (what a binding checks
// the caller's arrays against).
struct QuantMatrixSizes {
  int64_t code_bytes = 0;
  int64_t param_count = 0;       // elements of scales and of zero_points
  int64_t param_code_bytes = 0;  // kSuperblock only
};
QuantMatrixSizes QuantMatrixBufferSizes(const QuantMatrix& w);

// y (batch x rows, dtype of x) = x (batch x cols; float32, bfloat16 or
// float16) @ W^T + bias (rows elements of bias_dtype, or null).
Status QuantMatmul(const QuantMatrix& w, const void* x, DType x_dtype, int64_t batch,
                   const void* bias, DType bias_dtype, void* y, const MatmulOptions& opt = {});

// W rows [row_begin, row_end) as float32 (row_end - row_begin) x cols, with
// 1 / s applied: exactly what dequantize + division by s gives.
Status DequantizeMatrixRows(const QuantMatrix& w, int64_t row_begin, int64_t row_end, float* out,
                            const MatmulOptions& opt = {});

// W rows ids[0..n) (each in [0, rows)) as float32 n x cols, 1 / s applied:
// an embedding lookup that dequantizes only the rows it returns.
Status DequantizeMatrixGather(const QuantMatrix& w, const int64_t* ids, int64_t n, float* out,
                              const MatmulOptions& opt = {});

// The n of the error bound above: the longest chain of float32 roundings
// any path applies to one output (group sums, products, the equalization
// division, the bias, tree reductions), with margin.
int64_t MatmulErrorTerms(int64_t cols, int64_t groups_per_row);

// Name of the path QuantMatmul uses on this CPU ("avx512", "avx2" or "scalar").
const char* ActiveMatmulKernel();

}  // namespace arrowquant
