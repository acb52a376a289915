// The evaluation passes of the GGUF block search (gguf_blocks.cc), behind
// run-time dispatch: a scalar reference (gguf_blocks.cc) and AVX2 twins
// (gguf_blocks_avx2.cc) giving identical results, so that the search, which
// is shared scalar code, makes the same choices on either path.
//
// A pass evaluates candidate parameters of one sub-block of n values (n a
// multiple of 8; 16 or 32 in every layout): the codes the encoder would
// store and their squared error under the decoder's own float32 formula.
// Summation order (both paths): element i adds into float32 lane i % 8,
// sequentially in i, from +0; lanes are combined as
// ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)). With weights w the
// terms are w * (e * e), and for the refit sums wv = w * v, then wv, wv * v,
// wv * x; without, e * e, v, v * v, v * x.
#pragma once

#include <cstdint>

#include "kernels/param_search.h"

namespace arrowquant::kernels {

// One candidate: x_hat = a * v - b for the code value v of each element.
struct BlockCand {
  float a;
  float b;
};

// Its squared error and least-squares sums (sums of v, v^2, x * v; weighted
// when weights are given). Without `sums` only err is computed.
// (No member initializers: arrays of fits are filled by the passes, and
// zeroing them costs more than some of the passes.)
struct BlockFit {
  float err;
  float sv;
  float svv;
  float sxv;
};
static_assert(sizeof(BlockFit) == 4 * sizeof(float), "the AVX2 passes store the four sums at once");

// A non-uniform code grid (IQ4): 16 increasing values and the 15 midpoints
// between neighbours. The code of v is the number of midpoints below v
// (strictly), i.e. the nearest value, the lower one on an exact tie.
struct CodeGrid {
  float value[16];
  float mid[15];
};

// Candidate-independent sums of one sub-block: min and max (+0 for a zero),
// max |x|, and in the lane order above sum w, sum w x, sum w x^2 (unweighted:
// n, sum x, sum x^2).
struct BlockMoments {
  float lo, hi, amax, sw, swx, swxx;
};

struct BlockPasses {
  const char* name;
  // Integer codes: v = min(max(rint((x + b) * inv), lo), hi) with
  // inv = 1 / a (0 when a is 0), x_hat = a * v - b, for each of the k
  // candidates (w null: unweighted). Candidate j is evaluated on the n
  // values at x + sub[j] * n (weights at w + sub[j] * n): the sub-blocks of
  // a block side by side; sub null: all at x.
  void (*eval_affine)(const float* x, const float* w, int n, const BlockCand* c, const uint8_t* sub,
                      int k, float lo, float hi, bool sums, BlockFit* out);
  // The same without offset (symmetric codes, every b 0): v = clamp(rint(x *
  // inv)), x_hat = a * v; sv is not computed (0). (Codes equal eval_affine's
  // at b = 0; the error and the other sums are the same values.)
  void (*eval_symmetric)(const float* x, const float* w, int n, const BlockCand* c,
                         const uint8_t* sub, int k, float lo, float hi, bool sums, BlockFit* out);
  // Grid codes: v = the grid value nearest to x * inv (b is ignored),
  // x_hat = a * v.
  void (*eval_grid)(const float* x, const float* w, int n, const BlockCand* c, const uint8_t* sub,
                    int k, const CodeGrid& grid, bool sums, BlockFit* out);
  // The codes of one candidate as the two passes above compute them (affine:
  // the integer code value; grid: the index of the value).
  void (*codes_affine)(const float* x, int n, BlockCand c, float lo, float hi, int8_t* q);
  void (*codes_grid)(const float* x, int n, float a, const CodeGrid& grid, int8_t* q);
  void (*moments)(const float* x, const float* w, int n, BlockMoments* out);
  // True when no value is NaN or Inf.
  bool (*all_finite)(const float* x, int n);
  // sum w (x - y)^2 in float64 (w null: unweighted): element i adds into
  // lane i % 4 from +0; lanes combined as (l0 + l2) + (l1 + l3).
  double (*error_f64)(const float* x, const float* w, const float* y, int n);
  // The matching passes of the mse search (param_search.h): its float16
  // rounding (F16C or software, the same values) serves the block scales.
  const SearchPasses* search;
};

const BlockPasses& ScalarBlockPasses();
// Null when the binary or the CPU lacks AVX2 (gguf_blocks_avx2.cc).
const BlockPasses* Avx2BlockPasses();
// The AVX2 passes when the CPU runs them and force_scalar is false.
const BlockPasses& SelectBlockPasses(bool force_scalar);

// ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)): the lane order above.
inline float ReduceLanes(const float* l) {
  const float a0 = l[0] + l[4], a1 = l[1] + l[5], a2 = l[2] + l[6], a3 = l[3] + l[7];
  return (a0 + a2) + (a1 + a3);
}

}  // namespace arrowquant::kernels
