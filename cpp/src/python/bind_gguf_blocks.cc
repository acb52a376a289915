// Bindings of the GGUF block codecs (gguf_blocks.h): encode float32 rows into
// any block type by search or plain rounding, optionally importance-weighted,
// and decode any codec type. Outputs are caller-allocated (the Python side,
// python/arrowquant/gguf_blocks.py, sizes them). The GIL is released while
// the engine works.
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>

#include <optional>
#include <string>

#include "arrowquant/gguf_blocks.h"
#include "python/binding.h"

namespace arrowquant::python {
namespace {

using namespace arrowquant::gguf;

GgmlType CodecType(const std::string& name) { return ValueOrThrow(ParseCodecType(name)); }

void CheckBytes(const char* what, size_t have, GgmlType t, int64_t rows, int64_t cols) {
  const uint64_t row = ValueOrThrow(RowBytes(t, cols));
  if (rows < 0 || have != row * static_cast<uint64_t>(rows)) {
    ThrowIfError(Status::ShapeMismatch(
        std::string(what) + " has " + std::to_string(have) + " bytes, " + std::to_string(rows) +
        " rows of " + std::to_string(cols) + " " + GgmlTypeName(static_cast<uint32_t>(t)) +
        " values need " + std::to_string(row * static_cast<uint64_t>(rows))));
  }
}

StatsTuple BindQuantize(InFloats src, const std::string& type, int64_t rows, int64_t cols,
                        OutBytes out, const std::string& mode, std::optional<InFloats> importance,
                        int threads, bool force_scalar) {
  const GgmlType t = CodecType(type);
  CheckSize("source", src.size(), rows * cols);
  CheckBytes("output buffer", out.size(), t, rows, cols);
  BlockOptions opts;
  opts.mode = ValueOrThrow(ParseBlockMode(mode));
  if (importance.has_value()) {
    CheckSize("importance", importance->size(), cols);
    opts.importance = importance->data();
  }
  opts.exec = ExecOptions{threads, force_scalar};
  ErrorStats stats;
  Status st;
  {
    nb::gil_scoped_release release;
    st = QuantizeBlocks(t, src.data(), rows, cols, out.data(), opts, &stats);
  }
  ThrowIfError(st);
  return ToTuple(stats);
}

void BindDequantize(InBytes data, const std::string& type, int64_t rows, int64_t cols,
                    OutFloats out, int threads) {
  const GgmlType t = CodecType(type);
  CheckBytes("data", data.size(), t, rows, cols);
  CheckSize("output", out.size(), rows * cols);
  Status st;
  {
    nb::gil_scoped_release release;
    st = DequantizeBlocks(t, data.data(), rows, cols, out.data(), ExecOptions{threads, false});
  }
  ThrowIfError(st);
}

// The flat forms bind_gguf.cc had before this component (kept for callers
// of that API): n values (a multiple of the block size), plain rounding
// unless mode says "search", no importance.
void BindQuantizeFlat(InFloats src, const std::string& type, OutBytes out,
                      const std::string& mode) {
  const GgmlType t = CodecType(type);
  const int64_t bs = ValueOrThrow(GetTypeTraits(static_cast<uint32_t>(t))).block_size;
  const int64_t n = static_cast<int64_t>(src.size());
  if (n % bs != 0) {
    ThrowIfError(
        Status::Invalid(std::to_string(n) + " values are not a multiple of " + std::to_string(bs)));
  }
  BindQuantize(src, type, n / bs, bs, out, mode, std::nullopt, 0, false);
}

void BindDequantizeFlat(InBytes data, const std::string& type, OutFloats out) {
  const GgmlType t = CodecType(type);
  const int64_t bs = ValueOrThrow(GetTypeTraits(static_cast<uint32_t>(t))).block_size;
  const int64_t n = static_cast<int64_t>(out.size());
  if (n % bs != 0) {
    ThrowIfError(
        Status::Invalid(std::to_string(n) + " values are not a multiple of " + std::to_string(bs)));
  }
  BindDequantize(data, type, n / bs, bs, out, 0);
}

nb::list BlockTypes() {
  nb::list out;
  for (uint32_t id = 0; id < 64; ++id) {
    const GgmlType t = static_cast<GgmlType>(id);
    if (!IsCodecType(t)) continue;
    const TypeTraits tr = *GetTypeTraits(id);
    nb::dict d;
    d["name"] = GgmlTypeName(id);
    d["id"] = id;
    d["block_size"] = tr.block_size;
    d["block_bytes"] = tr.block_bytes;
    d["quantized"] = IsBlockType(t);
    out.append(d);
  }
  return out;
}

void Bind(nb::module_& m) {
  m.def("gguf_blocks_quantize", &BindQuantize, nb::arg("src"), nb::arg("type"), nb::arg("rows"),
        nb::arg("cols"), nb::arg("out"), nb::arg("mode") = "search",
        nb::arg("importance") = nb::none(), nb::arg("threads") = 0, nb::arg("force_scalar") = false,
        "Encodes rows x cols float32 values into `out` (rows * row_bytes bytes) as a ggml "
        "type; returns the error sums (sum_x2, sum_xhat2, sum_x_xhat, sum_err2, max_abs_err, "
        "count) of the decoded values.");
  m.def("gguf_blocks_dequantize", &BindDequantize, nb::arg("data"), nb::arg("type"),
        nb::arg("rows"), nb::arg("cols"), nb::arg("out"), nb::arg("threads") = 0,
        "Decodes rows x cols values of a ggml codec type into float32 `out`.");
  m.def("gguf_quantize_blocks", &BindQuantizeFlat, nb::arg("src"), nb::arg("type"), nb::arg("out"),
        nb::arg("mode") = "reference",
        "Flat form (compatibility): n float32 values into `out`, plain rounding by default.");
  m.def("gguf_dequantize_blocks", &BindDequantizeFlat, nb::arg("data"), nb::arg("type"),
        nb::arg("out"), "Flat form (compatibility): decodes out.size values into `out`.");
  m.def("gguf_block_types", &BlockTypes,
        "The codec types: name, ggml id, block size, block bytes, quantized.");
  m.def(
      "gguf_row_bytes",
      [](const std::string& type, int64_t cols) {
        return ValueOrThrow(RowBytes(CodecType(type), cols));
      },
      nb::arg("type"), nb::arg("cols"));
  m.def(
      "gguf_blocks_kernel", [] { return std::string(ActiveBlockKernelName()); },
      "The block kernels QuantizeBlocks uses on this CPU ('avx2' or 'scalar').");
}

const bool kRegistered = RegisterBinding("gguf_blocks", Bind);

}  // namespace
}  // namespace arrowquant::python
