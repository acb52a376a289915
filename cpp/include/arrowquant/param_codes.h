// The param_codes stream of superblock parameters (FORMAT.md 9.3): for each
// group in row-major order its scale code then its zero code, `code_bits`
// each, as one little-endian bit stream (code k occupies bits k*p .. k*p+p-1,
// bit 0 = least significant bit of byte 0); unused high bits of the last
// byte are zero. The same bytes as arrowquant.engine.superblock.pack_param_codes.
#pragma once

#include <cstdint>

#include "arrowquant/status.h"

namespace arrowquant {

// Bytes of the stream of `groups` groups.
int64_t ParamCodeBytes(int64_t groups, int code_bits);

// Packs groups (scale_codes[i], zero_codes[i]) into out (ParamCodeBytes
// bytes); only the low code_bits bits of each code are stored.
Status PackParamCodes(const uint8_t* scale_codes, const uint8_t* zero_codes, int64_t groups,
                      int code_bits, uint8_t* out);

}  // namespace arrowquant
