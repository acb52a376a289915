// Parameter choice beyond FORMAT.md's rtn rule: the `mse` search and
// float16 parameter storage (docs/FORMAT.md, "Method mse" and "float16
// parameters"). Internal to the engine; python/arrowquant/reference_search.py
// is the bit-exact numpy twin, so every constant and every operation order
// here is part of that contract.
#pragma once

#include <cstdint>

#include "arrowquant/quantize.h"
#include "arrowquant/status.h"

namespace arrowquant::kernels {

// Least-squares refits after each starting candidate, and then after the
// best candidate found so far.
inline constexpr int kMseStartRefits = 0;
inline constexpr int kMseFinalRefits = 3;

// Clip fractions of the starting candidates for `bits` (a fraction c gives
// the range c * (hi - lo) around the group's midpoint, or c * max|x| for the
// symmetric scheme). Sets *count.
const float* MseClips(int bits, int* count);

// float16 storage of a positive scale: round to nearest even, but a scale
// that would round to 0 becomes 2^-24 (the smallest float16 subnormal).
float RoundScaleF16(float s);

// Scale and zero point the code formula can use: 0 < scale, 1/scale finite,
// zero point finite.
bool Representable(float scale, float zero_point);

// The evaluation pass of one candidate: the true squared error of the group
// under FORMAT.md's code and dequantization formulas, plus the code sums of a
// least-squares refit. Summation order (the reference's too): element i adds
// into float32 lane i % 8 sequentially in i, from +0; lanes are combined as
// ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7)). Code sums are exact integers.
struct EvalSums {
  float err = 0.0f;     // sum (x - x_hat)^2
  int64_t sum_q = 0;    // asymmetric: sum q
  int64_t sum_qq = 0;   // asymmetric: sum q^2; symmetric: sum k^2 (k = q - zero)
  float sum_xq = 0.0f;  // asymmetric: sum (x - mid) q; symmetric: sum x k
};

struct SearchPasses {
  const char* name;
  // Write into *out (not a return value: a by-value struct costs a
  // store-forwarding stall per candidate).
  void (*eval_asym)(const float* x, int64_t n, float scale, float zero_point, float mid,
                    float q_max, EvalSums* out);
  void (*eval_sym)(const float* x, int64_t n, float scale, float zero_point, float q_max,
                   EvalSums* out);
  // Only EvalSums::err of the passes above (the last candidate needs no
  // refit sums): the same value, fewer operations.
  float (*error_asym)(const float* x, int64_t n, float scale, float zero_point, float q_max);
  float (*error_sym)(const float* x, int64_t n, float scale, float zero_point, float q_max);
  // sum (x - mid) in the order above.
  float (*centered_sum)(const float* x, int64_t n, float mid);
  // min and max of n > 0 values, each + 0.0f (so a zero is +0).
  void (*min_max)(const float* x, int64_t n, float* lo, float* hi);
  // float32 -> float16 -> float32, round to nearest even (F16C or software).
  float (*round_f16)(float v);
};

// RoundScaleF16 with the given passes' float16 rounding (the same values;
// F16C on the AVX2 passes). Shared with the GGUF block search.
float RoundScaleWith(const SearchPasses& p, float s);

const SearchPasses& ScalarSearchPasses();
// Null when the binary or the CPU lacks AVX2 (param_search_avx2.cc).
const SearchPasses* Avx2SearchPasses();
// The fastest passes this CPU runs; all give identical results.
const SearchPasses& BestSearchPasses();

// mse parameters of one group of n > 0 finite values: the candidate with the
// least true error among rtn (at storage precision), clipped ranges and their
// least-squares refits; ties keep the earlier candidate, rtn first, so the
// result is never worse than rtn. Invalid when no candidate is representable
// at param_dtype.
Status MseGroupParams(const float* x, int64_t n, int bits, Scheme scheme, ParamDType param_dtype,
                      float* scale, float* zero_point);
Status MseGroupParamsWith(const SearchPasses& passes, const float* x, int64_t n, int bits,
                          Scheme scheme, ParamDType param_dtype, float* scale, float* zero_point);

// rtn parameters at storage precision: float32 as FORMAT.md; float16 rounds
// the scale (RoundScaleF16), re-derives the asymmetric zero point -lo / scale
// from the rounded scale and rounds it. Invalid when not representable.
Status RtnStorageParams(const float* x, int64_t n, int bits, Scheme scheme, ParamDType param_dtype,
                        float* scale, float* zero_point);
Status RtnStorageParamsWith(const SearchPasses& passes, const float* x, int64_t n, int bits,
                            Scheme scheme, ParamDType param_dtype, float* scale, float* zero_point);

// Two-level parameters (ParamDType::kSuperblock, docs/FORMAT.md section 9).
//
// Extra starting candidates of the mse search when its result feeds a
// super-block (stage 1): ranges of c * (hi - lo) anchored at the group's
// minimum and at its maximum (the other end clipped), for each fraction c in
// order, the minimum-anchored one first.
inline constexpr float kSuperblockAnchorClips[] = {0.95f, 0.85f};

// The parameters of one row's groups under spec (param_dtype kSuperblock,
// asymmetric; docs/FORMAT.md 9.6): per super-block, stage 1 chooses each
// group's float32 (scale, zero point) (method rtn: FORMAT.md's rule; mse: the
// search above with the anchored starts), a zero point outside [0, Q]
// stretching the range to reach 0; the units are d = RoundScaleF16(max
// scale / P) over groups with a spread (1 when there is none) and
// dz = RoundScaleF16(max zero / P) (1 when all are 0); the codes are the
// nearest ones, clamped. Method mse then searches the codes by the true
// error of each candidate (ties keep the earlier): the nearest codes, the
// codes of a least-squares refit, the 14 neighbours of the best (scale code
// +-1, zero code +-2), and a last refit of the best; and keeps rtn's
// solution of a super-block when its total error is smaller.
// Writes the expanded scales and zero points (d * a, dz * c) of the row's G
// groups, the units of its super-blocks and, when not null, the codes a and
// c of each group. On error *failed_group names the first group of the
// failing super-block.
Status ChooseRowSuperblock(const SearchPasses& passes, const float* x, int64_t cols,
                           const QuantSpec& spec, float* scales, float* zero_points,
                           float* superblock_scales, float* superblock_zero_points,
                           int64_t* failed_group, uint8_t* scale_codes = nullptr,
                           uint8_t* zero_codes = nullptr);

// One group by spec.method and spec.param_dtype, with the given passes (the
// overload without them takes BestSearchPasses()).
Status ChooseGroupParamsWith(const SearchPasses& passes, const float* x, int64_t n,
                             const QuantSpec& spec, float* scale, float* zero_point);
Status ChooseGroupParams(const float* x, int64_t n, const QuantSpec& spec, float* scale,
                         float* zero_point);

// The G groups of one row by spec.method and spec.param_dtype (what
// choose_params calls for everything but float32 rtn). On error
// *failed_group is the first failing group.
Status ChooseRowParamsWith(const SearchPasses& passes, const float* x, int64_t cols,
                           const QuantSpec& spec, float* scales, float* zero_points,
                           int64_t* failed_group);
Status ChooseRowParams(const float* x, int64_t cols, const QuantSpec& spec, float* scales,
                       float* zero_points, int64_t* failed_group);

}  // namespace arrowquant::kernels
