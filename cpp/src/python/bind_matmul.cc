// Bindings of the quantized matmul (arrowquant/matmul.h). Arrays come in as
// DLPack-capable objects (numpy arrays, torch CPU tensors: nanobind takes
// them without copies, and the extension is not built against torch);
// outputs are allocated by the caller. The GIL is released while the kernels
// run.
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <optional>
#include <string>

#include "arrowquant/matmul.h"
#include "python/binding.h"

namespace arrowquant::python {
namespace {

using AnyIn = nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu>;
using AnyOut = nb::ndarray<nb::c_contig, nb::device::cpu>;

// float32 / bfloat16 / float16 from a DLPack dtype.
DType ActivationType(nb::dlpack::dtype dt, const char* what) {
  const auto code = static_cast<nb::dlpack::dtype_code>(dt.code);
  if (dt.lanes == 1) {
    if (code == nb::dlpack::dtype_code::Float && dt.bits == 32) return DType::kF32;
    if (code == nb::dlpack::dtype_code::Float && dt.bits == 16) return DType::kF16;
    if (code == nb::dlpack::dtype_code::Bfloat && dt.bits == 16) return DType::kBF16;
  }
  ThrowIfError(Status::Invalid(std::string(what) + " must be float32, bfloat16 or float16"));
  return DType::kF32;
}

bool IsUInt8(nb::dlpack::dtype dt) {
  return dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::UInt) && dt.bits == 8;
}

// The matrix the arrays describe, every size checked.
QuantMatrix MakeMatrix(const AnyIn& codes, const AnyIn& scales, const AnyIn& zero_points,
                       const std::optional<AnyIn>& param_codes,
                       const std::optional<AnyIn>& input_scales, int64_t rows, int64_t cols,
                       int bits, int64_t group_size, const std::string& params, int param_code_bits,
                       int64_t superblock_groups) {
  QuantMatrix w;
  w.rows = rows;
  w.cols = cols;
  w.bits = bits;
  w.group_size = group_size;
  if (params == "float32") {
    w.params = ParamStorage::kF32;
  } else if (params == "float16") {
    w.params = ParamStorage::kF16;
  } else if (params == "superblock") {
    w.params = ParamStorage::kSuperblock;
    w.param_code_bits = param_code_bits;
    w.superblock_groups = superblock_groups;
  } else {
    ThrowIfError(Status::Invalid("params must be 'float32', 'float16' or 'superblock', got '" +
                                 params + "'"));
  }
  w.codes = static_cast<const uint8_t*>(codes.data());
  w.scales = scales.data();
  w.zero_points = zero_points.data();
  if (param_codes) w.param_codes = static_cast<const uint8_t*>(param_codes->data());
  ThrowIfError(ValidateQuantMatrix(w));
  const QuantMatrixSizes need = QuantMatrixBufferSizes(w);
  if (!IsUInt8(codes.dtype())) ThrowIfError(Status::Invalid("codes must be uint8"));
  CheckSize("codes", codes.size(), need.code_bytes);
  const int param_bits = w.params == ParamStorage::kF32 ? 32 : 16;
  for (const AnyIn* p : {&scales, &zero_points}) {
    if (p->dtype().bits != param_bits) {
      ThrowIfError(Status::Invalid("parameters of storage '" + params + "' must have " +
                                   std::to_string(param_bits) + "-bit elements"));
    }
  }
  CheckSize("scales", scales.size(), need.param_count);
  CheckSize("zero_points", zero_points.size(), need.param_count);
  if (w.params == ParamStorage::kSuperblock) {
    if (!param_codes || !IsUInt8(param_codes->dtype())) {
      ThrowIfError(Status::Invalid("superblock parameters need param_codes (uint8)"));
    }
    CheckSize("param_codes", param_codes->size(), need.param_code_bytes);
  }
  if (input_scales) {
    if (input_scales->dtype() != nb::dtype<float>()) {
      ThrowIfError(Status::Invalid("input_scales must be float32"));
    }
    CheckSize("input_scales", input_scales->size(), cols);
    w.input_scales = static_cast<const float*>(input_scales->data());
  }
  return w;
}

MatmulPath ParsePath(const std::string& path) {
  if (path == "auto") return MatmulPath::kAuto;
  if (path == "gemv") return MatmulPath::kGemv;
  if (path == "gemm") return MatmulPath::kGemm;
  ThrowIfError(Status::Invalid("path must be 'auto', 'gemv' or 'gemm', got '" + path + "'"));
  return MatmulPath::kAuto;
}

void BindQuantMatmul(const AnyIn& x, const AnyIn& codes, const AnyIn& scales,
                     const AnyIn& zero_points, const std::optional<AnyIn>& param_codes,
                     const std::optional<AnyIn>& input_scales, const std::optional<AnyIn>& bias,
                     AnyOut y, int64_t rows, int64_t cols, int bits, int64_t group_size,
                     const std::string& params, int param_code_bits, int64_t superblock_groups,
                     int threads, const std::string& path, bool force_scalar, bool force_avx2) {
  const QuantMatrix w =
      MakeMatrix(codes, scales, zero_points, param_codes, input_scales, rows, cols, bits,
                 group_size, params, param_code_bits, superblock_groups);
  const DType dt = ActivationType(x.dtype(), "x");
  if (ActivationType(y.dtype(), "y") != dt) {
    ThrowIfError(Status::Invalid("y must have the dtype of x"));
  }
  if (cols == 0 ? x.size() != 0 : x.size() % static_cast<size_t>(cols) != 0) {
    ThrowIfError(Status::ShapeMismatch("x holds " + std::to_string(x.size()) +
                                       " elements, not a whole number of rows of " +
                                       std::to_string(cols)));
  }
  const int64_t batch = cols == 0 ? 0 : static_cast<int64_t>(x.size()) / cols;
  CheckSize("y", y.size(), batch * rows);
  DType bias_dt = dt;
  if (bias) {
    bias_dt = ActivationType(bias->dtype(), "bias");
    CheckSize("bias", bias->size(), rows);
  }
  MatmulOptions opt;
  opt.threads = threads;
  opt.force_scalar = force_scalar;
  opt.path = ParsePath(path);
  opt.force_avx2 = force_avx2;
  Status st;
  {
    nb::gil_scoped_release release;
    st = QuantMatmul(w, x.data(), dt, batch, bias ? bias->data() : nullptr, bias_dt, y.data(), opt);
  }
  ThrowIfError(st);
}

void BindDequantizeRows(const AnyIn& codes, const AnyIn& scales, const AnyIn& zero_points,
                        const std::optional<AnyIn>& param_codes,
                        const std::optional<AnyIn>& input_scales, AnyOut out, int64_t rows,
                        int64_t cols, int bits, int64_t group_size, const std::string& params,
                        int param_code_bits, int64_t superblock_groups, int64_t row_begin,
                        int64_t row_end, int threads, bool force_scalar) {
  const QuantMatrix w =
      MakeMatrix(codes, scales, zero_points, param_codes, input_scales, rows, cols, bits,
                 group_size, params, param_code_bits, superblock_groups);
  if (out.dtype() != nb::dtype<float>()) ThrowIfError(Status::Invalid("out must be float32"));
  if (row_end < 0) row_end = rows;
  if (row_begin < 0 || row_end > rows || row_begin > row_end) {
    ThrowIfError(Status::Invalid("rows [" + std::to_string(row_begin) + ", " +
                                 std::to_string(row_end) + ") outside 0.." + std::to_string(rows)));
  }
  CheckSize("out", out.size(), (row_end - row_begin) * cols);
  MatmulOptions opt;
  opt.threads = threads;
  opt.force_scalar = force_scalar;
  Status st;
  {
    nb::gil_scoped_release release;
    st = DequantizeMatrixRows(w, row_begin, row_end, static_cast<float*>(out.data()), opt);
  }
  ThrowIfError(st);
}

void BindDequantizeGather(const AnyIn& codes, const AnyIn& scales, const AnyIn& zero_points,
                          const std::optional<AnyIn>& param_codes,
                          const std::optional<AnyIn>& input_scales, const AnyIn& ids, AnyOut out,
                          int64_t rows, int64_t cols, int bits, int64_t group_size,
                          const std::string& params, int param_code_bits, int64_t superblock_groups,
                          int threads) {
  const QuantMatrix w =
      MakeMatrix(codes, scales, zero_points, param_codes, input_scales, rows, cols, bits,
                 group_size, params, param_code_bits, superblock_groups);
  if (out.dtype() != nb::dtype<float>()) ThrowIfError(Status::Invalid("out must be float32"));
  if (ids.dtype() != nb::dtype<int64_t>()) ThrowIfError(Status::Invalid("ids must be int64"));
  const auto n = static_cast<int64_t>(ids.size());
  CheckSize("out", out.size(), n * cols);
  MatmulOptions opt;
  opt.threads = threads;
  Status st;
  {
    nb::gil_scoped_release release;
    st = DequantizeMatrixGather(w, static_cast<const int64_t*>(ids.data()), n,
                                static_cast<float*>(out.data()), opt);
  }
  ThrowIfError(st);
}

void Bind(nb::module_& m) {
  m.def("quant_matmul", &BindQuantMatmul, nb::arg("x"), nb::arg("codes"), nb::arg("scales"),
        nb::arg("zero_points"), nb::arg("param_codes").none(), nb::arg("input_scales").none(),
        nb::arg("bias").none(), nb::arg("y"), nb::arg("rows"), nb::arg("cols"), nb::arg("bits"),
        nb::arg("group_size"), nb::arg("params"), nb::arg("param_code_bits") = 0,
        nb::arg("superblock_groups") = 0, nb::arg("threads") = 0, nb::arg("path") = "auto",
        nb::arg("force_scalar") = false, nb::arg("force_avx2") = false,
        "y = x @ W^T + bias for a packed quantized W (rows x cols), into y (batch x rows, the "
        "dtype of x: float32, bfloat16 or float16).");
  m.def("dequantize_matrix_rows", &BindDequantizeRows, nb::arg("codes"), nb::arg("scales"),
        nb::arg("zero_points"), nb::arg("param_codes").none(), nb::arg("input_scales").none(),
        nb::arg("out"), nb::arg("rows"), nb::arg("cols"), nb::arg("bits"), nb::arg("group_size"),
        nb::arg("params"), nb::arg("param_code_bits") = 0, nb::arg("superblock_groups") = 0,
        nb::arg("row_begin") = 0, nb::arg("row_end") = -1, nb::arg("threads") = 0,
        nb::arg("force_scalar") = false,
        "Rows [row_begin, row_end) of W as float32 (equalization undone).");
  m.def("dequantize_matrix_gather", &BindDequantizeGather, nb::arg("codes"), nb::arg("scales"),
        nb::arg("zero_points"), nb::arg("param_codes").none(), nb::arg("input_scales").none(),
        nb::arg("ids"), nb::arg("out"), nb::arg("rows"), nb::arg("cols"), nb::arg("bits"),
        nb::arg("group_size"), nb::arg("params"), nb::arg("param_code_bits") = 0,
        nb::arg("superblock_groups") = 0, nb::arg("threads") = 0,
        "Rows ids of W as float32 (an embedding lookup; equalization undone).");
  m.def("active_matmul_kernel", &ActiveMatmulKernel);
}

const bool kRegistered = RegisterBinding("matmul", Bind);

}  // namespace
}  // namespace arrowquant::python
