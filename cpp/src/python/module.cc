// The extension module arrowquant._core. Components add their functions via
// RegisterBinding (see binding.h) so this file never grows per component.
#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "python/binding.h"

namespace arrowquant::python {

namespace {
std::vector<std::pair<std::string, BindFn>>& Registry() {
  static std::vector<std::pair<std::string, BindFn>> registry;
  return registry;
}

const char* ExceptionClassName(StatusCode code) {
  switch (code) {
    case StatusCode::kInvalid:
      return "ValidationError";
    case StatusCode::kFormatError:
      return "FormatError";
    case StatusCode::kConfigError:
      return "ConfigurationError";
    case StatusCode::kIOError:
      return "ArrowQuantIOError";
    case StatusCode::kNotFound:
      return "ModelNotFoundError";
    case StatusCode::kOutOfMemory:
      return "MemoryBudgetError";
    case StatusCode::kShapeMismatch:
      return "ShapeMismatchError";
    case StatusCode::kCancelled:
      return "CancelledError";
    default:
      return "ArrowQuantError";
  }
}

void TranslateStatusError(const std::exception_ptr& p, void*) {
  try {
    std::rethrow_exception(p);
  } catch (const StatusError& e) {
    nb::object errors = nb::module_::import_("arrowquant.errors");
    nb::object cls = errors.attr(ExceptionClassName(e.status().code()));
    PyErr_SetString(cls.ptr(), e.status().message().c_str());
  }
}
}  // namespace

bool RegisterBinding(const char* name, BindFn fn) {
  Registry().emplace_back(name, fn);
  return true;
}

}  // namespace arrowquant::python

NB_MODULE(_core, m) {
  using namespace arrowquant::python;
  m.doc() = "ArrowQuant C++ engine (use the arrowquant package, not this module)";
  nb::register_exception_translator(TranslateStatusError);
  // Bind in a fixed order, whatever the static initialization order was.
  auto entries = Registry();
  std::sort(entries.begin(), entries.end());
  for (auto& [name, fn] : entries) fn(m);
}
