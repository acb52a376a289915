// Binding of the Markov (group smoothness) pass: float32 parameters in, the
// sums and counts out; the GIL is released while it runs.
#include <nanobind/ndarray.h>
#include <nanobind/stl/tuple.h>

#include <tuple>

#include "arrowquant/markov.h"
#include "python/binding.h"

namespace arrowquant::python {
namespace {

using MarkovTuple = std::tuple<int64_t, double, double, double, double, int64_t, int64_t, int64_t>;

MarkovTuple BindMarkovJumps(InFloats scales, InFloats zero_points, int64_t rows,
                            int64_t groups_per_row, double zero_range, double threshold,
                            double zero_point_threshold) {
  CheckSize("scales", scales.size(), rows * groups_per_row);
  CheckSize("zero_points", zero_points.size(), rows * groups_per_row);
  Result<MarkovSums> r = Status::Invalid("not run");
  {
    nb::gil_scoped_release release;
    r = MarkovJumps(scales.data(), zero_points.data(), rows, groups_per_row, zero_range, threshold,
                    zero_point_threshold);
  }
  const MarkovSums m = ValueOrThrow(std::move(r));
  return {m.pairs,
          m.sum_scale_jump,
          m.max_scale_jump,
          m.sum_zero_point_jump,
          m.max_zero_point_jump,
          m.scale_violations,
          m.zero_point_violations,
          m.violations};
}

void Bind(nb::module_& m) {
  m.def("markov_jumps", &BindMarkovJumps, nb::arg("scales"), nb::arg("zero_points"),
        nb::arg("rows"), nb::arg("groups_per_row"), nb::arg("zero_range"), nb::arg("threshold"),
        nb::arg("zero_point_threshold"),
        "Jumps between adjacent groups: (pairs, sum and max scale jump, sum and max zero-point "
        "jump, scale / zero-point / either violations), as get_markov_metrics sums them.");
}

const bool kRegistered = RegisterBinding("markov", Bind);

}  // namespace
}  // namespace arrowquant::python
