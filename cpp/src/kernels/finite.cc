// The engine's one finiteness check: every path that meets a NaN or Inf
// (quantize, importance search, GGUF writer) reports it with this message.
#include <cmath>
#include <cstring>
#include <string>

#include "kernels/row_kernels.h"

namespace arrowquant::kernels {

Status NonFiniteAt(float value, int64_t index, int64_t cols) {
  const int64_t row = cols > 0 ? index / cols : 0;
  const int64_t col = cols > 0 ? index % cols : index;
  return Status::Invalid(std::string(std::isnan(value) ? "NaN" : "Inf") + " at index " +
                         std::to_string(index) + " (row " + std::to_string(row) + ", column " +
                         std::to_string(col) + ")");
}

Status CheckFiniteRow(const float* x, int64_t cols, int64_t row) {
  // Branch-free test per block (the compiler vectorizes it); the exact
  // index is searched only in a block that holds a NaN or Inf.
  constexpr int64_t kBlock = 256;
  for (int64_t b = 0; b < cols; b += kBlock) {
    const int64_t e = std::min(cols, b + kBlock);
    uint32_t bad = 0;
    for (int64_t c = b; c < e; ++c) {
      uint32_t u;
      std::memcpy(&u, &x[c], sizeof u);
      bad |= static_cast<uint32_t>((u & 0x7F800000u) == 0x7F800000u);
    }
    if (bad == 0) continue;
    for (int64_t c = b; c < e; ++c) {
      if (!std::isfinite(x[c])) return NonFiniteAt(x[c], row * cols + c, cols);
    }
  }
  return Status::OK();
}

}  // namespace arrowquant::kernels
