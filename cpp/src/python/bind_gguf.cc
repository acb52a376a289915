// Bindings of the GGUF writer, block quantizers and header reader. The GIL is
// released while the engine converts, quantizes, writes or parses.
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "arrowquant/gguf.h"
#include "python/binding.h"

namespace arrowquant::python {
namespace {

using namespace arrowquant::gguf;

using ReadOnlyArray = ReadOnlyBytes;

// (key, type name, value) as Python gives them.
using PyKeyValue = std::tuple<std::string, std::string, nb::object>;
using PyTensorSpec = std::tuple<std::string, std::vector<int64_t>, std::string>;

ValueType ParseValueType(const std::string& name) {
  static const std::pair<const char*, ValueType> kNames[] = {
      {"uint8", ValueType::kUint8},     {"int8", ValueType::kInt8},
      {"uint16", ValueType::kUint16},   {"int16", ValueType::kInt16},
      {"uint32", ValueType::kUint32},   {"int32", ValueType::kInt32},
      {"float32", ValueType::kFloat32}, {"bool", ValueType::kBool},
      {"string", ValueType::kString},   {"uint64", ValueType::kUint64},
      {"int64", ValueType::kInt64},     {"float64", ValueType::kFloat64},
  };
  for (const auto& [n, t] : kNames) {
    if (name == n) return t;
  }
  ThrowIfError(Status::Invalid("unknown GGUF value type '" + name + "'"));
  return ValueType::kUint8;
}

Value ScalarFromPython(ValueType t, nb::handle obj) {
  Value v;
  v.type = t;
  switch (t) {
    case ValueType::kString:
      v.s = nb::cast<std::string>(obj);
      break;
    case ValueType::kBool:
      v.u = nb::cast<bool>(obj) ? 1 : 0;
      break;
    case ValueType::kFloat32:
    case ValueType::kFloat64:
      v.f = nb::cast<double>(obj);
      break;
    case ValueType::kInt8:
    case ValueType::kInt16:
    case ValueType::kInt32:
    case ValueType::kInt64:
      v.i = nb::cast<int64_t>(obj);
      break;
    default:
      v.u = nb::cast<uint64_t>(obj);
      break;
  }
  return v;
}

Value ValueFromPython(const std::string& type_name, nb::handle obj) {
  // "array[<elem>]" for arrays, a scalar type name otherwise.
  if (type_name.rfind("array[", 0) == 0 && type_name.back() == ']') {
    const ValueType elem = ParseValueType(type_name.substr(6, type_name.size() - 7));
    std::vector<Value> items;
    for (nb::handle item : obj) items.push_back(ScalarFromPython(elem, item));
    return Value::Array(elem, std::move(items));
  }
  return ScalarFromPython(ParseValueType(type_name), obj);
}

nb::object ValueToPython(const Value& v) {
  switch (v.type) {
    case ValueType::kString:
      return nb::str(v.s.c_str(), v.s.size());
    case ValueType::kBool:
      return nb::bool_(v.u != 0);
    case ValueType::kFloat32:
    case ValueType::kFloat64:
      return nb::float_(v.f);
    case ValueType::kInt8:
    case ValueType::kInt16:
    case ValueType::kInt32:
    case ValueType::kInt64:
      return nb::int_(v.i);
    case ValueType::kArray: {
      nb::list out;
      for (const Value& item : v.items) out.append(ValueToPython(item));
      return out;
    }
    default:
      return nb::int_(v.u);
  }
}

std::string TypeNameOf(const Value& v) {
  if (v.type == ValueType::kArray) return std::string("array[") + ValueTypeName(v.elem_type) + "]";
  return ValueTypeName(v.type);
}

nb::dict LayoutToDict(const TensorLayout& l) {
  nb::dict d;
  d["name"] = l.name;
  d["dims"] = l.dims;
  d["type"] = GgmlTypeName(static_cast<uint32_t>(l.type));
  d["offset"] = l.offset;
  d["nbytes"] = l.nbytes;
  return d;
}

class PyWriter {
 public:
  PyWriter(const std::string& path, const std::vector<PyKeyValue>& metadata,
           const std::vector<PyTensorSpec>& tensors, uint32_t alignment) {
    std::vector<KeyValue> md;
    for (const auto& [key, type, value] : metadata) {
      md.emplace_back(key, ValueFromPython(type, value));
    }
    std::vector<TensorSpec> specs;
    for (const auto& [name, shape, type] : tensors) {
      specs.push_back(TensorSpec{name, shape, ValueOrThrow(ParseWritableType(type))});
    }
    Result<std::unique_ptr<Writer>> w = Status::Internal("unset");
    {
      nb::gil_scoped_release release;
      w = Writer::Create(path, std::move(md), specs, alignment);
    }
    writer_ = ValueOrThrow(std::move(w));
  }

  // Returns the error sums of this chunk (sum_x2, sum_xhat2, sum_x_xhat,
  // sum_err2, max_abs_err, count), as the quantize binding does.
  std::tuple<double, double, double, double, double, int64_t> AppendRows(const ReadOnlyArray& src,
                                                                         const std::string& dtype,
                                                                         int64_t rows, int64_t cols,
                                                                         int threads) {
    const DType dt = ValueOrThrow(ParseDType(dtype));
    const size_t nbytes = src.size() * src.dtype().bits / 8;
    if (rows < 0 || cols < 0 || nbytes != static_cast<size_t>(rows * cols) * DTypeSize(dt)) {
      writer_->Abort();
      ThrowIfError(Status::ShapeMismatch(
          "buffer holds " + std::to_string(nbytes) + " bytes, " + std::to_string(rows) + " x " +
          std::to_string(cols) + " " + std::string(DTypeName(dt)) + " needs " +
          std::to_string(static_cast<size_t>(rows * cols) * DTypeSize(dt))));
    }
    Status st;
    ErrorStats s;
    {
      nb::gil_scoped_release release;
      st = writer_->AppendRows(TensorView{src.data(), dt, rows, cols}, ExecOptions{threads, false},
                               &s);
    }
    ThrowIfError(st);
    return {s.sum_x2, s.sum_xhat2, s.sum_x_xhat, s.sum_err2, s.max_abs_err, s.count};
  }

  // Mode ("search" / "reference") and optional per-column importance of the
  // tensor whose rows come next (before its first append_rows).
  void SetTensorOptions(const std::string& mode, std::optional<InFloats> importance) {
    const BlockMode m = ValueOrThrow(ParseBlockMode(mode));
    std::vector<float> w;
    if (importance.has_value())
      w.assign(importance->data(), importance->data() + importance->size());
    ThrowIfError(writer_->SetTensorOptions(m, std::move(w)));
  }

  void Finish() {
    Status st;
    {
      nb::gil_scoped_release release;
      st = writer_->Finish();
    }
    ThrowIfError(st);
  }

  void Abort() { writer_->Abort(); }

  nb::list Layout() const {
    nb::list out;
    for (const TensorLayout& l : writer_->layout()) out.append(LayoutToDict(l));
    return out;
  }

  Writer& writer() { return *writer_; }

 private:
  std::unique_ptr<Writer> writer_;
};

nb::dict FileToDict(const File& f) {
  nb::dict d;
  d["version"] = f.version;
  d["alignment"] = f.alignment;
  d["data_offset"] = f.data_offset;
  d["file_size"] = f.file_size;
  nb::list md;
  for (const KeyValue& kv : f.metadata) {
    md.append(nb::make_tuple(kv.first, TypeNameOf(kv.second), ValueToPython(kv.second)));
  }
  d["metadata"] = md;
  nb::list tensors;
  for (const TensorInfo& t : f.tensors) {
    nb::dict td;
    td["name"] = t.name;
    td["dims"] = t.dims;
    td["type"] = GgmlTypeName(t.type);
    td["type_id"] = t.type;
    td["offset"] = t.offset;
    td["nbytes"] = t.nbytes;
    td["numel"] = t.numel;
    tensors.append(td);
  }
  d["tensors"] = tensors;
  return d;
}

nb::dict BindReadFile(const std::string& path) {
  Result<File> f = Status::Internal("unset");
  {
    nb::gil_scoped_release release;
    f = ReadFile(path);
  }
  return FileToDict(ValueOrThrow(std::move(f)));
}

nb::dict BindParse(nb::bytes data) {
  Result<File> f = Status::Internal("unset");
  const uint8_t* p = reinterpret_cast<const uint8_t*>(data.c_str());
  const size_t n = data.size();
  {
    nb::gil_scoped_release release;
    f = Parse(p, n);
  }
  return FileToDict(ValueOrThrow(std::move(f)));
}

void Bind(nb::module_& m) {
  nb::class_<PyWriter>(m, "GgufWriter",
                       "Streaming GGUF v3 writer: header first, then tensor rows in order.")
      .def(nb::init<const std::string&, const std::vector<PyKeyValue>&,
                    const std::vector<PyTensorSpec>&, uint32_t>(),
           nb::arg("path"), nb::arg("metadata"), nb::arg("tensors"),
           nb::arg("alignment") = kDefaultAlignment)
      .def("append_rows", &PyWriter::AppendRows, nb::arg("src"), nb::arg("dtype"), nb::arg("rows"),
           nb::arg("cols"), nb::arg("threads") = 0)
      .def("set_tensor_options", &PyWriter::SetTensorOptions, nb::arg("mode") = "search",
           nb::arg("importance") = nb::none())
      .def("finish", &PyWriter::Finish)
      .def("abort", &PyWriter::Abort)
      .def_prop_ro("layout", &PyWriter::Layout)
      .def_prop_ro("data_offset", [](PyWriter& w) { return w.writer().data_offset(); })
      .def_prop_ro("temp_path", [](PyWriter& w) { return w.writer().temp_path(); })
      .def_prop_ro("path", [](PyWriter& w) { return w.writer().path(); })
      .def_prop_ro("current_tensor", [](PyWriter& w) { return w.writer().current_tensor(); });
  m.def("gguf_read_file", &BindReadFile, nb::arg("path"),
        "Validated header of a GGUF file: version, alignment, metadata, tensor infos.");
  m.def("gguf_parse", &BindParse, nb::arg("data"), "Validated header of GGUF bytes in memory.");
  m.def(
      "gguf_file_type",
      [](const std::string& type) { return FileTypeFor(ValueOrThrow(ParseWritableType(type))); },
      nb::arg("type"));
  m.def(
      "gguf_parse_file_type",
      [](const std::string& name) { return ValueOrThrow(ParseFileType(name)); }, nb::arg("name"),
      "llama_ftype value of a llama.cpp file type name ('Q4_K_M' -> 15).");
}

const bool kRegistered = RegisterBinding("gguf", Bind);

}  // namespace
}  // namespace arrowquant::python
