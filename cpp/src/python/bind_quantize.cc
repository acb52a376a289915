// Bindings of the quantization kernels. Buffers come in as C-contiguous
// ndarrays (read-only inputs, caller-allocated outputs); the GIL is released
// while the engine works.
#include <malloc.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>

#include <optional>
#include <string>
#include <tuple>

#include "arrowquant/quantize.h"
#include "python/binding.h"

namespace arrowquant::python {
namespace {

StatsTuple BindQuantize(const ReadOnlyBytes& src, const std::string& dtype, int64_t rows,
                        int64_t cols, int bits, int64_t group_size, const std::string& scheme,
                        const std::string& method, const std::string& param_dtype, OutBytes packed,
                        OutFloats scales, OutFloats zero_points, int threads, bool force_scalar,
                        int64_t row_offset) {
  const QuantSpec spec = MakeSpec(bits, group_size, scheme, method, param_dtype);
  TensorView view = MakeView(src, dtype, rows, cols);
  view.row_offset = row_offset;
  CheckQuantBuffers(rows, cols, bits, group_size, packed.size(), scales.size(), zero_points.size());
  ErrorStats stats;
  Status st;
  {
    nb::gil_scoped_release release;
    st = Quantize(view, spec, QuantizedBuffers{packed.data(), scales.data(), zero_points.data()},
                  &stats, ExecOptions{threads, force_scalar});
  }
  ThrowIfError(st);
  return ToTuple(stats);
}

// param_dtype "superblock": also fills the super-block units.
StatsTuple BindQuantizeSuperblock(const ReadOnlyBytes& src, const std::string& dtype, int64_t rows,
                                  int64_t cols, int bits, int64_t group_size,
                                  const std::string& method, OutBytes packed, OutFloats scales,
                                  OutFloats zero_points, OutFloats superblock_scales,
                                  OutFloats superblock_zero_points, int threads, bool force_scalar,
                                  int64_t row_offset, std::optional<OutBytes> scale_codes,
                                  std::optional<OutBytes> zero_codes) {
  const QuantSpec spec = MakeSpec(bits, group_size, "asymmetric", method, "superblock");
  TensorView view = MakeView(src, dtype, rows, cols);
  view.row_offset = row_offset;
  CheckQuantBuffers(rows, cols, bits, group_size, packed.size(), scales.size(), zero_points.size());
  const int64_t units = rows * SuperblocksPerRow(cols, group_size);
  CheckSize("superblock_scales", superblock_scales.size(), units);
  CheckSize("superblock_zero_points", superblock_zero_points.size(), units);
  if (scale_codes.has_value() != zero_codes.has_value()) {
    ThrowIfError(Status::Invalid("scale_codes and zero_codes go together"));
  }
  if (scale_codes) {
    CheckSize("scale_codes", scale_codes->size(), scales.size());
    CheckSize("zero_codes", zero_codes->size(), scales.size());
  }
  ErrorStats stats;
  Status st;
  {
    nb::gil_scoped_release release;
    st = Quantize(
        view, spec,
        QuantizedBuffers{packed.data(), scales.data(), zero_points.data(), superblock_scales.data(),
                         superblock_zero_points.data(), scale_codes ? scale_codes->data() : nullptr,
                         zero_codes ? zero_codes->data() : nullptr},
        &stats, ExecOptions{threads, force_scalar});
  }
  ThrowIfError(st);
  return ToTuple(stats);
}

StatsTuple BindQuantizeWithParams(const ReadOnlyBytes& src, const std::string& dtype, int64_t rows,
                                  int64_t cols, int bits, int64_t group_size,
                                  const std::string& scheme, InFloats scales, InFloats zero_points,
                                  OutBytes packed, int threads, bool force_scalar,
                                  int64_t row_offset) {
  const QuantSpec spec = MakeSpec(bits, group_size, scheme, "rtn", "float32");
  TensorView view = MakeView(src, dtype, rows, cols);
  view.row_offset = row_offset;
  CheckQuantBuffers(rows, cols, bits, group_size, packed.size(), scales.size(), zero_points.size());
  ErrorStats stats;
  Status st;
  {
    nb::gil_scoped_release release;
    st = QuantizeWithParams(view, spec, scales.data(), zero_points.data(), packed.data(), &stats,
                            ExecOptions{threads, force_scalar});
  }
  ThrowIfError(st);
  return ToTuple(stats);
}

void BindDequantize(InBytes packed, int64_t rows, int64_t cols, int bits, int64_t group_size,
                    InFloats scales, InFloats zero_points, OutFloats out, int threads,
                    bool force_scalar) {
  QuantSpec spec;
  spec.bits = bits;
  spec.group_size = group_size;
  ThrowIfError(ValidateSpec(spec));
  CheckQuantBuffers(rows, cols, bits, group_size, packed.size(), scales.size(), zero_points.size());
  CheckSize("out", out.size(), rows * cols);
  Status st;
  {
    nb::gil_scoped_release release;
    st = Dequantize(packed.data(), rows, cols, spec, scales.data(), zero_points.data(), out.data(),
                    ExecOptions{threads, force_scalar});
  }
  ThrowIfError(st);
}

// glibc raises its mmap threshold each time a large mmapped block is freed,
// after which big buffers come from the heap and stay resident when freed.
// A fixed threshold keeps every buffer of 256 KiB or more in its own mapping,
// returned to the system on free: what bounds the pipeline's resident memory.
bool FixMmapThreshold() {
#ifdef M_MMAP_THRESHOLD
  return mallopt(M_MMAP_THRESHOLD, 256 * 1024) == 1;
#else
  return false;
#endif
}

void Bind(nb::module_& m) {
  m.def("quantize", &BindQuantize, nb::arg("src"), nb::arg("dtype"), nb::arg("rows"),
        nb::arg("cols"), nb::arg("bits"), nb::arg("group_size"), nb::arg("scheme"),
        nb::arg("method"), nb::arg("param_dtype"), nb::arg("packed"), nb::arg("scales"),
        nb::arg("zero_points"), nb::arg("threads") = 0, nb::arg("force_scalar") = false,
        nb::arg("row_offset") = 0,
        "Quantize rows x cols elements (rows row_offset.. of a tensor) into caller-allocated "
        "buffers; returns error sums.");
  m.def("quantize_superblock", &BindQuantizeSuperblock, nb::arg("src"), nb::arg("dtype"),
        nb::arg("rows"), nb::arg("cols"), nb::arg("bits"), nb::arg("group_size"), nb::arg("method"),
        nb::arg("packed"), nb::arg("scales"), nb::arg("zero_points"), nb::arg("superblock_scales"),
        nb::arg("superblock_zero_points"), nb::arg("threads") = 0, nb::arg("force_scalar") = false,
        nb::arg("row_offset") = 0, nb::arg("scale_codes") = nb::none(),
        nb::arg("zero_codes") = nb::none(),
        "Quantize with two-level (superblock) parameters: expanded per-group scales and zero "
        "points, the float16 units of each super-block and (when given) each group's codes; "
        "returns error sums.");
  m.def("quantize_with_params", &BindQuantizeWithParams, nb::arg("src"), nb::arg("dtype"),
        nb::arg("rows"), nb::arg("cols"), nb::arg("bits"), nb::arg("group_size"), nb::arg("scheme"),
        nb::arg("scales"), nb::arg("zero_points"), nb::arg("packed"), nb::arg("threads") = 0,
        nb::arg("force_scalar") = false, nb::arg("row_offset") = 0,
        "Codes for given scales and zero points; returns error sums.");
  m.def("dequantize", &BindDequantize, nb::arg("packed"), nb::arg("rows"), nb::arg("cols"),
        nb::arg("bits"), nb::arg("group_size"), nb::arg("scales"), nb::arg("zero_points"),
        nb::arg("out"), nb::arg("threads") = 0, nb::arg("force_scalar") = false);
  m.def("active_kernel", &ActiveKernelName);
  m.def("fix_mmap_threshold", &FixMmapThreshold,
        "Large allocations always mmapped (returned to the OS when freed); process-wide.");
}

const bool kRegistered = RegisterBinding("quantize", Bind);

}  // namespace
}  // namespace arrowquant::python
