// The SIMD error pass of the code grids (grid.cc; FORMAT.md 10.4): the
// weighted squared error of one group of n values on a 16-level table L
// with midpoints t (15), at scale s and zero point z, in section 7's
// eight-lane summation order; w (n weights) may be null (weights 1).
#pragma once

#include <cstdint>

namespace arrowquant::grid {

using GridErrorFn = float (*)(const float* x, int64_t n, const float* w, const float* L,
                              const float* t, float s, float z);

// The AVX2 pass, or null when the CPU lacks AVX2 (kernels/grid_avx2.cc).
GridErrorFn Avx2GridError4();

}  // namespace arrowquant::grid
