#include "arrowquant/param_codes.h"

#include <cstring>

namespace arrowquant {

int64_t ParamCodeBytes(int64_t groups, int code_bits) { return (groups * 2 * code_bits + 7) / 8; }

Status PackParamCodes(const uint8_t* scale_codes, const uint8_t* zero_codes, int64_t groups,
                      int code_bits, uint8_t* out) {
  if (code_bits < 1 || code_bits > 8) return Status::Invalid("param codes: code bits must be 1..8");
  if (groups < 0) return Status::Invalid("param codes: groups must be >= 0");
  const uint32_t mask = (1u << code_bits) - 1u;
  if (code_bits == 8) {
    for (int64_t i = 0; i < groups; ++i) {
      out[2 * i] = scale_codes[i];
      out[2 * i + 1] = zero_codes[i];
    }
    return Status::OK();
  }
  if (code_bits == 4) {
    for (int64_t i = 0; i < groups; ++i) {
      out[i] = static_cast<uint8_t>((scale_codes[i] & 15u) | ((zero_codes[i] & 15u) << 4));
    }
    return Status::OK();
  }
  // General: accumulate codes LSB first, emit whole bytes.
  uint64_t acc = 0;
  int have = 0;
  int64_t o = 0;
  for (int64_t i = 0; i < groups; ++i) {
    acc |= static_cast<uint64_t>(scale_codes[i] & mask) << have;
    have += code_bits;
    acc |= static_cast<uint64_t>(zero_codes[i] & mask) << have;
    have += code_bits;
    while (have >= 8) {
      out[o++] = static_cast<uint8_t>(acc & 0xFFu);
      acc >>= 8;
      have -= 8;
    }
  }
  if (have > 0) out[o++] = static_cast<uint8_t>(acc & 0xFFu);
  return Status::OK();
}

}  // namespace arrowquant
