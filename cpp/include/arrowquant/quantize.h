// Group-wise affine quantization (shared/FORMAT.md sections 1-3).
//
// A tensor is viewed as rows x cols; each row is cut into groups of
// `group_size` consecutive elements (the last one shorter when the size does
// not divide the row). Every group gets a float32 scale and zero point; codes
// are q = clamp(rint(x * (1/scale) + zero), 0, 2^bits - 1), packed
// little-endian inside each byte, every row starting on a byte boundary.
#pragma once

#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

#include "arrowquant/dtype.h"
#include "arrowquant/status.h"

namespace arrowquant {

enum class Scheme : uint8_t { kAsymmetric, kSymmetric };

// How scale and zero point are chosen. The code and dequantization formulas
// are the same for every method, so readers never need to know it.
enum class Method : uint8_t {
  kRtn,  // FORMAT.md: min/max (asymmetric) or max-abs (symmetric)
  // Error-minimizing search (docs/FORMAT.md section 7): per group, the
  // candidate with the least true squared error among rtn, clipped ranges
  // and least-squares refits of scale and offset; deterministic, never worse
  // than rtn on any group, bit-identical to the numpy reference. 4-6
  // evaluation passes over each group (AVX2 when the CPU has it).
  kMse,
};

// Precision in which scales and zero points are stored. With kF16 they are
// rounded to float16 before the codes are computed, so that dequantization
// from the stored values is exact (docs/FORMAT.md section 7: a scale that
// would underflow is stored as 2^-24; an asymmetric zero point beyond
// float16's range falls back to the range widened to include 0; a group with
// no representable candidate is an Invalid status naming it).
//
// kSuperblock: two-level parameters (docs/FORMAT.md section 9), asymmetric
// scheme only. The groups of a row are taken SuperblockGroups(group_size) at a
// time; each super-block stores a float16 scale unit d and zero unit dz, each
// group a scale code a in [1, 2^p - 1] and a zero code c in [0, 2^p - 1]
// (p = SuperblockCodeBits(bits)); the group's scale is d * a and its zero
// point dz * c, float32 products that are exact. The engine fills the
// expanded per-group values and the units; the codes are their quotients.
enum class ParamDType : uint8_t { kF32, kF16, kSuperblock };

// Weights per super-block of two-level parameters.
inline constexpr int64_t kSuperblockWeights = 256;
// Groups per super-block: kSuperblockWeights / group_size, at least 1.
int64_t SuperblockGroups(int64_t group_size);
// Super-blocks per row (a super-block never spans rows; the last one of a
// row may hold fewer groups).
int64_t SuperblocksPerRow(int64_t cols, int64_t group_size);
// Bits of each group's scale code and zero code: 4 at INT2, 6 at INT4/INT8.
int SuperblockCodeBits(int bits);

struct QuantSpec {
  int bits = 4;              // 2, 4 or 8
  int64_t group_size = 128;  // any positive size
  Scheme scheme = Scheme::kAsymmetric;
  Method method = Method::kRtn;
  ParamDType param_dtype = ParamDType::kF32;
};

// Checks bits and group size; the message says what is allowed.
Status ValidateSpec(const QuantSpec& spec);

// A 2-D row-major view of tensor memory (not owned): `rows` rows of a
// tensor, starting at row `row_offset` of the whole tensor (what error
// messages count from, so a NaN is placed in the tensor, not in the piece).
struct TensorView {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t row_offset = 0;
};

int64_t GroupsPerRow(int64_t cols, int64_t group_size);
int64_t PackedRowBytes(int64_t cols, int bits);

// Output buffers, sized by the caller: packed = rows * PackedRowBytes,
// scales and zero_points = rows * GroupsPerRow (row-major, index r * G + j).
// With ParamDType::kSuperblock also superblock_scales and
// superblock_zero_points, rows * SuperblocksPerRow each (float16 values),
// and, when not null, scale_codes and zero_codes, rows * GroupsPerRow each:
// the codes a and c of every group (scale = a * d, zero point = c * dz), what
// a file stores.
struct QuantizedBuffers {
  uint8_t* packed = nullptr;
  float* scales = nullptr;
  float* zero_points = nullptr;
  float* superblock_scales = nullptr;
  float* superblock_zero_points = nullptr;
  uint8_t* scale_codes = nullptr;
  uint8_t* zero_codes = nullptr;
};

// Running sums from which the error metrics follow; sums of several chunks
// merge, so a tensor quantized in pieces gets the metrics of the whole.
struct ErrorStats {
  double sum_x2 = 0.0;       // sum of x^2
  double sum_xhat2 = 0.0;    // sum of x_hat^2
  double sum_x_xhat = 0.0;   // sum of x * x_hat
  double sum_err2 = 0.0;     // sum of (x - x_hat)^2
  double max_abs_err = 0.0;  // max |x - x_hat|
  int64_t count = 0;
  void Merge(const ErrorStats& other);
};

// Error sums of parallel tasks, merged in index order so that the total (a
// floating-point sum) does not depend on which thread finished first.
class OrderedStats {
 public:
  void Add(int64_t first_index, const ErrorStats& s);  // thread-safe
  void MergeInto(ErrorStats* total);

 private:
  std::mutex mu_;
  std::vector<std::pair<int64_t, ErrorStats>> parts_;
};

struct ErrorMetrics {
  double cosine = 1.0;   // cos(x, x_hat); 1 when both are zero
  double rel_mse = 0.0;  // sum (x - x_hat)^2 / sum x^2
  double sqnr_db = 0.0;  // 10 log10(sum x^2 / sum (x - x_hat)^2); inf when exact
  double max_abs_error = 0.0;
};
ErrorMetrics FinalizeMetrics(const ErrorStats& stats);

struct ExecOptions {
  int threads = 0;            // 0: all cores
  bool force_scalar = false;  // skip the SIMD path (tests compare both)
};

// Chooses parameters by spec.method, computes codes and packs them, and (if
// stats is not null) accumulates the error of the dequantized values.
// NaN or Inf in the input is an Invalid status naming the first bad index.
Status Quantize(const TensorView& src, const QuantSpec& spec, const QuantizedBuffers& out,
                ErrorStats* stats, const ExecOptions& exec = {});

// Codes for caller-chosen parameters (other methods choose, then call this).
Status QuantizeWithParams(const TensorView& src, const QuantSpec& spec, const float* scales,
                          const float* zero_points, uint8_t* packed, ErrorStats* stats,
                          const ExecOptions& exec = {});

// x_hat = (q - zero_point) * scale, written as float32 rows x cols.
Status Dequantize(const uint8_t* packed, int64_t rows, int64_t cols, const QuantSpec& spec,
                  const float* scales, const float* zero_points, float* out,
                  const ExecOptions& exec = {});

// Name of the SIMD path Quantize uses on this CPU ("avx2" or "scalar").
const char* ActiveKernelName();

}  // namespace arrowquant
