// Binding of the param_codes packer: the codes of a chunk into the caller's
// buffer (the pipeline's output arena), the GIL released.
#include <nanobind/ndarray.h>

#include "arrowquant/param_codes.h"
#include "python/binding.h"

namespace arrowquant::python {
namespace {

void BindPackParamCodes(InBytes scale_codes, InBytes zero_codes, int code_bits, OutBytes out) {
  const int64_t groups = static_cast<int64_t>(scale_codes.size());
  CheckSize("zero_codes", zero_codes.size(), groups);
  if (code_bits < 1 || code_bits > 8) {
    ThrowIfError(Status::Invalid("param codes: code bits must be 1..8"));
  }
  CheckSize("out", out.size(), ParamCodeBytes(groups, code_bits));
  Status st;
  {
    nb::gil_scoped_release release;
    st = PackParamCodes(scale_codes.data(), zero_codes.data(), groups, code_bits, out.data());
  }
  ThrowIfError(st);
}

void Bind(nb::module_& m) {
  m.def("pack_param_codes", &BindPackParamCodes, nb::arg("scale_codes"), nb::arg("zero_codes"),
        nb::arg("code_bits"), nb::arg("out"),
        "The param_codes stream (FORMAT.md 9.3) of these codes into out.");
}

const bool kRegistered = RegisterBinding("param_codes", Bind);

}  // namespace
}  // namespace arrowquant::python
