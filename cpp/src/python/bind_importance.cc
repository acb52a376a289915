// Bindings of the importance-weighted parameter search. Buffers are
// C-contiguous ndarrays (read-only inputs, caller-allocated outputs); the GIL
// is released while the engine works.
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>

#include <string>
#include <tuple>

#include "arrowquant/importance.h"
#include "arrowquant/quantize.h"
#include "python/binding.h"

namespace arrowquant::python {
namespace {

using ReadOnlyBytes = nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu>;
using OutBytes = nb::ndarray<uint8_t, nb::c_contig, nb::device::cpu>;
using OutFloats = nb::ndarray<float, nb::c_contig, nb::device::cpu>;
using InFloats = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using StatsTuple = std::tuple<double, double, double, double, double, int64_t>;

QuantSpec Spec(int bits, int64_t group_size, const std::string& scheme,
               const std::string& param_dtype) {
  QuantSpec spec;
  spec.bits = bits;
  spec.group_size = group_size;
  if (scheme == "asymmetric") {
    spec.scheme = Scheme::kAsymmetric;
  } else if (scheme == "symmetric") {
    spec.scheme = Scheme::kSymmetric;
  } else {
    ThrowIfError(Status::Invalid("scheme must be 'asymmetric' or 'symmetric', got '" + scheme + "'"));
  }
  if (param_dtype == "float32") {
    spec.param_dtype = ParamDType::kF32;
  } else if (param_dtype == "float16") {
    spec.param_dtype = ParamDType::kF16;
  } else {
    ThrowIfError(Status::Invalid("param dtype must be 'float32' or 'float16', got '" +
                                 param_dtype + "'"));
  }
  ThrowIfError(ValidateSpec(spec));
  return spec;
}

TensorView View(const ReadOnlyBytes& src, const std::string& dtype, int64_t rows, int64_t cols) {
  const DType dt = ValueOrThrow(ParseDType(dtype));
  const size_t nbytes = src.size() * src.dtype().bits / 8;
  if (rows < 0 || cols < 0 || nbytes != static_cast<size_t>(rows * cols) * DTypeSize(dt)) {
    ThrowIfError(Status::ShapeMismatch("buffer holds " + std::to_string(nbytes) + " bytes but " +
                                       std::to_string(rows) + " x " + std::to_string(cols) + " " +
                                       std::string(DTypeName(dt)) + " needs " +
                                       std::to_string(static_cast<size_t>(rows * cols) *
                                                      DTypeSize(dt))));
  }
  return TensorView{src.data(), dt, rows, cols};
}

void Need(const char* what, size_t have, int64_t need) {
  if (have != static_cast<size_t>(need)) {
    ThrowIfError(Status::ShapeMismatch(std::string(what) + " buffer has " + std::to_string(have) +
                                       " elements, " + std::to_string(need) + " needed"));
  }
}

ImportanceOptions Options(int grid_steps, float max_clip, int refit_iters, bool refit_all) {
  ImportanceOptions o;
  o.grid_steps = grid_steps;
  o.max_clip = max_clip;
  o.refit_iters = refit_iters;
  o.refit_all = refit_all;
  ThrowIfError(ValidateImportanceOptions(o));
  return o;
}

StatsTuple BindQuantizeImportance(const ReadOnlyBytes& src, const std::string& dtype, int64_t rows,
                                  int64_t cols, int bits, int64_t group_size,
                                  const std::string& scheme, const std::string& param_dtype,
                                  InFloats importance, OutBytes packed, OutFloats scales,
                                  OutFloats zero_points, int grid_steps, float max_clip,
                                  int refit_iters, bool refit_all, int threads,
                                  bool force_scalar) {
  const QuantSpec spec = Spec(bits, group_size, scheme, param_dtype);
  const ImportanceOptions opts = Options(grid_steps, max_clip, refit_iters, refit_all);
  const TensorView view = View(src, dtype, rows, cols);
  Need("importance", importance.size(), cols);
  Need("packed", packed.size(), rows * PackedRowBytes(cols, bits));
  Need("scales", scales.size(), rows * GroupsPerRow(cols, group_size));
  Need("zero_points", zero_points.size(), rows * GroupsPerRow(cols, group_size));
  ErrorStats stats;
  Status st;
  {
    nb::gil_scoped_release release;
    st = QuantizeImportance(view, spec, importance.data(),
                            QuantizedBuffers{packed.data(), scales.data(), zero_points.data()},
                            &stats, opts, ExecOptions{threads, force_scalar});
  }
  ThrowIfError(st);
  return {stats.sum_x2, stats.sum_xhat2, stats.sum_x_xhat, stats.sum_err2, stats.max_abs_err,
          stats.count};
}

void BindImportanceParams(const ReadOnlyBytes& src, const std::string& dtype, int64_t rows,
                          int64_t cols, int bits, int64_t group_size, const std::string& scheme,
                          const std::string& param_dtype, InFloats importance, OutFloats scales,
                          OutFloats zero_points, int grid_steps, float max_clip, int refit_iters,
                          bool refit_all, int threads, bool force_scalar) {
  const QuantSpec spec = Spec(bits, group_size, scheme, param_dtype);
  const ImportanceOptions opts = Options(grid_steps, max_clip, refit_iters, refit_all);
  const TensorView view = View(src, dtype, rows, cols);
  Need("importance", importance.size(), cols);
  Need("scales", scales.size(), rows * GroupsPerRow(cols, group_size));
  Need("zero_points", zero_points.size(), rows * GroupsPerRow(cols, group_size));
  Status st;
  {
    nb::gil_scoped_release release;
    st = ImportanceSearchParams(view, spec, importance.data(), scales.data(), zero_points.data(),
                                opts, ExecOptions{threads, force_scalar});
  }
  ThrowIfError(st);
}

void Bind(nb::module_& m) {
  const ImportanceOptions d;
  m.def("quantize_importance", &BindQuantizeImportance, nb::arg("src"), nb::arg("dtype"),
        nb::arg("rows"), nb::arg("cols"), nb::arg("bits"), nb::arg("group_size"),
        nb::arg("scheme"), nb::arg("param_dtype"), nb::arg("importance"), nb::arg("packed"),
        nb::arg("scales"), nb::arg("zero_points"), nb::arg("grid_steps") = d.grid_steps,
        nb::arg("max_clip") = d.max_clip, nb::arg("refit_iters") = d.refit_iters,
        nb::arg("refit_all") = d.refit_all, nb::arg("threads") = 0,
        nb::arg("force_scalar") = false,
        "Importance-weighted parameter search + codes into caller buffers; returns error sums.");
  m.def("importance_params", &BindImportanceParams, nb::arg("src"), nb::arg("dtype"),
        nb::arg("rows"), nb::arg("cols"), nb::arg("bits"), nb::arg("group_size"),
        nb::arg("scheme"), nb::arg("param_dtype"), nb::arg("importance"), nb::arg("scales"),
        nb::arg("zero_points"), nb::arg("grid_steps") = d.grid_steps,
        nb::arg("max_clip") = d.max_clip, nb::arg("refit_iters") = d.refit_iters,
        nb::arg("refit_all") = d.refit_all, nb::arg("threads") = 0,
        nb::arg("force_scalar") = false,
        "Importance-weighted scales and zero points only.");
}

const bool kRegistered = RegisterBinding("importance", Bind);

}  // namespace
}  // namespace arrowquant::python
