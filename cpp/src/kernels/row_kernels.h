// Per-row kernels behind runtime CPU dispatch. Each path (scalar reference,
// AVX2) implements the same four operations and must give identical bytes.
#pragma once

#include <cstddef>
#include <cstdint>

#include "arrowquant/dtype.h"
#include "arrowquant/quantize.h"
#include "arrowquant/status.h"

namespace arrowquant::kernels {

struct SearchPasses;  // param_search.h

struct RowKernels {
  const char* name;
  // The parameter-search passes of this path (the mse search, float16 rules,
  // superblock search): chosen with the table, so a forced scalar run never
  // reaches a SIMD pass.
  const SearchPasses* passes;
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
// True when the CPU has AVX2, F16C and FMA and the OS saves YMM state (what
// every *avx2*.cc file is compiled for).
bool CpuHasAvx2();
// Null when the binary or the CPU lacks AVX2 + F16C.
const RowKernels* Avx2Kernels();
// The fastest path this CPU runs, or the scalar one when forced.
const RowKernels& Select(bool force_scalar);

// One sweep over a row of the source for method rtn with float32 parameters:
// conversion, NaN/Inf check, parameters, codes, packing and error sums, with
// the same results and error statuses as convert + CheckFiniteRow +
// choose_params + encode.
using FusedRtnRowFn = Status (*)(DType dtype, const void* src, int64_t cols, const QuantSpec& spec,
                                 float* scales, float* zero_points, uint8_t* packed_row,
                                 ErrorStats* stats, int64_t row);
// The fused row quantizer of the fastest path, or null (scalar / forced).
FusedRtnRowFn SelectFusedRtn(bool force_scalar);

// Invalid status naming the first NaN/Inf of row `row` of the whole tensor
// ("NaN at index I (row R, column C)"), or OK. The one finiteness check of
// the engine (kernels/finite.cc): every path that meets a non-finite value
// reports it with this message.
Status CheckFiniteRow(const float* x, int64_t cols, int64_t row);
// That message for a non-finite `value` at element `index` of a tensor whose
// rows have `cols` elements.
Status NonFiniteAt(float value, int64_t index, int64_t cols);

// FORMAT.md rtn parameters from a group's min and max (lo, hi; for the
// symmetric scheme max|x| = max(|lo|, |hi|)): the same values as
// RtnGroupParams without a second pass over the group.
Status RtnFromRange(float lo, float hi, int bits, Scheme scheme, float* scale, float* zero_point);

// FORMAT.md rtn parameters of one group (scalar; shared by every path since
// min/max is exact in any order). Fails when max - min overflows float32.
Status RtnGroupParams(const float* x, int64_t n, int bits, Scheme scheme, float* scale,
                      float* zero_point);

// The parameters of one row by spec with the given search passes: the
// orchestration every table shares (rtn float32 inline, everything else
// through param_search.cc). `row` only names the row in error messages.
Status ChooseParamsWith(const SearchPasses& passes, const float* x, int64_t cols,
                        const QuantSpec& spec, float* scales, float* zero_points, int64_t row);

// Rounds a chosen (scale, zero point) to float16 storage when the spec asks.
void RoundParamsToStorage(const QuantSpec& spec, float* scale, float* zero_point);

}  // namespace arrowquant::kernels
