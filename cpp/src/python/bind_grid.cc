// Bindings of the code grids (grid.h): learned table, parameter search and
// codes, dequantization. float32 inputs, caller-allocated outputs; the GIL
// is released while the engine works.
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <optional>

#include "arrowquant/grid.h"
#include "python/binding.h"

namespace arrowquant::python {
namespace {

grid::GridShape Shape(int64_t rows, int64_t cols, int64_t group_size, int bits,
                      bool force_scalar = false) {
  return grid::GridShape{rows, cols, group_size, bits, force_scalar};
}

const float* Importance(const std::optional<InFloats>& w, int64_t cols) {
  if (!w) return nullptr;
  CheckSize("importance", w->size(), cols);
  return w->data();
}

void BindLearn(InFloats x, int64_t rows, int64_t cols, int64_t group_size, int bits,
               std::optional<InFloats> importance, InFloats start, OutFloats levels,
               bool force_scalar) {
  CheckSize("x", x.size(), rows * cols);
  CheckSize("start", start.size(), int64_t{1} << bits);
  CheckSize("levels", levels.size(), int64_t{1} << bits);
  const float* w = Importance(importance, cols);
  Status st;
  {
    nb::gil_scoped_release release;
    st = grid::LearnLevels(x.data(), Shape(rows, cols, group_size, bits, force_scalar), w,
                           start.data(), levels.data());
  }
  ThrowIfError(st);
}

void BindQuantize(InFloats x, int64_t rows, int64_t cols, int64_t group_size, int bits, bool f16,
                  InFloats levels, std::optional<InFloats> importance, OutBytes codes,
                  OutFloats scales, OutFloats zero_points, bool force_scalar) {
  const int64_t groups = rows * ((cols + group_size - 1) / std::max<int64_t>(group_size, 1));
  CheckSize("x", x.size(), rows * cols);
  CheckSize("levels", levels.size(), int64_t{1} << bits);
  CheckSize("codes", codes.size(), rows * cols);
  CheckSize("scales", scales.size(), groups);
  CheckSize("zero_points", zero_points.size(), groups);
  const float* w = Importance(importance, cols);
  Status st;
  {
    nb::gil_scoped_release release;
    st = grid::Quantize(x.data(), Shape(rows, cols, group_size, bits, force_scalar), f16,
                        levels.data(), w, codes.data(), scales.data(), zero_points.data());
  }
  ThrowIfError(st);
}

void BindQuantizeSuperblock(InFloats x, int64_t rows, int64_t cols, int64_t group_size, int bits,
                            InFloats levels, std::optional<InFloats> importance, OutBytes codes,
                            OutFloats scales, OutFloats zero_points, OutFloats units,
                            OutBytes a_codes, OutBytes c_codes, bool force_scalar) {
  const int64_t G = (cols + group_size - 1) / std::max<int64_t>(group_size, 1);
  const int64_t K = std::max<int64_t>(1, 256 / std::max<int64_t>(group_size, 1));
  CheckSize("x", x.size(), rows * cols);
  CheckSize("levels", levels.size(), int64_t{1} << bits);
  CheckSize("codes", codes.size(), rows * cols);
  CheckSize("scales", scales.size(), rows * G);
  CheckSize("zero_points", zero_points.size(), rows * G);
  CheckSize("units", units.size(), rows * 2 * ((G + K - 1) / K));
  CheckSize("a_codes", a_codes.size(), rows * G);
  CheckSize("c_codes", c_codes.size(), rows * G);
  const float* w = Importance(importance, cols);
  Status st;
  {
    nb::gil_scoped_release release;
    st = grid::QuantizeSuperblock(
        x.data(), Shape(rows, cols, group_size, bits, force_scalar), levels.data(), w, codes.data(),
        grid::SuperblockOut{scales.data(), zero_points.data(), units.data(), a_codes.data(),
                            c_codes.data()});
  }
  ThrowIfError(st);
}

void BindDequantize(InBytes codes, int64_t rows, int64_t cols, int64_t group_size, int bits,
                    InFloats levels, InFloats scales, InFloats zero_points, OutFloats out) {
  const int64_t groups = rows * ((cols + group_size - 1) / std::max<int64_t>(group_size, 1));
  CheckSize("codes", codes.size(), rows * cols);
  CheckSize("levels", levels.size(), int64_t{1} << bits);
  CheckSize("scales", scales.size(), groups);
  CheckSize("zero_points", zero_points.size(), groups);
  CheckSize("out", out.size(), rows * cols);
  Status st;
  {
    nb::gil_scoped_release release;
    st = grid::Dequantize(codes.data(), Shape(rows, cols, group_size, bits), levels.data(),
                          scales.data(), zero_points.data(), out.data());
  }
  ThrowIfError(st);
}

void Bind(nb::module_& m) {
  m.def("grid_learn_levels", &BindLearn, nb::arg("x"), nb::arg("rows"), nb::arg("cols"),
        nb::arg("group_size"), nb::arg("bits"), nb::arg("importance").none(), nb::arg("start"),
        nb::arg("levels"), nb::arg("force_scalar") = false,
        "The importance-weighted Lloyd table (FORMAT.md 10.4).");
  m.def("grid_quantize", &BindQuantize, nb::arg("x"), nb::arg("rows"), nb::arg("cols"),
        nb::arg("group_size"), nb::arg("bits"), nb::arg("f16"), nb::arg("levels"),
        nb::arg("importance").none(), nb::arg("codes"), nb::arg("scales"), nb::arg("zero_points"),
        nb::arg("force_scalar") = false, "Grid parameters and codes (FORMAT.md 10.2, 10.4).");
  m.def("grid_quantize_superblock", &BindQuantizeSuperblock, nb::arg("x"), nb::arg("rows"),
        nb::arg("cols"), nb::arg("group_size"), nb::arg("bits"), nb::arg("levels"),
        nb::arg("importance").none(), nb::arg("codes"), nb::arg("scales"), nb::arg("zero_points"),
        nb::arg("units"), nb::arg("a_codes"), nb::arg("c_codes"), nb::arg("force_scalar") = false,
        "Grid codes with two-level parameters (FORMAT.md 10.5).");
  m.def("grid_dequantize", &BindDequantize, nb::arg("codes"), nb::arg("rows"), nb::arg("cols"),
        nb::arg("group_size"), nb::arg("bits"), nb::arg("levels"), nb::arg("scales"),
        nb::arg("zero_points"), nb::arg("out"), "x_hat = (L[q] - z) * s.");
}

const bool kRegistered = RegisterBinding("grid", Bind);

}  // namespace
}  // namespace arrowquant::python
