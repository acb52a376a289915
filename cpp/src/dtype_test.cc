#include "arrowquant/dtype.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

namespace arrowquant {
namespace {

TEST(DType, ParseAndName) {
  EXPECT_EQ(*ParseDType("F16"), DType::kF16);
  EXPECT_EQ(*ParseDType("bfloat16"), DType::kBF16);
  EXPECT_EQ(*ParseDType("F8_E4M3"), DType::kF8E4M3);
  EXPECT_EQ(DTypeName(DType::kF8E5M2), "float8_e5m2");
  EXPECT_EQ(DTypeSize(DType::kI64), 8u);
  auto bad = ParseDType("F12");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalid);
  EXPECT_NE(bad.status().message().find("F12"), std::string::npos);
}

TEST(DType, HalfKnownValues) {
  EXPECT_EQ(HalfToFloat(0x3C00), 1.0f);
  EXPECT_EQ(HalfToFloat(0xC000), -2.0f);
  EXPECT_EQ(HalfToFloat(0x7BFF), 65504.0f);
  EXPECT_EQ(HalfToFloat(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_TRUE(std::signbit(HalfToFloat(0x8000)));
  EXPECT_TRUE(std::isinf(HalfToFloat(0x7C00)));
  EXPECT_TRUE(std::isnan(HalfToFloat(0x7E00)));
}

TEST(DType, HalfRoundTripAllValues) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = HalfToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    EXPECT_EQ(FloatToHalf(f), h) << "half " << h;
  }
}

TEST(DType, FloatToHalfRoundsToEven) {
  // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties to even -> 1.
  EXPECT_EQ(FloatToHalf(1.0f + std::ldexp(1.0f, -11)), 0x3C00);
  // 1 + 3 * 2^-11 is halfway between 1+2^-10 (odd) and 1+2^-9: -> 1+2^-9.
  EXPECT_EQ(FloatToHalf(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);
  EXPECT_EQ(FloatToHalf(1e6f), 0x7C00);
}

TEST(DType, BFloat16AndFloat8) {
  EXPECT_EQ(BFloat16ToFloat(0x3F80), 1.0f);
  EXPECT_EQ(BFloat16ToFloat(0xC040), -3.0f);
  EXPECT_EQ(F8E4M3ToFloat(0x38), 1.0f);          // exp 7, mant 0
  EXPECT_EQ(F8E4M3ToFloat(0x7E), 448.0f);        // largest finite
  EXPECT_EQ(F8E4M3ToFloat(0x01), 0.001953125f);  // 2^-9 subnormal
  EXPECT_TRUE(std::isnan(F8E4M3ToFloat(0x7F)));
  EXPECT_EQ(F8E5M2ToFloat(0x3C), 1.0f);
  EXPECT_EQ(F8E5M2ToFloat(0x7B), 57344.0f);
  EXPECT_TRUE(std::isinf(F8E5M2ToFloat(0x7C)));
}

}  // namespace
}  // namespace arrowquant
