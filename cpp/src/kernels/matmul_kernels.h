// Kernels of the quantized matmul (arrowquant/matmul.h) behind run-time
// dispatch: a scalar reference (matmul.cc) and an AVX2 + FMA + F16C path
// (matmul_avx2.cc), whose GEMV has an AVX-512 variant (matmul_avx512.cc).
// They agree within the error bound of matmul.h, not bit
// for bit (they sum in different orders).
#pragma once

#include <cstddef>
#include <cstdint>

#include "arrowquant/dtype.h"
#include "arrowquant/matmul.h"

namespace arrowquant::kernels {

struct MatmulKernels {
  const char* name;
  // x' = x / s (s = w.input_scales, or none): n float32 / bfloat16 / float16
  // values to float32.
  void (*load_x)(DType dtype, const void* src, const float* input_scales, int64_t n, float* dst);
  // dst (n elements of `dtype`) = src + bias (n values of bias_dtype, or null).
  void (*store_y)(const float* src, const void* bias, DType bias_dtype, int64_t n, DType dtype,
                  void* dst);
  // Row r's G parameters as float32 (scale, zero point).
  void (*row_params)(const QuantMatrix& w, int64_t r, float* scales, float* zero_points);
  // W_hat[r, c0:c1] (no 1/s) from row r's expanded parameters.
  void (*decode_range)(const QuantMatrix& w, int64_t r, const float* scales,
                       const float* zero_points, int64_t c0, int64_t c1, float* out);

  // GEMV, nb <= kGemvMaxBatch rows of x' (ldx = cols): `prepare` fills
  // gemv_prep_floats(w, nb) floats once per call (e.g. x in the order the
  // decoder emits codes, group sums); `gemv` writes y[b * ldy + r] (float32,
  // no bias) for rows [r0, r1).
  size_t (*gemv_prep_floats)(const QuantMatrix& w, int64_t nb);
  void (*gemv_prepare)(const QuantMatrix& w, const float* x, int64_t nb, float* prep);
  void (*gemv)(const QuantMatrix& w, const float* x, int64_t nb, const float* prep, int64_t r0,
               int64_t r1, float* y, int64_t ldy);

  // GEMM, any batch: as above; rows are handed out in multiples of
  // gemm_row_block (the kernel's panel of weight rows).
  int64_t gemm_row_block;
  size_t (*gemm_prep_floats)(const QuantMatrix& w, int64_t batch);
  void (*gemm_prepare)(const QuantMatrix& w, const float* x, int64_t batch, float* prep);
  void (*gemm)(const QuantMatrix& w, const float* x, int64_t batch, const float* prep, int64_t r0,
               int64_t r1, float* y, int64_t ldy);
};

const MatmulKernels& ScalarMatmulKernels();
// Null when the binary or the CPU lacks AVX2 + FMA + F16C.
const MatmulKernels* Avx2MatmulKernels();
// The AVX2 table with an AVX-512 GEMV (matmul_avx512.cc); null without
// AVX-512 F/BW/VL.
const MatmulKernels* Avx512MatmulKernels();
// The fastest table this CPU runs, at most the one `opt` allows.
const MatmulKernels& SelectMatmul(const MatmulOptions& opt);

// Scale code and zero code of group `k` (row-major over the whole matrix)
// of a superblock stream of p-bit codes (FORMAT.md 9.3).
inline void ReadParamCodePair(const uint8_t* stream, int64_t k, int p, uint32_t* a, uint32_t* c) {
  // The pair spans 2p <= 16 bits starting anywhere in a byte: at most 3 bytes.
  const int64_t bit = 2 * k * p;
  const uint8_t* b = stream + (bit >> 3);
  const int sh = static_cast<int>(bit & 7);
  const int need = (sh + 2 * p + 7) >> 3;
  uint32_t v = b[0];
  if (need > 1) v |= static_cast<uint32_t>(b[1]) << 8;
  if (need > 2) v |= static_cast<uint32_t>(b[2]) << 16;
  v >>= sh;
  const uint32_t mask = (1u << p) - 1u;
  *a = v & mask;
  *c = (v >> p) & mask;
}

}  // namespace arrowquant::kernels
