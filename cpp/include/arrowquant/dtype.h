// Element types of tensors the engine reads, and their exact conversion to
// float32 (the only arithmetic type of the quantizer).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "arrowquant/status.h"

namespace arrowquant {

enum class DType : uint8_t {
  kF32,
  kF16,
  kBF16,
  kF8E4M3,  // float8_e4m3fn: no infinities, NaN = S.1111.111
  kF8E5M2,  // the high byte of an IEEE half
  kF64,
  kI64,
  kI32,
  kI16,
  kI8,
  kU8,
  kBool,
};

// Size of one element in bytes.
size_t DTypeSize(DType dtype);

// Canonical lower-case name ("float16", "bfloat16", "float8_e4m3fn", ...).
std::string_view DTypeName(DType dtype);

// Accepts canonical names, numpy-style aliases ("f16", "half") and the
// SafeTensors spellings ("F16", "BF16", "F8_E4M3", ...).
Result<DType> ParseDType(std::string_view name);

// True for the types the quantizer takes (converted exactly to float32).
bool IsQuantizableFloat(DType dtype);

// Exact scalar conversions.
float HalfToFloat(uint16_t h);
float BFloat16ToFloat(uint16_t b);
float F8E4M3ToFloat(uint8_t v);
float F8E5M2ToFloat(uint8_t v);
uint16_t FloatToHalf(float f);  // round to nearest even (for writers and tests)

// Converts n elements of `src` (of type dtype, which must be quantizable) to
// float32. Scalar reference; the kernels have their own vector paths.
void ConvertToFloat32(DType dtype, const void* src, float* dst, size_t n);

}  // namespace arrowquant
