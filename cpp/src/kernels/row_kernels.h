// Per-row kernels behind runtime CPU dispatch. Each path (scalar reference,
// AVX2) implements the same four operations and must give identical bytes.
#pragma once

#include <cstddef>
#include <cstdint>

#include "arrowquant/dtype.h"
#include "arrowquant/quantize.h"
#include "arrowquant/status.h"

namespace arrowquant::kernels {

struct RowKernels {
  const char* name;
  // Exact conversion of n elements to float32.
  void (*convert)(DType dtype, const void* src, float* dst, size_t n);
  // Fills the G parameters of one row (by spec.method). `row` only names the
  // row in error messages.
  Status (*choose_params)(const float* x, int64_t cols, const QuantSpec& spec, float* scales,
                          float* zero_points, int64_t row);
  // Codes for one row, packed into PackedRowBytes(cols, bits) bytes; adds the
  // error of the dequantized values to stats when it is not null.
  void (*encode)(const float* x, int64_t cols, const QuantSpec& spec, const float* scales,
                 const float* zero_points, uint8_t* packed_row, ErrorStats* stats);
  // x_hat for one row.
  void (*decode)(const uint8_t* packed_row, int64_t cols, const QuantSpec& spec,
                 const float* scales, const float* zero_points, float* out);
};

const RowKernels& ScalarKernels();
// Null when the binary or the CPU lacks AVX2 + F16C.
const RowKernels* Avx2Kernels();
// The fastest path this CPU runs, or the scalar one when forced.
const RowKernels& Select(bool force_scalar);

// FORMAT.md rtn parameters of one group (scalar; shared by every path since
// min/max is exact in any order). Fails when max - min overflows float32.
Status RtnGroupParams(const float* x, int64_t n, int bits, Scheme scheme, float* scale,
                      float* zero_point);

// Rounds a chosen (scale, zero point) to float16 storage when the spec asks.
void RoundParamsToStorage(const QuantSpec& spec, float* scale, float* zero_point);

}  // namespace arrowquant::kernels
