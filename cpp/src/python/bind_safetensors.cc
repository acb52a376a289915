// Bindings of the SafeTensors reader: a file object reading tensor bytes into
// caller-owned uint8 arrays (GIL released during the read), and the header
// parser on its own for the Python-side fuzz tests.
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "arrowquant/safetensors.h"
#include "python/binding.h"

namespace arrowquant::python {
namespace {

// (name, canonical dtype name, shape, offset, nbytes)
using TensorTuple = std::tuple<std::string, std::string, std::vector<int64_t>, uint64_t, uint64_t>;

std::vector<TensorTuple> TensorList(const SafeTensorsHeader& header, uint64_t base) {
  std::vector<TensorTuple> out;
  out.reserve(header.tensors.size());
  for (const SafeTensorInfo& t : header.tensors) {
    out.emplace_back(t.name, std::string(DTypeName(t.dtype)), t.shape, base + t.begin, t.nbytes());
  }
  return out;
}

nb::dict MetadataDict(const SafeTensorsHeader& header) {
  nb::dict d;
  for (const auto& [k, v] : header.metadata)
    d[nb::str(k.data(), k.size())] = nb::str(v.data(), v.size());
  return d;
}

class PySafeTensorsFile {
 public:
  PySafeTensorsFile(const std::string& path, bool drop_cache) {
    Result<std::unique_ptr<SafeTensorsFile>> r(Status::Internal("unset"));
    {
      nb::gil_scoped_release release;
      r = SafeTensorsFile::Open(path, SafeTensorsOpenOptions{drop_cache});
    }
    file_ = ValueOrThrow(std::move(r));
  }

  const std::string& path() const { return file_->path(); }
  uint64_t file_size() const { return file_->file_size(); }
  uint64_t data_start() const { return file_->data_start(); }
  bool closed() const { return !file_->is_open(); }

  // Offsets are absolute positions in the file.
  std::vector<TensorTuple> tensors() const {
    return TensorList(file_->header(), file_->data_start());
  }
  nb::dict metadata() const { return MetadataDict(file_->header()); }

  size_t ResolveIndex(const nb::handle& key) const {
    if (nb::isinstance<nb::str>(key))
      return ValueOrThrow(file_->FindTensor(nb::cast<std::string>(key)));
    if (nb::isinstance<nb::int_>(key) && !nb::isinstance<nb::bool_>(key)) {
      const int64_t i = nb::cast<int64_t>(key);
      if (i < 0 || static_cast<uint64_t>(i) >= file_->tensors().size()) {
        ThrowIfError(Status::Invalid(file_->path() + ": tensor index " + std::to_string(i) +
                                     " out of range (" + std::to_string(file_->tensors().size()) +
                                     " tensors)"));
      }
      return static_cast<size_t>(i);
    }
    ThrowIfError(Status::Invalid("tensor must be named by a str or an int index"));
    return 0;
  }

  // Fills all of `out` from the tensor's bytes starting at byte_offset.
  void ReadInto(const nb::handle& key, int64_t byte_offset, OutBytes out) {
    const size_t index = ResolveIndex(key);
    if (byte_offset < 0) ThrowIfError(Status::Invalid("byte_offset must be >= 0"));
    Status st;
    {
      nb::gil_scoped_release release;
      st = file_->ReadRange(index, static_cast<uint64_t>(byte_offset), out.size(), out.data());
    }
    ThrowIfError(st);
  }

  void Close() { ThrowIfError(file_->Close()); }

 private:
  std::unique_ptr<SafeTensorsFile> file_;
};

std::tuple<std::vector<TensorTuple>, nb::dict> ParseHeader(nb::bytes header, uint64_t data_size,
                                                           const std::string& label) {
  std::string_view json(header.c_str(), header.size());
  Result<SafeTensorsHeader> r(Status::Internal("unset"));
  {
    nb::gil_scoped_release release;
    r = ParseSafeTensorsHeader(json, data_size, label);
  }
  const SafeTensorsHeader h = ValueOrThrow(std::move(r));
  return {TensorList(h, 0), MetadataDict(h)};
}

// Whole file in memory; offsets are absolute like SafeTensorsFile.tensors().
std::tuple<std::vector<TensorTuple>, nb::dict> ParseBuffer(nb::bytes data,
                                                           const std::string& label) {
  std::string_view bytes(data.c_str(), data.size());
  Result<SafeTensorsHeader> r(Status::Internal("unset"));
  {
    nb::gil_scoped_release release;
    r = ParseSafeTensorsBuffer(bytes, label);
  }
  const SafeTensorsHeader h = ValueOrThrow(std::move(r));
  return {TensorList(h, h.data_start), MetadataDict(h)};
}

void Bind(nb::module_& m) {
  nb::class_<PySafeTensorsFile>(m, "SafeTensorsFile")
      .def(nb::init<const std::string&, bool>(), nb::arg("path"), nb::arg("drop_cache") = false,
           "Opens a .safetensors file and validates its header (no data is read).")
      .def_prop_ro("path", &PySafeTensorsFile::path)
      .def_prop_ro("file_size", &PySafeTensorsFile::file_size)
      .def_prop_ro("data_start", &PySafeTensorsFile::data_start)
      .def_prop_ro("closed", &PySafeTensorsFile::closed)
      .def("tensors", &PySafeTensorsFile::tensors,
           "[(name, dtype, shape, absolute offset, nbytes)] in offset order")
      .def("metadata", &PySafeTensorsFile::metadata, "__metadata__ as a dict of str")
      .def("read_into", &PySafeTensorsFile::ReadInto, nb::arg("tensor"), nb::arg("byte_offset"),
           nb::arg("out"),
           "Fills the writable uint8 array `out` with the tensor's bytes from byte_offset on.")
      .def("close", &PySafeTensorsFile::Close);
  m.def("parse_safetensors_header", &ParseHeader, nb::arg("header"), nb::arg("data_size"),
        nb::arg("label"),
        "Validates a SafeTensors JSON header against a data section of data_size bytes; "
        "returns (tensors with offsets relative to the data section, metadata).");
  m.def("parse_safetensors_buffer", &ParseBuffer, nb::arg("data"), nb::arg("label"),
        "Validates a whole SafeTensors file held in memory; returns (tensors, metadata).");
}

const bool kRegistered = RegisterBinding("safetensors", Bind);

}  // namespace
}  // namespace arrowquant::python
