#include "arrowquant/param_codes.h"

#include <gtest/gtest.h>

#include <vector>

namespace arrowquant {
namespace {

// Reference: bit k of the stream is bit (k % p) of code k / p.
std::vector<uint8_t> BitByBit(const std::vector<uint8_t>& a, const std::vector<uint8_t>& c, int p) {
  std::vector<uint8_t> out(static_cast<size_t>(ParamCodeBytes(a.size(), p)), 0);
  for (size_t k = 0; k < 2 * a.size() * p; ++k) {
    const size_t code = k / p;
    const uint8_t v = code % 2 ? c[code / 2] : a[code / 2];
    if ((v >> (k % p)) & 1) out[k / 8] |= static_cast<uint8_t>(1u << (k % 8));
  }
  return out;
}

TEST(PackParamCodes, EveryWidthMatchesTheBitStream) {
  for (int p = 1; p <= 8; ++p) {
    for (size_t n : {0, 1, 2, 3, 7, 64, 129}) {
      std::vector<uint8_t> a(n), c(n);
      for (size_t i = 0; i < n; ++i) {
        a[i] = static_cast<uint8_t>(i * 37 + 11);
        c[i] = static_cast<uint8_t>(i * 91 + 5);
      }
      std::vector<uint8_t> got(static_cast<size_t>(ParamCodeBytes(n, p)) + 1, 0xAB);
      ASSERT_TRUE(PackParamCodes(a.data(), c.data(), n, p, got.data()).ok());
      EXPECT_EQ(got.back(), 0xAB) << "wrote past the stream";
      got.pop_back();
      EXPECT_EQ(got, BitByBit(a, c, p)) << p << " bits, " << n << " groups";
    }
  }
}

TEST(PackParamCodes, RejectsBadWidths) {
  uint8_t v = 0, out = 0;
  EXPECT_FALSE(PackParamCodes(&v, &v, 1, 0, &out).ok());
  EXPECT_FALSE(PackParamCodes(&v, &v, 1, 9, &out).ok());
}

}  // namespace
}  // namespace arrowquant
