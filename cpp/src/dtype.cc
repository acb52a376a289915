#include "arrowquant/dtype.h"

#include <array>
#include <cmath>
#include <cstring>
#include <limits>

namespace arrowquant {

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kF64:
    case DType::kI64:
      return 8;
    case DType::kF32:
    case DType::kI32:
      return 4;
    case DType::kF16:
    case DType::kBF16:
    case DType::kI16:
      return 2;
    case DType::kF8E4M3:
    case DType::kF8E5M2:
    case DType::kI8:
    case DType::kU8:
    case DType::kBool:
      return 1;
  }
  return 0;
}

std::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "float32";
    case DType::kF16:
      return "float16";
    case DType::kBF16:
      return "bfloat16";
    case DType::kF8E4M3:
      return "float8_e4m3fn";
    case DType::kF8E5M2:
      return "float8_e5m2";
    case DType::kF64:
      return "float64";
    case DType::kI64:
      return "int64";
    case DType::kI32:
      return "int32";
    case DType::kI16:
      return "int16";
    case DType::kI8:
      return "int8";
    case DType::kU8:
      return "uint8";
    case DType::kBool:
      return "bool";
  }
  return "unknown";
}

Result<DType> ParseDType(std::string_view name) {
  struct Alias {
    std::string_view name;
    DType dtype;
  };
  static constexpr Alias kAliases[] = {
      {"float32", DType::kF32},
      {"F32", DType::kF32},
      {"f32", DType::kF32},
      {"float", DType::kF32},
      {"float16", DType::kF16},
      {"F16", DType::kF16},
      {"f16", DType::kF16},
      {"half", DType::kF16},
      {"bfloat16", DType::kBF16},
      {"BF16", DType::kBF16},
      {"bf16", DType::kBF16},
      {"float8_e4m3fn", DType::kF8E4M3},
      {"float8_e4m3", DType::kF8E4M3},
      {"F8_E4M3", DType::kF8E4M3},
      {"float8_e5m2", DType::kF8E5M2},
      {"F8_E5M2", DType::kF8E5M2},
      {"float64", DType::kF64},
      {"F64", DType::kF64},
      {"double", DType::kF64},
      {"int64", DType::kI64},
      {"I64", DType::kI64},
      {"int32", DType::kI32},
      {"I32", DType::kI32},
      {"int16", DType::kI16},
      {"I16", DType::kI16},
      {"int8", DType::kI8},
      {"I8", DType::kI8},
      {"uint8", DType::kU8},
      {"U8", DType::kU8},
      {"bool", DType::kBool},
      {"BOOL", DType::kBool},
  };
  for (const Alias& a : kAliases) {
    if (a.name == name) return a.dtype;
  }
  return Status::Invalid("unknown dtype '" + std::string(name) +
                         "' (expected float32, float16, bfloat16, float8_e4m3fn, float8_e5m2, "
                         "float64, int64, int32, int16, int8, uint8 or bool)");
}

bool IsQuantizableFloat(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kF16 || dtype == DType::kBF16 ||
         dtype == DType::kF8E4M3 || dtype == DType::kF8E5M2;
}

namespace {
float BitsToFloat(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
uint32_t FloatToBits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}
}  // namespace

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  if (exp == 0x1F) return BitsToFloat(sign | 0x7F800000u | (mant << 13));  // inf / nan
  if (exp != 0) return BitsToFloat(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return BitsToFloat(sign);  // signed zero
  // Subnormal half: value = mant * 2^-24, exactly representable in float32.
  const float magnitude = static_cast<float>(mant) * 5.9604644775390625e-08f;
  return sign ? -magnitude : magnitude;
}

float BFloat16ToFloat(uint16_t b) { return BitsToFloat(static_cast<uint32_t>(b) << 16); }

float F8E5M2ToFloat(uint8_t v) { return HalfToFloat(static_cast<uint16_t>(v) << 8); }

float F8E4M3ToFloat(uint8_t v) {
  const bool negative = (v & 0x80u) != 0;
  const uint32_t exp = (v >> 3) & 0xFu;
  const uint32_t mant = v & 0x7u;
  float magnitude;
  if (exp == 0xF && mant == 0x7) {
    magnitude = std::numeric_limits<float>::quiet_NaN();
  } else if (exp == 0) {
    magnitude = static_cast<float>(mant) * 0.001953125f;  // mant * 2^-9
  } else {
    magnitude = std::ldexp(1.0f + static_cast<float>(mant) * 0.125f, static_cast<int>(exp) - 7);
  }
  return negative ? -magnitude : magnitude;
}

uint16_t FloatToHalf(float f) {
  const uint32_t x = FloatToBits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t abs = x & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) {  // inf or nan
    return static_cast<uint16_t>(sign | 0x7C00u | (abs > 0x7F800000u ? 0x200u : 0u));
  }
  if (abs >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to inf
  if (abs < 0x38800000u) {
    // Result is a half subnormal (or zero): value / 2^-24, rounded to even.
    const float scaled = BitsToFloat(abs) * 16777216.0f;  // exact: power of two
    const float r = std::nearbyint(scaled);
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(r));
  }
  // Normal: drop 13 mantissa bits with round to nearest even.
  const uint32_t rebased = abs - (112u << 23);
  const uint32_t lsb = (rebased >> 13) & 1u;
  const uint32_t rounded = rebased + 0xFFFu + lsb;
  return static_cast<uint16_t>(sign | (rounded >> 13));
}

void ConvertToFloat32(DType dtype, const void* src, float* dst, size_t n) {
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, n * sizeof(float));
      return;
    case DType::kF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = HalfToFloat(s[i]);
      return;
    }
    case DType::kBF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = BFloat16ToFloat(s[i]);
      return;
    }
    case DType::kF8E4M3: {
      static const std::array<float, 256> table = [] {
        std::array<float, 256> t{};
        for (int i = 0; i < 256; ++i) t[i] = F8E4M3ToFloat(static_cast<uint8_t>(i));
        return t;
      }();
      const auto* s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = table[s[i]];
      return;
    }
    case DType::kF8E5M2: {
      const auto* s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = F8E5M2ToFloat(s[i]);
      return;
    }
    default:
      assert(false && "ConvertToFloat32 on a non-float dtype");
  }
}

}  // namespace arrowquant
