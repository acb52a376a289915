// Smoothness of group parameters along a row (the "Markov" metrics of
// arrowquant.engine.metrics): how much scale and zero point jump from one
// group to the next, in one pass over the parameters the quantizer just
// wrote, with the same float64 values and the same summation order as the
// numpy definition (get_markov_metrics), so a report is identical either way.
#pragma once

#include <cstdint>

#include "arrowquant/status.h"

namespace arrowquant {

struct MarkovSums {
  int64_t pairs = 0;
  double sum_scale_jump = 0.0;
  double max_scale_jump = 0.0;
  double sum_zero_point_jump = 0.0;
  double max_zero_point_jump = 0.0;
  int64_t scale_violations = 0;
  int64_t zero_point_violations = 0;
  int64_t violations = 0;
};

// Jumps between groups j and j + 1 of each of `rows` rows of
// `groups_per_row` parameters (row-major float32):
//   scale jump = |s[j+1] - s[j]| / max(|s[j]|, |s[j+1]|)   (0 when that is 0)
//   zero jump  = |z[j+1] - z[j]| / zero_range               (zero_range > 0)
//              or the relative jump as for scales           (zero_range == 0)
// A pair violates a kind when its jump exceeds the kind's threshold. Sums are
// numpy's pairwise sums of the row-major jumps (0.0 plus blocks of 128
// summed with eight accumulators); maxima are 0 when there is no pair.
Result<MarkovSums> MarkovJumps(const float* scales, const float* zero_points, int64_t rows,
                               int64_t groups_per_row, double zero_range, double threshold,
                               double zero_point_threshold);

}  // namespace arrowquant
