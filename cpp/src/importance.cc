// Importance-weighted parameter search (see importance.h for the contract).
#include "arrowquant/importance.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "arrowquant/parallel.h"
#include "kernels/param_search.h"
#include "kernels/row_kernels.h"
#include "row_driver.h"

namespace arrowquant {

namespace {

// rint for values already clamped to a small range: adding and subtracting
// 1.5 * 2^23 rounds half to even under the default rounding mode, exactly as
// std::nearbyint, without a libm call per element (|v| < 2^22 here).
inline float RoundSmall(float v) {
  constexpr float kMagic = 12582912.0f;
  return (v + kMagic) - kMagic;
}

// Code of one element, equal to the encoder's clamp(rint(...), 0, Q): the
// argument is clamped to [-1, Q + 1] first, which cannot change the clamped
// result but keeps it in RoundSmall's range.
inline float Code(float x, float inv, float zero, float q_max, bool symmetric) {
  float v;
  if (symmetric) {
    float t = x * inv;
    t = std::min(std::max(t, -zero - 1.0f), q_max - zero + 1.0f);
    v = RoundSmall(t) + zero;
  } else {
    float t = x * inv + zero;
    t = std::min(std::max(t, -1.0f), q_max + 1.0f);
    v = RoundSmall(t);
  }
  return std::min(std::max(v, 0.0f), q_max);
}

struct Candidate {
  float scale;
  float zero;
};

bool Usable(float scale, float zero) {
  return scale > 0.0f && std::isfinite(scale) && std::isfinite(1.0f / scale) && std::isfinite(zero);
}

class GroupSearch {
 public:
  GroupSearch(const kernels::SearchPasses& passes, const float* x, const float* w, int64_t n,
              const QuantSpec& spec, const ImportanceOptions& opts)
      : passes_(passes),
        x_(x),
        w_(w),
        n_(n),
        spec_(spec),
        opts_(opts),
        q_max_(static_cast<float>((1 << spec.bits) - 1)),
        symmetric_(spec.scheme == Scheme::kSymmetric),
        codes_(static_cast<size_t>(n)) {}

  Status Run(float* scale, float* zero) {
    // Start from rtn as stored (the float16 rules of FORMAT.md section 7:
    // never a scale rounded to 0 or a zero point past the float16 range).
    Candidate rtn;
    AQ_RETURN_NOT_OK(kernels::RtnStorageParamsWith(passes_, x_, n_, spec_.bits, spec_.scheme,
                                                   spec_.param_dtype, &rtn.scale, &rtn.zero));
    best_ = rtn;
    best_err_ = Error(rtn);
    if (best_err_ > 0.0) {
      Grid();
      for (int it = 0; it < opts_.refit_iters; ++it) {
        Candidate c;
        if (!Refit(best_, &c)) break;
        const double e = Error(c);
        if (!(e < best_err_)) break;
        best_ = c;
        best_err_ = e;
      }
    }
    *scale = best_.scale;
    *zero = best_.zero;
    return Status::OK();
  }

 private:
  // Weighted error of a candidate, in the encoder's float32 arithmetic,
  // summed in double in column order.
  double Error(const Candidate& c) const {
    const float inv = 1.0f / c.scale;
    double e2 = 0.0;
    for (int64_t i = 0; i < n_; ++i) {
      const float q = Code(x_[i], inv, c.zero, q_max_, symmetric_);
      const float xhat = (q - c.zero) * c.scale;
      const double e = static_cast<double>(x_[i]) - static_cast<double>(xhat);
      e2 += static_cast<double>(w_[i]) * e * e;
    }
    return e2;
  }

  void Consider(Candidate c) {
    kernels::RoundParamsToStorage(spec_, &c.scale, &c.zero);
    if (!Usable(c.scale, c.zero)) return;
    const double e = Error(c);
    if (e < best_err_) {
      best_ = c;
      best_err_ = e;
    }
    if (opts_.refit_all) {
      Candidate r;
      if (Refit(c, &r)) {
        const double er = Error(r);
        if (er < best_err_) {
          best_ = r;
          best_err_ = er;
        }
      }
    }
  }

  void Grid() {
    const int K = opts_.grid_steps;
    if (symmetric_) {
      float a = 0.0f;
      for (int64_t i = 0; i < n_; ++i) a = std::max(a, std::fabs(x_[i]));
      if (!(a > 0.0f)) return;
      const float m = static_cast<float>((1 << (spec_.bits - 1)) - 1);
      const float zero = static_cast<float>(1 << (spec_.bits - 1));
      for (int k = 1; k <= K; ++k) {
        const float f = static_cast<float>(k) * opts_.max_clip / static_cast<float>(K);
        const float ac = a * (1.0f - f);
        Consider({ac / m, zero});
      }
      return;
    }
    float lo = x_[0];
    float hi = x_[0];
    for (int64_t i = 1; i < n_; ++i) {
      lo = std::min(lo, x_[i]);
      hi = std::max(hi, x_[i]);
    }
    lo += 0.0f;
    hi += 0.0f;
    if (!(hi > lo)) return;
    const float range = hi - lo;
    if (!std::isfinite(range)) return;
    for (int k = 1; k <= K; ++k) {
      const float f = static_cast<float>(k) * opts_.max_clip / static_cast<float>(K);
      const float half = f * 0.5f;
      const float lo_c[3] = {lo + half * range, lo + f * range, lo};
      const float hi_c[3] = {hi - half * range, hi, hi - f * range};
      for (int v = 0; v < 3; ++v) {
        const float s = (hi_c[v] - lo_c[v]) / q_max_;
        if (!(s > 0.0f)) continue;
        Consider({s, -lo_c[v] / s});
      }
    }
  }

  // Weighted least squares for the codes that `c` gives: asymmetric fits
  // x ~ a * q + b (scale a, zero -b / a); symmetric fits x ~ a * (q - zero)
  // with the zero point fixed by the scheme.
  bool Refit(const Candidate& c, Candidate* out) {
    const float inv = 1.0f / c.scale;
    for (int64_t i = 0; i < n_; ++i) {
      codes_[static_cast<size_t>(i)] = Code(x_[i], inv, c.zero, q_max_, symmetric_);
    }
    if (symmetric_) {
      double sqq = 0.0, sqx = 0.0;
      for (int64_t i = 0; i < n_; ++i) {
        const double q = static_cast<double>(codes_[static_cast<size_t>(i)] - c.zero);
        const double wq = static_cast<double>(w_[i]) * q;
        sqq += wq * q;
        sqx += wq * static_cast<double>(x_[i]);
      }
      if (!(sqq > 0.0)) return false;
      Candidate r{static_cast<float>(sqx / sqq), c.zero};
      kernels::RoundParamsToStorage(spec_, &r.scale, &r.zero);
      if (!Usable(r.scale, r.zero)) return false;
      *out = r;
      return true;
    }
    double sw = 0.0, sq = 0.0, sqq = 0.0, sx = 0.0, sqx = 0.0;
    for (int64_t i = 0; i < n_; ++i) {
      const double w = static_cast<double>(w_[i]);
      const double q = static_cast<double>(codes_[static_cast<size_t>(i)]);
      const double xd = static_cast<double>(x_[i]);
      const double wq = w * q;
      sw += w;
      sq += wq;
      sqq += wq * q;
      sx += w * xd;
      sqx += wq * xd;
    }
    const double det = sw * sqq - sq * sq;
    if (!(det > 0.0)) return false;
    const double a = (sw * sqx - sq * sx) / det;
    const double b = (sx - a * sq) / sw;
    if (!(a > 0.0)) return false;
    Candidate r{static_cast<float>(a), static_cast<float>(-b / a)};
    kernels::RoundParamsToStorage(spec_, &r.scale, &r.zero);
    if (!Usable(r.scale, r.zero)) return false;
    *out = r;
    return true;
  }

  const kernels::SearchPasses& passes_;
  const float* x_;
  const float* w_;
  int64_t n_;
  const QuantSpec& spec_;
  const ImportanceOptions& opts_;
  float q_max_;
  bool symmetric_;
  std::vector<float> codes_;
  Candidate best_{1.0f, 0.0f};
  double best_err_ = 0.0;
};

Status CheckImportance(const float* importance, int64_t cols) {
  if (cols > 0 && importance == nullptr) return Status::Invalid("importance is required");
  for (int64_t c = 0; c < cols; ++c) {
    if (!std::isfinite(importance[c]) || importance[c] < 0.0f) {
      return Status::Invalid("importance must be finite and non-negative; column " +
                             std::to_string(c) + " has " + std::to_string(importance[c]));
    }
  }
  return Status::OK();
}

}  // namespace

Status ValidateImportanceOptions(const ImportanceOptions& opts) {
  if (opts.grid_steps < 0 || opts.grid_steps > 1000) {
    return Status::Invalid("grid_steps must be between 0 and 1000, got " +
                           std::to_string(opts.grid_steps));
  }
  if (!(opts.max_clip >= 0.0f && opts.max_clip < 1.0f)) {
    return Status::Invalid("max_clip must be in [0, 1), got " + std::to_string(opts.max_clip));
  }
  if (opts.refit_iters < 0 || opts.refit_iters > 100) {
    return Status::Invalid("refit_iters must be between 0 and 100, got " +
                           std::to_string(opts.refit_iters));
  }
  return Status::OK();
}

double WeightedGroupError(const float* x, const float* w, int64_t n, int bits, Scheme scheme,
                          float scale, float zero_point) {
  const float q_max = static_cast<float>((1 << bits) - 1);
  const bool symmetric = scheme == Scheme::kSymmetric;
  const float inv = 1.0f / scale;
  double e2 = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const float q = Code(x[i], inv, zero_point, q_max, symmetric);
    const float xhat = (q - zero_point) * scale;
    const double e = static_cast<double>(x[i]) - static_cast<double>(xhat);
    e2 += static_cast<double>(w[i]) * e * e;
  }
  return e2;
}

Status ImportanceSearchParams(const TensorView& src, const QuantSpec& spec, const float* importance,
                              float* scales, float* zero_points, const ImportanceOptions& opts,
                              const ExecOptions& exec) {
  AQ_RETURN_NOT_OK(ValidateSpec(spec));
  if (spec.param_dtype == ParamDType::kSuperblock) {
    return Status::Invalid(
        "importance-weighted search stores float32 or float16 parameters, not superblock");
  }
  AQ_RETURN_NOT_OK(ValidateImportanceOptions(opts));
  if (src.rows < 0 || src.cols < 0) return Status::Invalid("negative tensor dimensions");
  if (!IsQuantizableFloat(src.dtype)) {
    return Status::Invalid("dtype " + std::string(DTypeName(src.dtype)) + " cannot be quantized");
  }
  if (src.rows == 0 || src.cols == 0) return Status::OK();
  if (src.data == nullptr || scales == nullptr || zero_points == nullptr) {
    return Status::Invalid("null buffer");
  }
  AQ_RETURN_NOT_OK(CheckImportance(importance, src.cols));

  const kernels::RowKernels& k = kernels::Select(exec.force_scalar);
  const int64_t g = spec.group_size;
  const int64_t G = GroupsPerRow(src.cols, g);
  const size_t item = DTypeSize(src.dtype);
  // A group costs roughly (3 * grid_steps * 2 + refits) passes over its
  // elements, so far fewer rows per task than the plain quantizer suffice.
  const int64_t min_rows = std::max<int64_t>(1, 4096 / std::max<int64_t>(src.cols, 1));
  return internal::ForEachRow(
      src.rows, src.cols, exec.threads, min_rows, nullptr, [&](int64_t r, float* row, ErrorStats*) {
        const auto* in = static_cast<const uint8_t*>(src.data) + r * src.cols * item;
        k.convert(src.dtype, in, row, static_cast<size_t>(src.cols));
        AQ_RETURN_NOT_OK(kernels::CheckFiniteRow(row, src.cols, src.row_offset + r));
        for (int64_t j = 0, c0 = 0; c0 < src.cols; ++j, c0 += g) {
          const int64_t n = std::min(g, src.cols - c0);
          GroupSearch search(*k.passes, row + c0, importance + c0, n, spec, opts);
          Status st = search.Run(&scales[r * G + j], &zero_points[r * G + j]);
          if (!st.ok()) {
            return st.WithContext("row " + std::to_string(src.row_offset + r) + ", group " +
                                  std::to_string(j));
          }
        }
        return Status::OK();
      });
}

Status QuantizeImportance(const TensorView& src, const QuantSpec& spec, const float* importance,
                          const QuantizedBuffers& out, ErrorStats* stats,
                          const ImportanceOptions& opts, const ExecOptions& exec) {
  AQ_RETURN_NOT_OK(
      ImportanceSearchParams(src, spec, importance, out.scales, out.zero_points, opts, exec));
  QuantSpec codes_spec = spec;
  codes_spec.method = Method::kRtn;  // the code formula does not depend on the method
  return QuantizeWithParams(src, codes_spec, out.scales, out.zero_points, out.packed, stats, exec);
}

}  // namespace arrowquant
