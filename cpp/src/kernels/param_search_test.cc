#include "kernels/param_search.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "arrowquant/dtype.h"
#include "kernels/row_kernels.h"

namespace arrowquant::kernels {
namespace {

// Groups with the shapes that matter: tails (n % 8), several 2048-element
// blocks, heavy tails, offsets far from 0, constant stretches.
std::vector<float> RandomGroup(std::mt19937& rng, int64_t n, int kind) {
  std::normal_distribution<float> normal;
  std::student_t_distribution<float> t3(3.0f);
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) {
    switch (kind % 4) {
      case 0:
        v = normal(rng);
        break;
      case 1:
        v = t3(rng) * 0.01f;
        break;
      case 2:
        v = 100.0f + normal(rng);
        break;
      default:
        v = std::round(normal(rng) * 2.0f) * 0.5f;
        break;  // many ties
    }
  }
  return x;
}

// Squared error of FORMAT.md's formulas for (s, z), summed in double.
double TrueError(const std::vector<float>& x, int bits, Scheme scheme, float s, float z) {
  const float q_max = static_cast<float>((1 << bits) - 1);
  const float inv = 1.0f / s;
  double err = 0.0;
  for (float v : x) {
    float q =
        scheme == Scheme::kSymmetric ? std::nearbyint(v * inv) + z : std::nearbyint(v * inv + z);
    q = std::min(std::max(q, 0.0f), q_max);
    const double e = static_cast<double>(v) - static_cast<double>((q - z) * s);
    err += e * e;
  }
  return err;
}

TEST(ParamSearch, Avx2PassesMatchScalarBitForBit) {
  const SearchPasses* avx2 = Avx2SearchPasses();
  if (avx2 == nullptr) GTEST_SKIP() << "no AVX2 on this CPU";
  const SearchPasses& scalar = ScalarSearchPasses();
  std::mt19937 rng(7);
  for (int64_t n : {1, 3, 7, 8, 9, 15, 16, 31, 64, 100, 128, 257, 2048, 2049, 5000}) {
    for (int kind = 0; kind < 4; ++kind) {
      const std::vector<float> x = RandomGroup(rng, n, kind);
      float lo_a, hi_a, lo_b, hi_b;
      scalar.min_max(x.data(), n, &lo_a, &hi_a);
      avx2->min_max(x.data(), n, &lo_b, &hi_b);
      ASSERT_EQ(std::bit_cast<uint32_t>(lo_a), std::bit_cast<uint32_t>(lo_b));
      ASSERT_EQ(std::bit_cast<uint32_t>(hi_a), std::bit_cast<uint32_t>(hi_b));
      const float mid = lo_a + (hi_a - lo_a) * 0.5f;
      ASSERT_EQ(std::bit_cast<uint32_t>(scalar.centered_sum(x.data(), n, mid)),
                std::bit_cast<uint32_t>(avx2->centered_sum(x.data(), n, mid)));
      for (int bits : {2, 4, 8}) {
        const float q_max = static_cast<float>((1 << bits) - 1);
        const float r = hi_a > lo_a ? hi_a - lo_a : 1.0f;
        for (float c : {1.0f, 0.7f, 1.3f}) {
          const float s = r * c / q_max;
          const float z = q_max * 0.5f - mid / s;
          EvalSums a, b;
          scalar.eval_asym(x.data(), n, s, z, mid, q_max, &a);
          avx2->eval_asym(x.data(), n, s, z, mid, q_max, &b);
          ASSERT_EQ(std::bit_cast<uint32_t>(a.err), std::bit_cast<uint32_t>(b.err))
              << n << " " << bits;
          ASSERT_EQ(std::bit_cast<uint32_t>(a.err),
                    std::bit_cast<uint32_t>(scalar.error_asym(x.data(), n, s, z, q_max)));
          ASSERT_EQ(std::bit_cast<uint32_t>(a.err),
                    std::bit_cast<uint32_t>(avx2->error_asym(x.data(), n, s, z, q_max)));
          ASSERT_EQ(std::bit_cast<uint32_t>(a.sum_xq), std::bit_cast<uint32_t>(b.sum_xq));
          ASSERT_EQ(a.sum_q, b.sum_q);
          ASSERT_EQ(a.sum_qq, b.sum_qq);
          const float zs = static_cast<float>(1 << (bits - 1));
          scalar.eval_sym(x.data(), n, s, zs, q_max, &a);
          avx2->eval_sym(x.data(), n, s, zs, q_max, &b);
          ASSERT_EQ(std::bit_cast<uint32_t>(a.err), std::bit_cast<uint32_t>(b.err));
          ASSERT_EQ(std::bit_cast<uint32_t>(a.err),
                    std::bit_cast<uint32_t>(scalar.error_sym(x.data(), n, s, zs, q_max)));
          ASSERT_EQ(std::bit_cast<uint32_t>(a.err),
                    std::bit_cast<uint32_t>(avx2->error_sym(x.data(), n, s, zs, q_max)));
          ASSERT_EQ(std::bit_cast<uint32_t>(a.sum_xq), std::bit_cast<uint32_t>(b.sum_xq));
          ASSERT_EQ(a.sum_qq, b.sum_qq);
        }
      }
    }
  }
}

TEST(ParamSearch, F16cRoundingMatchesSoftware) {
  const SearchPasses* avx2 = Avx2SearchPasses();
  if (avx2 == nullptr) GTEST_SKIP() << "no AVX2/F16C on this CPU";
  const SearchPasses& scalar = ScalarSearchPasses();
  std::vector<float> values = {0.0f,     -0.0f, 65504.0f,        65519.99f,       65520.0f,
                               1e6f,     -1e6f, 6.1e-5f,         5.96e-8f,        2.98e-8f,
                               2.99e-8f, 1e-9f, 1.0f + 0x1p-11f, 1.0f + 0x1p-12f, INFINITY,
                               -INFINITY};
  std::mt19937 rng(3);
  std::uniform_int_distribution<uint32_t> any_bits;
  for (int i = 0; i < 200000; ++i) {
    uint32_t u = any_bits(rng);
    float f;
    std::memcpy(&f, &u, sizeof f);
    if (std::isfinite(f)) values.push_back(f);
  }
  for (float v : values) {
    ASSERT_EQ(std::bit_cast<uint32_t>(scalar.round_f16(v)),
              std::bit_cast<uint32_t>(avx2->round_f16(v)))
        << v;
  }
}

TEST(ParamSearch, Avx2SearchMatchesScalarSearch) {
  const SearchPasses* avx2 = Avx2SearchPasses();
  if (avx2 == nullptr) GTEST_SKIP() << "no AVX2 on this CPU";
  std::mt19937 rng(11);
  for (int64_t n : {1, 2, 5, 32, 37, 64, 128, 256, 3000}) {
    for (int kind = 0; kind < 4; ++kind) {
      const std::vector<float> x = RandomGroup(rng, n, kind);
      for (int bits : {2, 4, 8}) {
        for (Scheme scheme : {Scheme::kAsymmetric, Scheme::kSymmetric}) {
          for (ParamDType pd : {ParamDType::kF32, ParamDType::kF16}) {
            float s1, z1, s2, z2;
            ASSERT_TRUE(
                MseGroupParamsWith(ScalarSearchPasses(), x.data(), n, bits, scheme, pd, &s1, &z1)
                    .ok());
            ASSERT_TRUE(MseGroupParamsWith(*avx2, x.data(), n, bits, scheme, pd, &s2, &z2).ok());
            ASSERT_EQ(std::bit_cast<uint32_t>(s1), std::bit_cast<uint32_t>(s2));
            ASSERT_EQ(std::bit_cast<uint32_t>(z1), std::bit_cast<uint32_t>(z2));
          }
        }
      }
    }
  }
}

TEST(ParamSearch, RtnFromRangeEqualsRtnGroupParams) {
  std::mt19937 rng(5);
  for (int64_t n : {1, 2, 9, 64, 130}) {
    for (int kind = 0; kind < 4; ++kind) {
      std::vector<float> x = RandomGroup(rng, n, kind);
      if (kind == 3) x.assign(x.size(), -0.0f);  // constant, signed zero
      for (int bits : {2, 4, 8}) {
        for (Scheme scheme : {Scheme::kAsymmetric, Scheme::kSymmetric}) {
          float lo, hi, s1, z1, s2, z2;
          ScalarSearchPasses().min_max(x.data(), n, &lo, &hi);
          ASSERT_TRUE(RtnFromRange(lo, hi, bits, scheme, &s1, &z1).ok());
          ASSERT_TRUE(RtnGroupParams(x.data(), n, bits, scheme, &s2, &z2).ok());
          ASSERT_EQ(std::bit_cast<uint32_t>(s1), std::bit_cast<uint32_t>(s2));
          ASSERT_EQ(std::bit_cast<uint32_t>(z1), std::bit_cast<uint32_t>(z2));
        }
      }
    }
  }
}

TEST(ParamSearch, NeverWorseThanRtnAndBetterOnAverage) {
  std::mt19937 rng(13);
  for (int bits : {2, 4, 8}) {
    for (Scheme scheme : {Scheme::kAsymmetric, Scheme::kSymmetric}) {
      for (ParamDType pd : {ParamDType::kF32, ParamDType::kF16}) {
        double total_rtn = 0.0, total_mse = 0.0;
        for (int trial = 0; trial < 200; ++trial) {
          const int64_t n = 1 + trial % 130;
          const std::vector<float> x = RandomGroup(rng, n, trial);
          float sr, zr, sm, zm;
          ASSERT_TRUE(RtnStorageParams(x.data(), n, bits, scheme, pd, &sr, &zr).ok());
          ASSERT_TRUE(MseGroupParams(x.data(), n, bits, scheme, pd, &sm, &zm).ok());
          const double er = TrueError(x, bits, scheme, sr, zr);
          const double em = TrueError(x, bits, scheme, sm, zm);
          // The search compares float32 sums; allow their rounding only.
          ASSERT_LE(em, er * (1.0 + 1e-5) + 1e-30) << "bits " << bits << " n " << n;
          total_rtn += er;
          total_mse += em;
        }
        EXPECT_LT(total_mse, total_rtn) << "bits " << bits;
      }
    }
  }
}

TEST(ParamSearch, Float16ParametersAreExactlyRepresentable) {
  std::mt19937 rng(17);
  for (int trial = 0; trial < 300; ++trial) {
    const int64_t n = 1 + trial % 77;
    const std::vector<float> x = RandomGroup(rng, n, trial);
    for (Method method : {Method::kRtn, Method::kMse}) {
      QuantSpec spec;
      spec.bits = 2 << (trial % 3);  // 2, 4, 8
      spec.scheme = trial % 5 == 0 ? Scheme::kSymmetric : Scheme::kAsymmetric;
      spec.method = method;
      spec.param_dtype = ParamDType::kF16;
      float s, z;
      ASSERT_TRUE(ChooseGroupParams(x.data(), n, spec, &s, &z).ok());
      EXPECT_EQ(std::bit_cast<uint32_t>(HalfToFloat(FloatToHalf(s))), std::bit_cast<uint32_t>(s));
      EXPECT_EQ(std::bit_cast<uint32_t>(HalfToFloat(FloatToHalf(z))), std::bit_cast<uint32_t>(z));
      EXPECT_GT(s, 0.0f);
    }
  }
}

TEST(ParamSearch, KnownGroupsAreExact) {
  // Codes 0..3 at scale 1 reproduce [0, 1, 2, 3] exactly: rtn is optimal and
  // wins the tie, in both precisions.
  const float x[] = {0.f, 1.f, 2.f, 3.f};
  for (ParamDType pd : {ParamDType::kF32, ParamDType::kF16}) {
    float s, z;
    ASSERT_TRUE(MseGroupParams(x, 4, 2, Scheme::kAsymmetric, pd, &s, &z).ok());
    EXPECT_EQ(s, 1.0f);
    EXPECT_EQ(z, 0.0f);
  }
  // A constant group keeps rtn's exact parameters.
  const float c[] = {2.5f, 2.5f, 2.5f};
  float s, z;
  ASSERT_TRUE(MseGroupParams(c, 3, 4, Scheme::kAsymmetric, ParamDType::kF32, &s, &z).ok());
  EXPECT_EQ(s, 1.0f);
  EXPECT_EQ(z, -2.5f);
}

TEST(ParamSearch, ClippingBeatsMinMaxOnAnOutlier) {
  // 63 values in [-1, 1] and one at 40: at 2 bits rtn spends its range on
  // the outlier; the search must find a much smaller error.
  std::vector<float> x(64);
  for (int i = 0; i < 63; ++i) x[i] = -1.0f + 2.0f * static_cast<float>(i) / 62.0f;
  x[63] = 40.0f;
  float sr, zr, sm, zm;
  ASSERT_TRUE(
      RtnStorageParams(x.data(), 64, 2, Scheme::kAsymmetric, ParamDType::kF32, &sr, &zr).ok());
  ASSERT_TRUE(
      MseGroupParams(x.data(), 64, 2, Scheme::kAsymmetric, ParamDType::kF32, &sm, &zm).ok());
  EXPECT_LT(TrueError(x, 2, Scheme::kAsymmetric, sm, zm),
            0.8 * TrueError(x, 2, Scheme::kAsymmetric, sr, zr));
}

TEST(ParamSearch, Float16OverflowRules) {
  // Far from 0 with a small spread: rtn's zero point (about -1.5e5)
  // overflows float16; both methods fall back to the range widened to
  // include 0, whose zero point is in [0, Q].
  const float x[] = {1000.0f, 1000.1f, 1000.05f, 1000.025f};
  float s, z;
  ASSERT_TRUE(RtnStorageParams(x, 4, 4, Scheme::kAsymmetric, ParamDType::kF16, &s, &z).ok());
  EXPECT_TRUE(z >= 0.0f && z <= 15.0f) << z;
  const double e_rtn = TrueError({x, x + 4}, 4, Scheme::kAsymmetric, s, z);
  EXPECT_LT(e_rtn, 4 * 34.0 * 34.0);  // half a step of 1000.1 / 15 at most
  ASSERT_TRUE(MseGroupParams(x, 4, 4, Scheme::kAsymmetric, ParamDType::kF16, &s, &z).ok());
  EXPECT_TRUE(Representable(s, z));
  EXPECT_LE(TrueError({x, x + 4}, 4, Scheme::kAsymmetric, s, z), e_rtn);
  Status st;

  // A symmetric scale above float16's range has no representable candidate.
  const float big[] = {1e7f, -3e6f};
  st = RtnStorageParams(big, 2, 2, Scheme::kSymmetric, ParamDType::kF16, &s, &z);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.ToString().find("rtn parameters not representable in float16"), std::string::npos)
      << st.ToString();
  st = MseGroupParams(big, 2, 2, Scheme::kSymmetric, ParamDType::kF16, &s, &z);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.ToString().find("no candidate parameters representable"), std::string::npos);

  // A scale below float16's smallest subnormal is stored as 2^-24, not 0.
  const float tiny[] = {1e-9f, -1e-9f, 5e-10f};
  ASSERT_TRUE(RtnStorageParams(tiny, 3, 8, Scheme::kSymmetric, ParamDType::kF16, &s, &z).ok());
  EXPECT_EQ(s, 0x1p-24f);
}

TEST(ParamSearch, RowEqualsGroupByGroup) {
  std::mt19937 rng(23);
  for (int64_t cols : {1, 50, 64, 100, 129, 300}) {
    const std::vector<float> x = RandomGroup(rng, cols, static_cast<int>(cols));
    for (int64_t g : {1, 7, 32, 64}) {
      for (ParamDType pd : {ParamDType::kF32, ParamDType::kF16}) {
        QuantSpec spec;
        spec.bits = 4;
        spec.group_size = g;
        spec.method = Method::kMse;
        spec.param_dtype = pd;
        const int64_t groups = GroupsPerRow(cols, g);
        std::vector<float> s(groups), z(groups);
        int64_t failed = -1;
        ASSERT_TRUE(ChooseRowParams(x.data(), cols, spec, s.data(), z.data(), &failed).ok());
        for (int64_t j = 0; j < groups; ++j) {
          float s1, z1;
          ASSERT_TRUE(MseGroupParams(x.data() + j * g, std::min(g, cols - j * g), 4,
                                     Scheme::kAsymmetric, pd, &s1, &z1)
                          .ok());
          ASSERT_EQ(std::bit_cast<uint32_t>(s[j]), std::bit_cast<uint32_t>(s1));
          ASSERT_EQ(std::bit_cast<uint32_t>(z[j]), std::bit_cast<uint32_t>(z1));
        }
      }
    }
  }
}

TEST(ParamSearch, RowReportsTheFirstFailingGroup) {
  QuantSpec spec;
  spec.bits = 2;
  spec.group_size = 1;
  spec.scheme = Scheme::kSymmetric;
  spec.method = Method::kMse;
  spec.param_dtype = ParamDType::kF16;
  // groups 2 and 3 both fail; group 2 is reported
  const float row[] = {0.5f, 0.25f, 1e7f, 2e7f, 1.0f};
  float s[5], z[5];
  int64_t failed = -1;
  EXPECT_FALSE(ChooseRowParams(row, 5, spec, s, z, &failed).ok());
  EXPECT_EQ(failed, 2);
  // only the last group fails
  const float row2[] = {0.5f, 0.25f, 1.0f, 2e7f};
  EXPECT_FALSE(ChooseRowParams(row2, 4, spec, s, z, &failed).ok());
  EXPECT_EQ(failed, 3);
}

TEST(ParamSearch, ChooseParamsNamesRowAndGroup) {
  QuantSpec spec;
  spec.bits = 2;
  spec.group_size = 2;
  spec.scheme = Scheme::kSymmetric;
  spec.method = Method::kMse;
  spec.param_dtype = ParamDType::kF16;
  const float row[] = {0.5f, 0.25f, 1e7f, 2e7f};
  float scales[2], zeros[2];
  Status st = ScalarKernels().choose_params(row, 4, spec, scales, zeros, 3);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.ToString().find("row 3, group 1"), std::string::npos) << st.ToString();
}

// Superblock parameters of one row through the given passes.
struct SuperblockRow {
  std::vector<float> scales, zeros, units, zero_units;
  std::vector<uint8_t> scale_codes, zero_codes;
  Status status;
  int64_t failed = -1;
};

SuperblockRow RunSuperblock(const SearchPasses& p, const std::vector<float>& x, int bits, int64_t g,
                            Method method) {
  QuantSpec spec;
  spec.bits = bits;
  spec.group_size = g;
  spec.method = method;
  spec.param_dtype = ParamDType::kSuperblock;
  const int64_t cols = static_cast<int64_t>(x.size());
  const int64_t G = GroupsPerRow(cols, g);
  const int64_t S = SuperblocksPerRow(cols, g);
  SuperblockRow r;
  r.scales.assign(static_cast<size_t>(G), 0.0f);
  r.zeros.assign(static_cast<size_t>(G), 0.0f);
  r.units.assign(static_cast<size_t>(S), 0.0f);
  r.zero_units.assign(static_cast<size_t>(S), 0.0f);
  r.scale_codes.assign(static_cast<size_t>(G), 0);
  r.zero_codes.assign(static_cast<size_t>(G), 0);
  r.status = ChooseRowSuperblock(p, x.data(), cols, spec, r.scales.data(), r.zeros.data(),
                                 r.units.data(), r.zero_units.data(), &r.failed,
                                 r.scale_codes.data(), r.zero_codes.data());
  return r;
}

TEST(Superblock, Avx2MatchesScalarBitForBit) {
  const SearchPasses* avx2 = Avx2SearchPasses();
  if (avx2 == nullptr) GTEST_SKIP() << "no AVX2 on this CPU";
  std::mt19937 rng(21);
  for (int64_t cols : {1, 7, 40, 256, 300, 1000}) {
    for (int kind = 0; kind < 4; ++kind) {
      const std::vector<float> x = RandomGroup(rng, cols, kind);
      for (int bits : {2, 4, 8}) {
        for (int64_t g : {8, 16, 32, 48, 256, 512}) {
          for (Method m : {Method::kRtn, Method::kMse}) {
            const SuperblockRow a = RunSuperblock(ScalarSearchPasses(), x, bits, g, m);
            const SuperblockRow b = RunSuperblock(*avx2, x, bits, g, m);
            ASSERT_TRUE(a.status.ok()) << a.status.ToString();
            ASSERT_TRUE(b.status.ok()) << b.status.ToString();
            for (size_t j = 0; j < a.scales.size(); ++j) {
              ASSERT_EQ(std::bit_cast<uint32_t>(a.scales[j]), std::bit_cast<uint32_t>(b.scales[j]))
                  << cols << " " << g << " " << j;
              ASSERT_EQ(std::bit_cast<uint32_t>(a.zeros[j]), std::bit_cast<uint32_t>(b.zeros[j]))
                  << cols << " " << g << " " << j;
            }
            for (size_t k = 0; k < a.units.size(); ++k) {
              ASSERT_EQ(std::bit_cast<uint32_t>(a.units[k]), std::bit_cast<uint32_t>(b.units[k]));
              ASSERT_EQ(std::bit_cast<uint32_t>(a.zero_units[k]),
                        std::bit_cast<uint32_t>(b.zero_units[k]));
            }
          }
        }
      }
    }
  }
}

// Every group's parameters are unit * code with codes in range and float16
// units: what a reader rebuilds from the stored codes is what was used.
TEST(Superblock, ParametersAreUnitTimesCode) {
  std::mt19937 rng(5);
  for (int kind = 0; kind < 4; ++kind) {
    const std::vector<float> x = RandomGroup(rng, 777, kind);
    for (int bits : {2, 4, 8}) {
      for (int64_t g : {16, 32, 100}) {
        const SuperblockRow r = RunSuperblock(BestSearchPasses(), x, bits, g, Method::kMse);
        ASSERT_TRUE(r.status.ok()) << r.status.ToString();
        const int64_t K = SuperblockGroups(g);
        const float p_max = static_cast<float>((1 << SuperblockCodeBits(bits)) - 1);
        for (size_t k = 0; k < r.units.size(); ++k) {
          EXPECT_EQ(std::bit_cast<uint32_t>(r.units[k]),
                    std::bit_cast<uint32_t>(HalfToFloat(FloatToHalf(r.units[k]))));
          EXPECT_EQ(std::bit_cast<uint32_t>(r.zero_units[k]),
                    std::bit_cast<uint32_t>(HalfToFloat(FloatToHalf(r.zero_units[k]))));
          EXPECT_GT(r.units[k], 0.0f);
          EXPECT_GE(r.zero_units[k], 0.0f);
        }
        for (size_t j = 0; j < r.scales.size(); ++j) {
          const float d = r.units[j / static_cast<size_t>(K)];
          const float dz = r.zero_units[j / static_cast<size_t>(K)];
          const float a = r.scales[j] / d, c = r.zeros[j] / dz;
          EXPECT_EQ(a, std::nearbyint(a));
          EXPECT_EQ(c, std::nearbyint(c));
          EXPECT_GE(a, 1.0f);
          EXPECT_LE(a, p_max);
          EXPECT_GE(c, 0.0f);
          EXPECT_LE(c, p_max);
          EXPECT_EQ(std::bit_cast<uint32_t>(d * a), std::bit_cast<uint32_t>(r.scales[j]));
          EXPECT_EQ(std::bit_cast<uint32_t>(dz * c), std::bit_cast<uint32_t>(r.zeros[j]));
          // The codes the engine hands out are those quotients (a zero unit
          // of a super-block whose zero points are all 0 gives code 0).
          EXPECT_EQ(static_cast<float>(r.scale_codes[j]), a);
          EXPECT_EQ(static_cast<float>(r.zero_codes[j]), r.zeros[j] == 0.0f ? 0.0f : c);
        }
      }
    }
  }
}

// The code search starts from the nearest codes of rtn-like parameters, so
// mse is better than superblock rtn on average (not per group: the units
// differ), and much better at 2 bits.
TEST(Superblock, SearchBeatsNearestCodesOnAverage) {
  std::mt19937 rng(9);
  std::normal_distribution<float> normal;
  std::vector<float> x(4096);
  for (auto& v : x) v = normal(rng);
  for (int bits : {2, 4}) {
    const int64_t g = bits == 2 ? 16 : 32;
    const SuperblockRow rtn = RunSuperblock(BestSearchPasses(), x, bits, g, Method::kRtn);
    const SuperblockRow mse = RunSuperblock(BestSearchPasses(), x, bits, g, Method::kMse);
    double e_rtn = 0.0, e_mse = 0.0;
    for (size_t j = 0; j < rtn.scales.size(); ++j) {
      const std::vector<float> grp(x.begin() + static_cast<int64_t>(j) * g,
                                   x.begin() + static_cast<int64_t>(j + 1) * g);
      e_rtn += TrueError(grp, bits, Scheme::kAsymmetric, rtn.scales[j], rtn.zeros[j]);
      e_mse += TrueError(grp, bits, Scheme::kAsymmetric, mse.scales[j], mse.zeros[j]);
    }
    EXPECT_LT(e_mse, (bits == 2 ? 0.7 : 0.9) * e_rtn) << bits;
  }
}

// A constant group (whose rtn scale is 1) takes no part in the scale unit,
// and an all-zero group decodes exactly.
TEST(Superblock, ConstantGroupsDoNotSetTheUnit) {
  std::vector<float> x(96, 0.0f);
  for (int64_t c = 32; c < 64; ++c) x[static_cast<size_t>(c)] = 1.5f;  // constant group
  for (int64_t c = 64; c < 96; ++c) x[static_cast<size_t>(c)] = static_cast<float>(c - 64) * 0.25f;
  for (Method m : {Method::kRtn, Method::kMse}) {
    const SuperblockRow r = RunSuperblock(BestSearchPasses(), x, 4, 32, m);
    ASSERT_TRUE(r.status.ok());
    // The ramp's scale (about 7.75 / 15) sets d = scale / 63, not the
    // constant group's 1.
    EXPECT_LT(r.units[0], 0.01f);
    // The all-zero group: zero point 0, so every value decodes to 0.
    EXPECT_EQ(r.zeros[0], 0.0f);
    EXPECT_EQ(TrueError(std::vector<float>(x.begin(), x.begin() + 32), 4, Scheme::kAsymmetric,
                        r.scales[0], r.zeros[0]),
              0.0);
  }
}

TEST(Superblock, HugeScalesAreAnErrorNamingTheGroup) {
  std::vector<float> x(64, 0.0f);
  for (int64_t c = 32; c < 64; ++c) x[static_cast<size_t>(c)] = static_cast<float>(c) * 1e7f;
  const SuperblockRow r = RunSuperblock(BestSearchPasses(), x, 4, 32, Method::kRtn);
  ASSERT_FALSE(r.status.ok());
  EXPECT_NE(r.status.ToString().find("float16"), std::string::npos) << r.status.ToString();
  EXPECT_EQ(r.failed, 0);  // the super-block's first group
}

TEST(Superblock, SymmetricSchemeIsRejected) {
  QuantSpec spec;
  spec.param_dtype = ParamDType::kSuperblock;
  spec.scheme = Scheme::kSymmetric;
  EXPECT_FALSE(ValidateSpec(spec).ok());
  spec.scheme = Scheme::kAsymmetric;
  EXPECT_TRUE(ValidateSpec(spec).ok());
  EXPECT_EQ(SuperblockGroups(32), 8);
  EXPECT_EQ(SuperblockGroups(300), 1);
  EXPECT_EQ(SuperblocksPerRow(1000, 32), 4);   // 32 groups -> 4 super-blocks
  EXPECT_EQ(SuperblocksPerRow(1000, 100), 5);  // 10 groups, 2 per super-block
}

// Select() decides the search passes with the row kernels: a forced scalar
// run never reaches a SIMD pass (the mse search included).
TEST(ParamSearch, SelectChoosesThePassesWithTheKernels) {
  EXPECT_EQ(Select(true).passes, &ScalarSearchPasses());
  EXPECT_EQ(ScalarKernels().passes, &ScalarSearchPasses());
  if (const RowKernels* avx2 = Avx2Kernels()) {
    EXPECT_EQ(avx2->passes, Avx2SearchPasses());
    EXPECT_EQ(Select(false).passes, Avx2SearchPasses());
  }
}

}  // namespace
}  // namespace arrowquant::kernels
