#include "arrowquant/grid.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace arrowquant::grid {
namespace {

TEST(Grid, FixedTableFollowsTheRules) {
  EXPECT_TRUE(CheckLevels(kNlLevels, 4).ok());
  for (int k = 0; k < 16; ++k) EXPECT_EQ(kNlLevels[k] * 16.0f, std::round(kNlLevels[k] * 16.0f));
  std::vector<float> bad(kNlLevels, kNlLevels + 16);
  bad[15] = 14.9f;  // does not end at Q
  EXPECT_FALSE(CheckLevels(bad.data(), 4).ok());
  bad[15] = 15.0f;
  bad[3] = bad[2];  // not strictly increasing
  EXPECT_FALSE(CheckLevels(bad.data(), 4).ok());
}

TEST(Grid, CodesAreTheNearestLevelTiesDown) {
  // s = 1, z = 0: u = x; a midpoint goes to the lower level.
  const GridShape sh{1, 4, 4, 4};
  const float x[4] = {0.0f, (kNlLevels[3] + kNlLevels[4]) * 0.5f, 7.4f, 15.0f};
  std::vector<uint8_t> codes(4);
  std::vector<float> s(1), z(1);
  ASSERT_TRUE(Quantize(x, sh, false, kNlLevels, nullptr, codes.data(), s.data(), z.data()).ok());
  std::vector<float> out(4);
  ASSERT_TRUE(Dequantize(codes.data(), sh, kNlLevels, s.data(), z.data(), out.data()).ok());
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(out[i], (kNlLevels[codes[i]] - z[0]) * s[0]);
  }
  EXPECT_EQ(codes[0], 0);
  EXPECT_EQ(codes[3], 15);
}

TEST(Grid, SuperblockParametersAreCodeTimesUnit) {
  std::mt19937 rng(1);
  std::normal_distribution<float> n(0.0f, 1.0f);
  const GridShape sh{3, 300, 32, 4};
  std::vector<float> x(sh.rows * sh.cols);
  for (float& v : x) v = n(rng);
  const int64_t G = 10, S = 2;  // ceil(300 / 32), ceil(10 / 8)
  std::vector<uint8_t> codes(x.size()), a(sh.rows * G), c(sh.rows * G);
  std::vector<float> s(sh.rows * G), z(sh.rows * G), units(sh.rows * S * 2);
  ASSERT_TRUE(
      QuantizeSuperblock(x.data(), sh, kNlLevels, nullptr, codes.data(),
                         SuperblockOut{s.data(), z.data(), units.data(), a.data(), c.data()})
          .ok());
  for (int64_t r = 0; r < sh.rows; ++r) {
    for (int64_t j = 0; j < G; ++j) {
      const float d = units[(r * S + j / 8) * 2], dz = units[(r * S + j / 8) * 2 + 1];
      EXPECT_GE(a[r * G + j], 1);
      EXPECT_LE(a[r * G + j], 63);
      EXPECT_EQ(s[r * G + j], static_cast<float>(a[r * G + j]) * d);
      EXPECT_EQ(z[r * G + j], static_cast<float>(c[r * G + j]) * dz);
    }
  }
}

TEST(Grid, LearnedTableKeepsItsEndsAndRefusesBadShapes) {
  std::mt19937 rng(2);
  std::student_t_distribution<float> t(3.0f);
  const GridShape sh{8, 128, 64, 4};
  std::vector<float> x(sh.rows * sh.cols);
  for (float& v : x) v = t(rng);
  std::vector<float> L(16);
  ASSERT_TRUE(LearnLevels(x.data(), sh, nullptr, kNlLevels, L.data()).ok());
  EXPECT_EQ(L[0], 0.0f);
  EXPECT_EQ(L[15], 15.0f);
  EXPECT_TRUE(CheckLevels(L.data(), 4).ok());
  const GridShape bad{1, 4, 0, 4};
  EXPECT_FALSE(LearnLevels(x.data(), bad, nullptr, kNlLevels, L.data()).ok());
}

TEST(Grid, Avx2AndScalarPassesChooseTheSameBits) {
  std::mt19937 rng(3);
  std::student_t_distribution<float> t(2.0f);
  GridShape sh{5, 203, 37, 4};
  std::vector<float> x(sh.rows * sh.cols), w(sh.cols);
  for (float& v : x) v = t(rng);
  for (float& v : w) v = std::fabs(t(rng));
  const int64_t G = 6;
  std::vector<uint8_t> q1(x.size()), q2(x.size());
  std::vector<float> s1(sh.rows * G), z1(sh.rows * G), s2(sh.rows * G), z2(sh.rows * G);
  ASSERT_TRUE(
      Quantize(x.data(), sh, true, kNlLevels, w.data(), q1.data(), s1.data(), z1.data()).ok());
  sh.force_scalar = true;
  ASSERT_TRUE(
      Quantize(x.data(), sh, true, kNlLevels, w.data(), q2.data(), s2.data(), z2.data()).ok());
  EXPECT_EQ(q1, q2);
  EXPECT_EQ(s1, s2);
  EXPECT_EQ(z1, z2);
}

}  // namespace
}  // namespace arrowquant::grid
