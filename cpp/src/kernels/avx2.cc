// AVX2 + F16C kernels. Not yet written: until they are, dispatch falls back
// to the scalar path.
#include "kernels/row_kernels.h"

namespace arrowquant::kernels {

const RowKernels* Avx2Kernels() { return nullptr; }

}  // namespace arrowquant::kernels
