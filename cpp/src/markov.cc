#include "arrowquant/markov.h"

#include <cmath>
#include <limits>
#include <utility>

namespace arrowquant {
namespace {

constexpr int64_t kBlock = 128;  // numpy's PW_BLOCKSIZE

// max(|a|, |b|) as np.maximum: NaN when either is NaN.
inline double MaxAbs(double a, double b) {
  const double x = std::fabs(a), y = std::fabs(b);
  if (std::isnan(x) || std::isnan(y)) return std::numeric_limits<double>::quiet_NaN();
  return x > y ? x : y;
}

inline double Relative(double a, double b) {
  const double den = MaxAbs(a, b);
  return den > 0 ? std::fabs(b - a) / den : 0.0;
}

class Pass {
 public:
  Pass(const float* s, const float* z, int64_t g, double zero_range, double thr, double zthr)
      : s_(s),
        z_(z),
        g_(g),
        pairs_per_row_(g - 1),
        zero_range_(zero_range),
        thr_(thr),
        zthr_(zthr) {}

  // Pair k (row-major over rows x (G - 1)): its two jumps, counted once.
  std::pair<double, double> At(int64_t k) {
    const int64_t r = k / pairs_per_row_, j = k % pairs_per_row_;
    const int64_t i = r * g_ + j;
    const double sj = Relative(s_[i], s_[i + 1]);
    const double a = z_[i], b = z_[i + 1];
    const double zj = zero_range_ > 0 ? std::fabs(b - a) / zero_range_ : Relative(a, b);
    const bool s_bad = sj > thr_, z_bad = zj > zthr_;
    out.scale_violations += s_bad;
    out.zero_point_violations += z_bad;
    out.violations += (s_bad || z_bad);
    if (first_) {
      out.max_scale_jump = sj;
      out.max_zero_point_jump = zj;
      first_ = false;
    } else {
      out.max_scale_jump = Max(out.max_scale_jump, sj);
      out.max_zero_point_jump = Max(out.max_zero_point_jump, zj);
    }
    return {sj, zj};
  }

  // numpy's pairwise_sum over pairs [k0, k0 + n), both kinds at once.
  std::pair<double, double> Sum(int64_t k0, int64_t n) {
    if (n < 8) {
      double a = -0.0, b = -0.0;
      for (int64_t i = 0; i < n; ++i) {
        const auto v = At(k0 + i);
        a += v.first;
        b += v.second;
      }
      return {a, b};
    }
    if (n <= kBlock) {
      double ra[8], rb[8];
      for (int j = 0; j < 8; ++j) {
        const auto v = At(k0 + j);
        ra[j] = v.first;
        rb[j] = v.second;
      }
      int64_t i = 8;
      for (; i < n - (n % 8); i += 8) {
        for (int j = 0; j < 8; ++j) {
          const auto v = At(k0 + i + j);
          ra[j] += v.first;
          rb[j] += v.second;
        }
      }
      double a = ((ra[0] + ra[1]) + (ra[2] + ra[3])) + ((ra[4] + ra[5]) + (ra[6] + ra[7]));
      double b = ((rb[0] + rb[1]) + (rb[2] + rb[3])) + ((rb[4] + rb[5]) + (rb[6] + rb[7]));
      for (; i < n; ++i) {
        const auto v = At(k0 + i);
        a += v.first;
        b += v.second;
      }
      return {a, b};
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    const auto lo = Sum(k0, n2);
    const auto hi = Sum(k0 + n2, n - n2);
    return {lo.first + hi.first, lo.second + hi.second};
  }

  MarkovSums out;

 private:
  // np.max: NaN once any value is NaN.
  static double Max(double m, double v) {
    if (std::isnan(m) || std::isnan(v)) return std::numeric_limits<double>::quiet_NaN();
    return v > m ? v : m;
  }

  const float* s_;
  const float* z_;
  int64_t g_, pairs_per_row_;
  double zero_range_, thr_, zthr_;
  bool first_ = true;
};

}  // namespace

Result<MarkovSums> MarkovJumps(const float* scales, const float* zero_points, int64_t rows,
                               int64_t groups_per_row, double zero_range, double threshold,
                               double zero_point_threshold) {
  if (rows < 0 || groups_per_row <= 0) {
    return Status::Invalid("markov: rows must be >= 0 and groups per row > 0");
  }
  if (!(threshold >= 0) || !(zero_point_threshold >= 0) || !(zero_range >= 0)) {
    return Status::Invalid("markov: thresholds and the zero-point range must be >= 0");
  }
  const int64_t pairs = rows * (groups_per_row - 1);
  Pass pass(scales, zero_points, groups_per_row, zero_range, threshold, zero_point_threshold);
  if (pairs > 0) {
    const auto sums = pass.Sum(0, pairs);
    // The reduction starts from add's identity: 0.0 + sum (so -0.0 becomes 0.0).
    pass.out.sum_scale_jump = 0.0 + sums.first;
    pass.out.sum_zero_point_jump = 0.0 + sums.second;
  }
  pass.out.pairs = pairs;
  return pass.out;
}

}  // namespace arrowquant
