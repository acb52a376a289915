// Scalar reference kernels: the plain loops every SIMD path must match.
#include <algorithm>
#include <cmath>
#include <string>

#include "kernels/param_search.h"
#include "kernels/row_kernels.h"

namespace arrowquant::kernels {

Status RtnGroupParams(const float* x, int64_t n, int bits, Scheme scheme, float* scale,
                      float* zero_point) {
  float lo = x[0];
  float hi = x[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  // Canonical zero: -0 and +0 compare equal, so min/max order could pick
  // either; adding +0 makes both +0 and the parameters deterministic.
  return RtnFromRange(lo + 0.0f, hi + 0.0f, bits, scheme, scale, zero_point);
}

Status RtnFromRange(float lo, float hi, int bits, Scheme scheme, float* scale, float* zero_point) {
  const float q_max = static_cast<float>((1 << bits) - 1);
  if (scheme == Scheme::kSymmetric) {
    const float a = std::max(std::fabs(lo), std::fabs(hi));
    const float m = static_cast<float>((1 << (bits - 1)) - 1);
    float s = a > 0.0f ? a / m : 1.0f;
    if (s == 0.0f || !std::isfinite(1.0f / s)) s = 1.0f;
    *scale = s;
    *zero_point = static_cast<float>(1 << (bits - 1));
    return Status::OK();
  }
  if (hi > lo) {
    const float s = (hi - lo) / q_max;
    if (!std::isfinite(s)) {
      return Status::Invalid("group range max - min overflows float32 (min " + std::to_string(lo) +
                             ", max " + std::to_string(hi) + ")");
    }
    if (s != 0.0f && std::isfinite(1.0f / s)) {
      *scale = s;
      *zero_point = -lo / s;
      return Status::OK();
    }
  }
  *scale = 1.0f;
  *zero_point = -lo;
  return Status::OK();
}

void RoundParamsToStorage(const QuantSpec& spec, float* scale, float* zero_point) {
  if (spec.param_dtype == ParamDType::kF32) return;
  *scale = HalfToFloat(FloatToHalf(*scale));
  *zero_point = HalfToFloat(FloatToHalf(*zero_point));
}

Status ChooseParamsWith(const SearchPasses& passes, const float* x, int64_t cols,
                        const QuantSpec& spec, float* scales, float* zero_points, int64_t row) {
  if (spec.method != Method::kRtn || spec.param_dtype != ParamDType::kF32) {
    // float16 parameters and the mse search: param_search.cc, with the passes
    // of the table that called.
    int64_t j = 0;
    Status st = ChooseRowParamsWith(passes, x, cols, spec, scales, zero_points, &j);
    if (!st.ok()) {
      return st.WithContext("row " + std::to_string(row) + ", group " + std::to_string(j));
    }
    return Status::OK();
  }
  const int64_t g = spec.group_size;
  for (int64_t j = 0, c0 = 0; c0 < cols; ++j, c0 += g) {
    const int64_t n = std::min(g, cols - c0);
    Status st = RtnGroupParams(x + c0, n, spec.bits, spec.scheme, &scales[j], &zero_points[j]);
    if (!st.ok()) {
      return st.WithContext("row " + std::to_string(row) + ", group " + std::to_string(j));
    }
  }
  return Status::OK();
}

namespace {

Status ScalarChooseParams(const float* x, int64_t cols, const QuantSpec& spec, float* scales,
                          float* zero_points, int64_t row) {
  return ChooseParamsWith(ScalarSearchPasses(), x, cols, spec, scales, zero_points, row);
}

void ScalarEncode(const float* x, int64_t cols, const QuantSpec& spec, const float* scales,
                  const float* zero_points, uint8_t* packed_row, ErrorStats* stats) {
  const int bits = spec.bits;
  const float q_max = static_cast<float>((1 << bits) - 1);
  const bool symmetric = spec.scheme == Scheme::kSymmetric;
  const int64_t g = spec.group_size;
  std::fill(packed_row, packed_row + PackedRowBytes(cols, bits), uint8_t{0});
  double sx2 = 0, sh2 = 0, sxh = 0, se2 = 0, emax = 0;
  for (int64_t c = 0; c < cols; ++c) {
    const int64_t j = c / g;
    const float s = scales[j];
    const float z = zero_points[j];
    const float inv = 1.0f / s;
    // Symmetric codes round first, then add the offset (FORMAT.md section 2).
    float v = symmetric ? std::nearbyint(x[c] * inv) + z : std::nearbyint(x[c] * inv + z);
    v = std::min(std::max(v, 0.0f), q_max);
    const auto q = static_cast<uint8_t>(v);
    packed_row[(c * bits) >> 3] |= static_cast<uint8_t>(q << ((c * bits) & 7));
    if (stats) {
      const float xhat = (static_cast<float>(q) - z) * s;
      const double xd = x[c], hd = xhat, e = xd - hd;
      sx2 += xd * xd;
      sh2 += hd * hd;
      sxh += xd * hd;
      se2 += e * e;
      emax = std::max(emax, std::fabs(e));
    }
  }
  if (stats) {
    stats->sum_x2 += sx2;
    stats->sum_xhat2 += sh2;
    stats->sum_x_xhat += sxh;
    stats->sum_err2 += se2;
    stats->max_abs_err = std::max(stats->max_abs_err, emax);
    stats->count += cols;
  }
}

void ScalarDecode(const uint8_t* packed_row, int64_t cols, const QuantSpec& spec,
                  const float* scales, const float* zero_points, float* out) {
  const int bits = spec.bits;
  const uint8_t mask = static_cast<uint8_t>((1 << bits) - 1);
  const int64_t g = spec.group_size;
  for (int64_t c = 0; c < cols; ++c) {
    const int64_t j = c / g;
    const uint8_t q = (packed_row[(c * bits) >> 3] >> ((c * bits) & 7)) & mask;
    out[c] = (static_cast<float>(q) - zero_points[j]) * scales[j];
  }
}

const RowKernels kScalar = {"scalar",           &ScalarSearchPasses(), ConvertToFloat32,
                            ScalarChooseParams, ScalarEncode,          ScalarDecode};

}  // namespace

const RowKernels& ScalarKernels() { return kScalar; }

const RowKernels& Select(bool force_scalar) {
  if (!force_scalar) {
    if (const RowKernels* avx2 = Avx2Kernels()) return *avx2;
  }
  return kScalar;
}

}  // namespace arrowquant::kernels
