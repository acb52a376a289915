// Row loop of the quantizer: converts each row to float32, checks it, chooses
// the group parameters, encodes and packs, and accumulates the error. The
// per-row kernels live in kernels/ (scalar reference + SIMD variants).
#include "arrowquant/quantize.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "arrowquant/parallel.h"
#include "kernels/param_search.h"
#include "kernels/row_kernels.h"
#include "row_driver.h"

namespace arrowquant {

void OrderedStats::Add(int64_t first_index, const ErrorStats& s) {
  std::lock_guard<std::mutex> lock(mu_);
  parts_.emplace_back(first_index, s);
}

void OrderedStats::MergeInto(ErrorStats* total) {
  std::sort(parts_.begin(), parts_.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  for (const auto& p : parts_) total->Merge(p.second);
}

void ErrorStats::Merge(const ErrorStats& other) {
  sum_x2 += other.sum_x2;
  sum_xhat2 += other.sum_xhat2;
  sum_x_xhat += other.sum_x_xhat;
  sum_err2 += other.sum_err2;
  max_abs_err = std::max(max_abs_err, other.max_abs_err);
  count += other.count;
}

ErrorMetrics FinalizeMetrics(const ErrorStats& s) {
  ErrorMetrics m;
  m.max_abs_error = s.max_abs_err;
  const double denom = std::sqrt(s.sum_x2) * std::sqrt(s.sum_xhat2);
  if (denom > 0.0) {
    // Rounding can step past 1; a non-finite value (inf / inf) stays NaN.
    const double c = s.sum_x_xhat / denom;
    m.cosine =
        std::isfinite(c) ? std::clamp(c, -1.0, 1.0) : std::numeric_limits<double>::quiet_NaN();
  } else {
    // Both zero: identical. One zero: orthogonal by convention.
    m.cosine = (s.sum_x2 == 0.0 && s.sum_xhat2 == 0.0) ? 1.0 : 0.0;
  }
  if (s.sum_x2 > 0.0) {
    m.rel_mse = s.sum_err2 / s.sum_x2;
  } else {
    m.rel_mse = s.sum_err2 > 0.0 ? std::numeric_limits<double>::infinity() : 0.0;
  }
  if (s.sum_err2 > 0.0) {
    m.sqnr_db = 10.0 * std::log10(s.sum_x2 / s.sum_err2);
  } else {
    m.sqnr_db = std::numeric_limits<double>::infinity();
  }
  return m;
}

Status ValidateSpec(const QuantSpec& spec) {
  if (spec.bits != 2 && spec.bits != 4 && spec.bits != 8) {
    return Status::Invalid("bits must be 2, 4 or 8, got " + std::to_string(spec.bits));
  }
  if (spec.group_size <= 0) {
    return Status::Invalid("group size must be a positive integer, got " +
                           std::to_string(spec.group_size));
  }
  if (spec.method != Method::kRtn && spec.method != Method::kMse) {
    return Status::Invalid("unknown quantization method");
  }
  if (spec.param_dtype == ParamDType::kSuperblock && spec.scheme != Scheme::kAsymmetric) {
    return Status::Invalid(
        "superblock parameters need the asymmetric scheme (their zero codes carry the offset)");
  }
  return Status::OK();
}

int64_t SuperblockGroups(int64_t group_size) {
  return std::max<int64_t>(1, kSuperblockWeights / group_size);
}

int64_t SuperblocksPerRow(int64_t cols, int64_t group_size) {
  const int64_t k = SuperblockGroups(group_size);
  return (GroupsPerRow(cols, group_size) + k - 1) / k;
}

int SuperblockCodeBits(int bits) { return bits == 2 ? 4 : 6; }

int64_t GroupsPerRow(int64_t cols, int64_t group_size) {
  return (cols + group_size - 1) / group_size;
}

int64_t PackedRowBytes(int64_t cols, int bits) { return (cols * bits + 7) / 8; }

namespace {

Status CheckView(const TensorView& src) {
  if (src.rows < 0 || src.cols < 0) return Status::Invalid("negative tensor dimensions");
  if (src.rows * src.cols > 0 && src.data == nullptr) return Status::Invalid("null tensor data");
  if (!IsQuantizableFloat(src.dtype)) {
    return Status::Invalid("dtype " + std::string(DTypeName(src.dtype)) +
                           " cannot be quantized (float32, float16, bfloat16, float8_e4m3fn or "
                           "float8_e5m2 expected)");
  }
  return Status::OK();
}

// A NaN or Inf anywhere in the tensor is reported before any other error
// (as the reference does): after a failed parallel loop, whose tasks stop at
// their first error, the whole tensor is scanned once more for one.
Status PreferNonFinite(const TensorView& src, Status error) {
  std::vector<float> row(static_cast<size_t>(src.cols));
  const size_t item = DTypeSize(src.dtype);
  for (int64_t r = 0; r < src.rows; ++r) {
    const auto* in = static_cast<const uint8_t*>(src.data) + r * src.cols * item;
    ConvertToFloat32(src.dtype, in, row.data(), row.size());
    Status st = kernels::CheckFiniteRow(row.data(), src.cols, src.row_offset + r);
    if (!st.ok()) return st;
  }
  return error;
}

// Shared driver: for each row, convert + check, then `choose` fills the
// row's parameters (or leaves caller's), then encode.
template <typename Choose>
Status RunRows(const TensorView& src, const QuantSpec& spec, const float* scales,
               const float* zero_points, uint8_t* packed, float* out_scales, float* out_zero_points,
               ErrorStats* stats, const ExecOptions& exec, Choose choose) {
  AQ_RETURN_NOT_OK(ValidateSpec(spec));
  AQ_RETURN_NOT_OK(CheckView(src));
  if (src.rows == 0 || src.cols == 0) return Status::OK();
  const kernels::RowKernels& k = kernels::Select(exec.force_scalar);
  const int64_t G = GroupsPerRow(src.cols, spec.group_size);
  const int64_t row_bytes = PackedRowBytes(src.cols, spec.bits);
  const size_t item = DTypeSize(src.dtype);
  Status st = internal::ForEachRow(
      src.rows, src.cols, exec.threads, internal::MinRowsPerTask(src.cols), stats,
      [&](int64_t r, float* row, ErrorStats* local) {
        const auto* in = static_cast<const uint8_t*>(src.data) + r * src.cols * item;
        k.convert(src.dtype, in, row, static_cast<size_t>(src.cols));
        AQ_RETURN_NOT_OK(kernels::CheckFiniteRow(row, src.cols, src.row_offset + r));
        AQ_RETURN_NOT_OK(choose(k, row, r, G));
        const float* s = out_scales ? out_scales + r * G : scales + r * G;
        const float* z = out_zero_points ? out_zero_points + r * G : zero_points + r * G;
        k.encode(row, src.cols, spec, s, z, packed + r * row_bytes, local);
        return Status::OK();
      });
  return st.ok() ? st : PreferNonFinite(src, st);
}

// Method rtn with float32 parameters on a path with a fused row kernel: one
// sweep over the source per row, no separate conversion buffer.
Status RunFusedRtn(kernels::FusedRtnRowFn fused, const TensorView& src, const QuantSpec& spec,
                   const QuantizedBuffers& out, ErrorStats* stats, const ExecOptions& exec) {
  AQ_RETURN_NOT_OK(ValidateSpec(spec));
  AQ_RETURN_NOT_OK(CheckView(src));
  if (src.rows == 0 || src.cols == 0) return Status::OK();
  const int64_t G = GroupsPerRow(src.cols, spec.group_size);
  const int64_t row_bytes = PackedRowBytes(src.cols, spec.bits);
  const size_t item = DTypeSize(src.dtype);
  Status st = internal::ForEachRow(
      src.rows, src.cols, exec.threads, internal::MinRowsPerTask(src.cols), stats,
      [&](int64_t r, float*, ErrorStats* local) {
        const auto* in = static_cast<const uint8_t*>(src.data) + r * src.cols * item;
        return fused(src.dtype, in, src.cols, spec, out.scales + r * G, out.zero_points + r * G,
                     out.packed + r * row_bytes, local, src.row_offset + r);
      });
  return st.ok() ? st : PreferNonFinite(src, st);
}

}  // namespace

Status Quantize(const TensorView& src, const QuantSpec& spec, const QuantizedBuffers& out,
                ErrorStats* stats, const ExecOptions& exec) {
  if (spec.method == Method::kRtn && spec.param_dtype == ParamDType::kF32) {
    if (kernels::FusedRtnRowFn fused = kernels::SelectFusedRtn(exec.force_scalar)) {
      return RunFusedRtn(fused, src, spec, out, stats, exec);
    }
  }
  if (spec.param_dtype == ParamDType::kSuperblock) {
    if (src.rows * src.cols > 0 &&
        (out.superblock_scales == nullptr || out.superblock_zero_points == nullptr)) {
      return Status::Invalid("superblock parameters need super-block output buffers");
    }
    const int64_t S = SuperblocksPerRow(src.cols, spec.group_size);
    return RunRows(src, spec, nullptr, nullptr, out.packed, out.scales, out.zero_points, stats,
                   exec, [&](const kernels::RowKernels& k, const float* x, int64_t r, int64_t G) {
                     int64_t j = 0;
                     Status st = kernels::ChooseRowSuperblock(
                         *k.passes, x, src.cols, spec, out.scales + r * G, out.zero_points + r * G,
                         out.superblock_scales + r * S, out.superblock_zero_points + r * S, &j,
                         out.scale_codes ? out.scale_codes + r * G : nullptr,
                         out.zero_codes ? out.zero_codes + r * G : nullptr);
                     if (!st.ok()) {
                       return st.WithContext("row " + std::to_string(src.row_offset + r) +
                                             ", group " + std::to_string(j));
                     }
                     return Status::OK();
                   });
  }
  return RunRows(src, spec, nullptr, nullptr, out.packed, out.scales, out.zero_points, stats, exec,
                 [&](const kernels::RowKernels& k, const float* x, int64_t r, int64_t G) {
                   return k.choose_params(x, src.cols, spec, out.scales + r * G,
                                          out.zero_points + r * G, src.row_offset + r);
                 });
}

Status QuantizeWithParams(const TensorView& src, const QuantSpec& spec, const float* scales,
                          const float* zero_points, uint8_t* packed, ErrorStats* stats,
                          const ExecOptions& exec) {
  if (src.rows * src.cols > 0 && (scales == nullptr || zero_points == nullptr)) {
    return Status::Invalid("scales and zero points are required");
  }
  return RunRows(
      src, spec, scales, zero_points, packed, nullptr, nullptr, stats, exec,
      [](const kernels::RowKernels&, const float*, int64_t, int64_t) { return Status::OK(); });
}

Status Dequantize(const uint8_t* packed, int64_t rows, int64_t cols, const QuantSpec& spec,
                  const float* scales, const float* zero_points, float* out,
                  const ExecOptions& exec) {
  AQ_RETURN_NOT_OK(ValidateSpec(spec));
  if (rows < 0 || cols < 0) return Status::Invalid("negative tensor dimensions");
  if (rows == 0 || cols == 0) return Status::OK();
  const kernels::RowKernels& k = kernels::Select(exec.force_scalar);
  const int64_t G = GroupsPerRow(cols, spec.group_size);
  const int64_t row_bytes = PackedRowBytes(cols, spec.bits);
  ParallelFor(rows, exec.threads, internal::MinRowsPerTask(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      k.decode(packed + r * row_bytes, cols, spec, scales + r * G, zero_points + r * G,
               out + r * cols);
    }
  });
  return Status::OK();
}

const char* ActiveKernelName() { return kernels::Select(false).name; }

}  // namespace arrowquant
