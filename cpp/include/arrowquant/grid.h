// Code grids (docs/FORMAT.md section 10): codes that stand for the levels of
// a table L[0..Q] (code units, strictly increasing, L[0] = 0, L[Q] = Q)
// instead of the uniform levels q. Codes: u = x * (1 / s) + z, q = the
// number of midpoints (L[k] + L[k+1]) / 2 below u; dequantization
// x_hat = (L[q] - z) * s. The parameter search (FORMAT.md 10.4) and the
// learned (Lloyd) table are here too; the numpy twin is
// python/arrowquant/reference/grid.py, bit for bit.
#pragma once

#include <cstdint>

#include "arrowquant/status.h"

namespace arrowquant::grid {

// llama.cpp's IQ4_NL values (kvalues_iq4nl) mapped onto [0, 15] as
// (v + 127) / 16: the fixed 4-bit grid "nl" (exact float32 values).
inline constexpr float kNlLevels[16] = {0.0f,    1.4375f, 2.75f, 3.875f, 4.875f, 5.75f,
                                        6.5625f, 7.3125f, 8.0f,  8.75f,  9.5f,   10.3125f,
                                        11.25f,  12.25f,  13.5f, 15.0f};

// Range fractions of the starting candidates, and least-squares refits.
inline constexpr float kGridClips[] = {1.0f, 0.95f, 0.9f, 0.85f, 0.8f, 0.75f};
inline constexpr int kGridRefits = 2;
inline constexpr int kLloydIters = 8;

struct GridShape {
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t group_size = 0;
  int bits = 4;
  // The scalar passes even where an AVX2 one exists (4-bit tables); both
  // give the same bits.
  bool force_scalar = false;
};

// Invalid unless `levels` (2^bits values) is finite, strictly increasing,
// from 0 to 2^bits - 1.
Status CheckLevels(const float* levels, int bits);

// The importance-weighted Lloyd table of rows x cols float32 values `x`
// (FORMAT.md 10.4), starting from `start`; `importance` (cols values) may be
// null (weights 1). Writes 2^bits levels.
Status LearnLevels(const float* x, const GridShape& shape, const float* importance,
                   const float* start, float* levels);

// Per group the best (scale, zero point) on the grid (float16-rounded when
// `f16`), then the codes (one byte per weight, rows x cols). `scales` and
// `zero_points` hold rows * ceil(cols / group_size) values.
Status Quantize(const float* x, const GridShape& shape, bool f16, const float* levels,
                const float* importance, uint8_t* codes, float* scales, float* zero_points);

// Two-level parameters on a grid (param dtype "superblock", FORMAT.md
// 10.5): per super-block of K = max(1, 256 / group_size) groups a float16
// scale unit d and zero unit dz, per group codes a in [1, P], c in [0, P]
// (P = 2^p - 1, p = 4 at INT2, 6 otherwise); the group's parameters are
// a * d and c * dz. Writes `scales` / `zero_points` (the products, per
// group), `units` (2 per super-block: d then dz, row-major) and the codes.
struct SuperblockOut {
  float* scales;
  float* zero_points;
  float* units;
  uint8_t* a_codes;
  uint8_t* c_codes;
};
Status QuantizeSuperblock(const float* x, const GridShape& shape, const float* levels,
                          const float* importance, uint8_t* codes, const SuperblockOut& out);

// x_hat = (L[q] - z) * s for rows x cols codes.
Status Dequantize(const uint8_t* codes, const GridShape& shape, const float* levels,
                  const float* scales, const float* zero_points, float* out);

}  // namespace arrowquant::grid
