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
                                  int refit_iters, bool refit_all, int threads, bool force_scalar,
                                  int64_t row_offset) {
  const QuantSpec spec = MakeSpec(bits, group_size, scheme, "rtn", param_dtype);
  const ImportanceOptions opts = Options(grid_steps, max_clip, refit_iters, refit_all);
  TensorView view = MakeView(src, dtype, rows, cols);
  view.row_offset = row_offset;
  CheckSize("importance", importance.size(), cols);
  CheckQuantBuffers(rows, cols, bits, group_size, packed.size(), scales.size(), zero_points.size());
  ErrorStats stats;
  Status st;
  {
    nb::gil_scoped_release release;
    st = QuantizeImportance(view, spec, importance.data(),
                            QuantizedBuffers{packed.data(), scales.data(), zero_points.data()},
                            &stats, opts, ExecOptions{threads, force_scalar});
  }
  ThrowIfError(st);
  return ToTuple(stats);
}

void BindImportanceParams(const ReadOnlyBytes& src, const std::string& dtype, int64_t rows,
                          int64_t cols, int bits, int64_t group_size, const std::string& scheme,
                          const std::string& param_dtype, InFloats importance, OutFloats scales,
                          OutFloats zero_points, int grid_steps, float max_clip, int refit_iters,
                          bool refit_all, int threads, bool force_scalar) {
  const QuantSpec spec = MakeSpec(bits, group_size, scheme, "rtn", param_dtype);
  const ImportanceOptions opts = Options(grid_steps, max_clip, refit_iters, refit_all);
  const TensorView view = MakeView(src, dtype, rows, cols);
  CheckSize("importance", importance.size(), cols);
  CheckSize("scales", scales.size(), rows * GroupsPerRow(cols, group_size));
  CheckSize("zero_points", zero_points.size(), rows * GroupsPerRow(cols, group_size));
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
        nb::arg("rows"), nb::arg("cols"), nb::arg("bits"), nb::arg("group_size"), nb::arg("scheme"),
        nb::arg("param_dtype"), nb::arg("importance"), nb::arg("packed"), nb::arg("scales"),
        nb::arg("zero_points"), nb::arg("grid_steps") = d.grid_steps,
        nb::arg("max_clip") = d.max_clip, nb::arg("refit_iters") = d.refit_iters,
        nb::arg("refit_all") = d.refit_all, nb::arg("threads") = 0, nb::arg("force_scalar") = false,
        nb::arg("row_offset") = 0,
        "Importance-weighted parameter search + codes into caller buffers; returns error sums.");
  m.def("importance_params", &BindImportanceParams, nb::arg("src"), nb::arg("dtype"),
        nb::arg("rows"), nb::arg("cols"), nb::arg("bits"), nb::arg("group_size"), nb::arg("scheme"),
        nb::arg("param_dtype"), nb::arg("importance"), nb::arg("scales"), nb::arg("zero_points"),
        nb::arg("grid_steps") = d.grid_steps, nb::arg("max_clip") = d.max_clip,
        nb::arg("refit_iters") = d.refit_iters, nb::arg("refit_all") = d.refit_all,
        nb::arg("threads") = 0, nb::arg("force_scalar") = false,
        "Importance-weighted scales and zero points only.");
}

const bool kRegistered = RegisterBinding("importance", Bind);

}  // namespace
}  // namespace arrowquant::python
