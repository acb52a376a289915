// Shared pieces of the nanobind module: turning a Status into the matching
// Python exception (arrowquant.errors), and a registry so that every
// component binds itself from its own bind_*.cc file.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <stdexcept>
#include <string>
#include <tuple>

#include "arrowquant/quantize.h"
#include "arrowquant/status.h"

namespace arrowquant::python {

namespace nb = nanobind;

// Carries a non-OK Status out of a binding; translated to a Python exception.
class StatusError : public std::runtime_error {
 public:
  explicit StatusError(Status status)
      : std::runtime_error(status.message()), status_(std::move(status)) {}
  const Status& status() const { return status_; }

 private:
  Status status_;
};

inline void ThrowIfError(const Status& st) {
  if (!st.ok()) throw StatusError(st);
}

template <typename T>
T ValueOrThrow(Result<T> result) {
  if (!result.ok()) throw StatusError(result.status());
  return std::move(result).value();
}

// Buffer types of the bindings: read-only inputs of any element type (the
// dtype name says what the bytes are), caller-allocated outputs.
using ReadOnlyBytes = nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu>;
using InBytes = nb::ndarray<const uint8_t, nb::c_contig, nb::device::cpu>;
using InFloats = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using OutBytes = nb::ndarray<uint8_t, nb::c_contig, nb::device::cpu>;
using OutFloats = nb::ndarray<float, nb::c_contig, nb::device::cpu>;
// ErrorStats as Python sees it: (sum_x2, sum_xhat2, sum_x_xhat, sum_err2, max_abs_err, count).
using StatsTuple = std::tuple<double, double, double, double, double, int64_t>;

// A validated QuantSpec from the Python-side names.
QuantSpec MakeSpec(int bits, int64_t group_size, const std::string& scheme,
                   const std::string& method, const std::string& param_dtype);
// A view of rows x cols elements of `dtype` over `src`, whose size must match.
TensorView MakeView(const ReadOnlyBytes& src, const std::string& dtype, int64_t rows, int64_t cols);
// ShapeMismatch unless a buffer holds exactly `need` elements.
void CheckSize(const char* what, size_t have, int64_t need);
// The three output buffers of rows x cols quantized at `bits`, group size g:
// packed codes, and one scale and zero point per group.
void CheckQuantBuffers(int64_t rows, int64_t cols, int bits, int64_t group_size, size_t packed_size,
                       size_t scales_size, size_t zero_points_size);
StatsTuple ToTuple(const ErrorStats& s);

using BindFn = void (*)(nb::module_&);

// Called from a static initializer in each bind_*.cc; NB_MODULE runs them all.
bool RegisterBinding(const char* name, BindFn fn);

}  // namespace arrowquant::python
