// Shared pieces of the nanobind module: turning a Status into the matching
// Python exception (arrowquant.errors), and a registry so that every
// component binds itself from its own bind_*.cc file.
#pragma once

#include <nanobind/nanobind.h>

#include <stdexcept>
#include <string>

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

using BindFn = void (*)(nb::module_&);

// Called from a static initializer in each bind_*.cc; NB_MODULE runs them all.
bool RegisterBinding(const char* name, BindFn fn);

}  // namespace arrowquant::python
