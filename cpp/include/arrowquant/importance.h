// Importance-weighted choice of group parameters.
//
// Given per-column weights w (the input-channel importance from calibration
// statistics, e.g. E[x_c^2]), every group gets the scale and zero point that
// minimize the weighted squared error
//     E = sum_c w_c (x_c - x_hat_c)^2,   x_hat = (q - zero) * scale,
// among a deterministic set of candidates: the rtn solution (FORMAT.md), a
// grid of clipped ranges around min/max, and a weighted least-squares refit
// of (scale, zero) for the codes each candidate produces. The rtn solution
// is kept unless a candidate is strictly better, so the weighted error of a
// group is never above rtn's. The codes then come from QuantizeWithParams:
// the code and dequantization formulas of FORMAT.md are unchanged.
//
// Every candidate is evaluated with the encoder's own float32 arithmetic
// (q = clamp(rint(x * (1/scale) + zero), 0, Q), x_hat = (q - zero) * scale),
// and the weighted sums are accumulated in double in column order, so the
// numpy reference (arrowquant.reference_importance) reproduces the choice
// bit for bit.
#pragma once

#include <cstdint>

#include "arrowquant/quantize.h"
#include "arrowquant/status.h"

namespace arrowquant {

struct ImportanceOptions {
  // Clipping fractions f_k = k * max_clip / grid_steps, k = 1..grid_steps.
  // For each f the range [lo, hi] is clipped on both sides by f/2 of its
  // width, on the low side only by f, and on the high side only by f
  // (symmetric scheme: max|x| shrunk by f).
  int grid_steps = 10;
  float max_clip = 0.5f;
  // Weighted least-squares refits of the best candidate (refit, re-encode,
  // repeat while the error drops).
  int refit_iters = 3;
  // Also refit every grid candidate (not only the best); costs one more
  // evaluation per candidate.
  bool refit_all = true;
};

// Checks the options; the message says what is allowed.
Status ValidateImportanceOptions(const ImportanceOptions& opts);

// Fills scales and zero points (rows * GroupsPerRow, row-major) for `src`
// with the importance-weighted search. `importance` has src.cols finite,
// non-negative entries (one per column, shared by every row). spec.method is
// ignored; spec.param_dtype float16 rounds every candidate to storage before
// it is evaluated. NaN/Inf in the data is an Invalid status naming the index.
Status ImportanceSearchParams(const TensorView& src, const QuantSpec& spec, const float* importance,
                              float* scales, float* zero_points, const ImportanceOptions& opts = {},
                              const ExecOptions& exec = {});

// ImportanceSearchParams followed by QuantizeWithParams (codes, packing and
// the plain error sums of the dequantized values).
Status QuantizeImportance(const TensorView& src, const QuantSpec& spec, const float* importance,
                          const QuantizedBuffers& out, ErrorStats* stats,
                          const ImportanceOptions& opts = {}, const ExecOptions& exec = {});

// Weighted error sum_c w_c (x_c - x_hat_c)^2 of one group for given
// parameters, exactly as the search evaluates it (exposed for tests).
double WeightedGroupError(const float* x, const float* w, int64_t n, int bits, Scheme scheme,
                          float scale, float zero_point);

}  // namespace arrowquant
