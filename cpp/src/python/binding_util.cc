// Helpers shared by the bind_*.cc files (declared in binding.h).
#include <string>

#include "python/binding.h"

namespace arrowquant::python {

QuantSpec MakeSpec(int bits, int64_t group_size, const std::string& scheme,
                   const std::string& method, const std::string& param_dtype) {
  QuantSpec spec;
  spec.bits = bits;
  spec.group_size = group_size;
  if (scheme == "asymmetric") {
    spec.scheme = Scheme::kAsymmetric;
  } else if (scheme == "symmetric") {
    spec.scheme = Scheme::kSymmetric;
  } else {
    ThrowIfError(
        Status::Invalid("scheme must be 'asymmetric' or 'symmetric', got '" + scheme + "'"));
  }
  if (method == "rtn") {
    spec.method = Method::kRtn;
  } else if (method == "mse") {
    spec.method = Method::kMse;
  } else {
    ThrowIfError(Status::Invalid("method must be 'rtn' or 'mse', got '" + method + "'"));
  }
  if (param_dtype == "float32") {
    spec.param_dtype = ParamDType::kF32;
  } else if (param_dtype == "float16") {
    spec.param_dtype = ParamDType::kF16;
  } else if (param_dtype == "superblock") {
    spec.param_dtype = ParamDType::kSuperblock;
  } else {
    ThrowIfError(Status::Invalid("param dtype must be 'float32', 'float16' or 'superblock', got '" +
                                 param_dtype + "'"));
  }
  ThrowIfError(ValidateSpec(spec));
  return spec;
}

TensorView MakeView(const ReadOnlyBytes& src, const std::string& dtype, int64_t rows,
                    int64_t cols) {
  const DType dt = ValueOrThrow(ParseDType(dtype));
  const size_t item_bits = src.dtype().bits;
  const size_t nbytes = src.size() * item_bits / 8;
  if (rows < 0 || cols < 0 || nbytes != static_cast<size_t>(rows * cols) * DTypeSize(dt)) {
    ThrowIfError(Status::ShapeMismatch(
        "buffer holds " + std::to_string(nbytes) + " bytes but " + std::to_string(rows) + " x " +
        std::to_string(cols) + " " + std::string(DTypeName(dt)) + " needs " +
        std::to_string(static_cast<size_t>(rows * cols) * DTypeSize(dt))));
  }
  return TensorView{src.data(), dt, rows, cols};
}

void CheckSize(const char* what, size_t have, int64_t need) {
  if (have != static_cast<size_t>(need)) {
    ThrowIfError(Status::ShapeMismatch(std::string(what) + " buffer has " + std::to_string(have) +
                                       " elements, " + std::to_string(need) + " needed"));
  }
}

void CheckQuantBuffers(int64_t rows, int64_t cols, int bits, int64_t group_size, size_t packed_size,
                       size_t scales_size, size_t zero_points_size) {
  CheckSize("packed", packed_size, rows * PackedRowBytes(cols, bits));
  CheckSize("scales", scales_size, rows * GroupsPerRow(cols, group_size));
  CheckSize("zero_points", zero_points_size, rows * GroupsPerRow(cols, group_size));
}

StatsTuple ToTuple(const ErrorStats& s) {
  return {s.sum_x2, s.sum_xhat2, s.sum_x_xhat, s.sum_err2, s.max_abs_err, s.count};
}

}  // namespace arrowquant::python
