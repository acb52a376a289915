#include "arrowquant/markov.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace arrowquant {
namespace {

TEST(MarkovJumps, HandComputedPairs) {
  // Two rows of three groups: pairs (1,2), (2,2) | (4,0), (0,0).
  const std::vector<float> s = {1, 2, 2, 4, 0, 0};
  const std::vector<float> z = {0, 15, 15, 3, 3, 0};
  auto r = MarkovJumps(s.data(), z.data(), 2, 3, 15.0, 0.4, 0.5);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->pairs, 4);
  EXPECT_DOUBLE_EQ(r->sum_scale_jump, 0.5 + 0.0 + 1.0 + 0.0);
  EXPECT_DOUBLE_EQ(r->max_scale_jump, 1.0);
  EXPECT_DOUBLE_EQ(r->sum_zero_point_jump, 1.0 + 0.0 + 0.0 + 0.2);
  EXPECT_EQ(r->scale_violations, 2);
  EXPECT_EQ(r->zero_point_violations, 1);
  EXPECT_EQ(r->violations, 2);  // (1,2) violates both kinds: counted once
}

TEST(MarkovJumps, OneGroupPerRowHasNoPairs) {
  const std::vector<float> s = {1, 2};
  auto r = MarkovJumps(s.data(), s.data(), 2, 1, 3.0, 0.5, 0.5);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->pairs, 0);
  EXPECT_EQ(r->max_scale_jump, 0.0);
  EXPECT_EQ(r->sum_zero_point_jump, 0.0);
}

TEST(MarkovJumps, ManyPairsSumCloseToALeftToRightLoop) {
  // Many pairs (recursive blocks); exact agreement with numpy is tested in Python.
  const int64_t g = 1001;
  std::vector<float> s(g), z(g, 0.0f);
  for (int64_t i = 0; i < g; ++i) s[i] = 1.0f + static_cast<float>((i * 7919) % 97) / 13.0f;
  auto r = MarkovJumps(s.data(), z.data(), 1, g, 0.0, 0.5, 0.5);
  ASSERT_TRUE(r.ok());
  double naive = 0.0;
  for (int64_t i = 0; i + 1 < g; ++i) {
    const double a = s[i], b = s[i + 1];
    naive += std::fabs(b - a) / std::fmax(std::fabs(a), std::fabs(b));
  }
  EXPECT_NEAR(r->sum_scale_jump, naive, 1e-9);
}

TEST(MarkovJumps, RejectsBadArguments) {
  const float v = 1.0f;
  EXPECT_FALSE(MarkovJumps(&v, &v, 1, 0, 1.0, 0.5, 0.5).ok());
  EXPECT_FALSE(MarkovJumps(&v, &v, 1, 1, 1.0, -1.0, 0.5).ok());
}

}  // namespace
}  // namespace arrowquant
