#include "arrowquant/gguf_blocks.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "arrowquant/dtype.h"
#include "kernels/gguf_block_passes.h"

namespace arrowquant::gguf {
namespace {

constexpr GgmlType kAllBlockTypes[] = {GgmlType::kQ8_0, GgmlType::kQ4_0,   GgmlType::kQ4_1,
                                       GgmlType::kQ5_0, GgmlType::kQ5_1,   GgmlType::kQ2_K,
                                       GgmlType::kQ3_K, GgmlType::kQ4_K,   GgmlType::kQ5_K,
                                       GgmlType::kQ6_K, GgmlType::kIQ4_NL, GgmlType::kIQ4_XS};

const char* Name(GgmlType t) { return GgmlTypeName(static_cast<uint32_t>(t)); }

std::vector<float> Gaussian(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> x(n);
  for (float& v : x) v = dist(rng);
  return x;
}

// Rows of 512 values with every edge case the search meets: zeros,
// constants, one outlier, subnormals, a huge range, a positive-only and a
// negative-only block, ties, and ordinary Gaussian blocks.
std::vector<float> EdgeRows(int64_t rows, int64_t cols, uint32_t seed) {
  std::vector<float> x = Gaussian(static_cast<size_t>(rows * cols), seed);
  std::mt19937 rng(seed + 1);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x.data() + r * cols;
    switch (r % 9) {
      case 0:
        std::fill(row, row + 256, 0.0f);
        break;
      case 1:
        std::fill(row, row + 256, -0.375f);
        std::fill(row + 256, row + 512, 2.5f);
        break;
      case 2:
        row[17] = 40.0f;  // one outlier
        row[300] = -75.0f;
        break;
      case 3:
        for (int64_t c = 0; c < 256; ++c) row[c] *= 1e-39f;  // subnormals
        break;
      case 4:
        for (int64_t c = 0; c < 256; ++c) row[c] *= (c % 7 == 0) ? 1e4f : 1e-3f;  // huge range
        break;
      case 5:
        for (int64_t c = 0; c < 256; ++c) row[c] = std::fabs(row[c]) + 3.0f;
        for (int64_t c = 256; c < 512; ++c) row[c] = -std::fabs(row[c]) - 1.0f;
        break;
      case 6:
        for (int64_t c = 0; c < cols; ++c) row[c] = static_cast<float>((c % 16) - 8) * 0.5f;
        break;
      case 7:
        for (int64_t c = 0; c < cols; ++c) row[c] = -0.0f;
        row[3] = 1e-30f;
        break;
      default:
        break;
    }
  }
  return x;
}

std::vector<uint8_t> Encode(GgmlType t, const std::vector<float>& x, int64_t rows, int64_t cols,
                            const BlockOptions& opts, ErrorStats* stats = nullptr) {
  std::vector<uint8_t> out(static_cast<size_t>(*RowBytes(t, cols) * static_cast<uint64_t>(rows)));
  const Status st = QuantizeBlocks(t, x.data(), rows, cols, out.data(), opts, stats);
  EXPECT_TRUE(st.ok()) << Name(t) << ": " << st.ToString();
  return out;
}

std::vector<float> Decode(GgmlType t, const std::vector<uint8_t>& q, int64_t rows, int64_t cols) {
  std::vector<float> y(static_cast<size_t>(rows * cols));
  EXPECT_TRUE(DequantizeBlocks(t, q.data(), rows, cols, y.data()).ok());
  return y;
}

double WeightedError(const std::vector<float>& x, const std::vector<float>& y, int64_t cols,
                     const float* w) {
  double e2 = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double e = static_cast<double>(x[i]) - y[i];
    e2 += (w ? w[i % static_cast<size_t>(cols)] : 1.0) * e * e;
  }
  return e2;
}

std::vector<float> Importance(int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::lognormal_distribution<float> dist(0.0f, 1.5f);
  std::vector<float> w(static_cast<size_t>(cols));
  for (float& v : w) v = dist(rng);
  w[5] = 0.0f;  // a dead column
  return w;
}

// ---- the reference rounding (llama.cpp's quantize_row_*_ref) -----------------

BlockOptions Reference() {
  BlockOptions o;
  o.mode = BlockMode::kReference;
  return o;
}

TEST(GgufBlocks, Q8_0ReferenceRoundsHalfAwayFromZero) {
  // max |x| = 127 -> d = 1 exactly: codes are roundf(x).
  std::vector<float> x(32, 0.0f);
  x[0] = 127.0f;
  x[1] = 2.5f;     // -> 3 (half away from zero; rint would give 2)
  x[2] = -2.5f;    // -> -3
  x[3] = 0.49f;    // -> 0
  x[4] = -126.5f;  // -> -127
  const std::vector<uint8_t> out = Encode(GgmlType::kQ8_0, x, 1, 32, Reference());
  EXPECT_EQ(HalfToFloat(static_cast<uint16_t>(out[0] | (out[1] << 8))), 1.0f);
  EXPECT_EQ(static_cast<int8_t>(out[2]), 127);
  EXPECT_EQ(static_cast<int8_t>(out[3]), 3);
  EXPECT_EQ(static_cast<int8_t>(out[4]), -3);
  EXPECT_EQ(static_cast<int8_t>(out[5]), 0);
  EXPECT_EQ(static_cast<int8_t>(out[6]), -127);
}

TEST(GgufBlocks, Q4_0ReferenceNibbleLayoutAndSignedMax) {
  // The largest magnitude is -8 -> d = 1, codes x + 8 (truncated after +8.5).
  std::vector<float> x(32);
  for (int j = 0; j < 32; ++j) x[j] = static_cast<float>((j % 16) - 8);
  const std::vector<uint8_t> out = Encode(GgmlType::kQ4_0, x, 1, 32, Reference());
  EXPECT_EQ(HalfToFloat(static_cast<uint16_t>(out[0] | (out[1] << 8))), 1.0f);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(out[2 + j] & 0x0F, j);
    EXPECT_EQ(out[2 + j] >> 4, j);
  }
  // A positive extreme gets a negative d (it maps to code 0).
  std::vector<float> y(32, 0.0f);
  y[9] = 4.0f;
  const std::vector<uint8_t> o2 = Encode(GgmlType::kQ4_0, y, 1, 32, Reference());
  EXPECT_EQ(HalfToFloat(static_cast<uint16_t>(o2[0] | (o2[1] << 8))), -0.5f);
  EXPECT_EQ(o2[2 + 9] & 0x0F, 0);
}

TEST(GgufBlocks, Q4_1ReferenceIsExactOnAGrid) {
  std::vector<float> x(32);
  for (int j = 0; j < 32; ++j) x[j] = 1.0f + static_cast<float>(j % 16);
  const std::vector<uint8_t> out = Encode(GgmlType::kQ4_1, x, 1, 32, Reference());
  EXPECT_EQ(HalfToFloat(static_cast<uint16_t>(out[0] | (out[1] << 8))), 1.0f);  // (16-1)/15
  EXPECT_EQ(HalfToFloat(static_cast<uint16_t>(out[2] | (out[3] << 8))), 1.0f);  // min
  const std::vector<float> back = Decode(GgmlType::kQ4_1, out, 1, 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(back[j], x[j]);
  // The search finds the same exact solution.
  const std::vector<float> s =
      Decode(GgmlType::kQ4_1, Encode(GgmlType::kQ4_1, x, 1, 32, {}), 1, 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(s[j], x[j]);
}

// ---- every type ---------------------------------------------------------------

TEST(GgufBlocks, ScalarAndAvx2GiveIdenticalBytes) {
  if (kernels::Avx2BlockPasses() == nullptr) GTEST_SKIP() << "no AVX2 on this CPU";
  const int64_t rows = 36, cols = 512;
  const std::vector<float> x = EdgeRows(rows, cols, 21);
  const std::vector<float> w = Importance(cols, 4);
  for (GgmlType t : kAllBlockTypes) {
    for (bool weighted : {false, true}) {
      BlockOptions simd, scalar;
      simd.exec = ExecOptions{1, false};
      scalar.exec = ExecOptions{1, true};
      if (weighted) simd.importance = scalar.importance = w.data();
      EXPECT_EQ(Encode(t, x, rows, cols, simd), Encode(t, x, rows, cols, scalar))
          << Name(t) << (weighted ? " weighted" : "");
    }
  }
}

TEST(GgufBlocks, PassesAgreeOnRandomCandidates) {
  // The passes themselves, on candidates the search would rarely try.
  const kernels::BlockPasses* avx2 = kernels::Avx2BlockPasses();
  if (avx2 == nullptr) GTEST_SKIP() << "no AVX2 on this CPU";
  const kernels::BlockPasses& scalar = kernels::ScalarBlockPasses();
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-3.0f, 3.0f);
  kernels::CodeGrid grid;
  for (int k = 0; k < 16; ++k) grid.value[k] = static_cast<float>(kIq4nlGrid[k]);
  for (int k = 0; k < 15; ++k) grid.mid[k] = (grid.value[k] + grid.value[k + 1]) * 0.5f;
  for (int trial = 0; trial < 200; ++trial) {
    const int n = trial % 2 ? 16 : 32;
    std::vector<float> x = Gaussian(n, 100 + trial), w = Gaussian(n, 900 + trial);
    for (float& v : w) v = v * v;
    kernels::BlockCand c[5] = {
        {u(rng), u(rng)}, {0.0f, 0.5f}, {1e-3f, 0.0f}, {-0.1f, 0.0f}, {u(rng), 0.0f}};
    for (bool weighted : {false, true}) {
      for (bool sums : {false, true}) {
        kernels::BlockFit fa[5], fs[5];
        const float* wp = weighted ? w.data() : nullptr;
        scalar.eval_affine(x.data(), wp, n, c, nullptr, 5, -8.0f, 7.0f, sums, fs);
        avx2->eval_affine(x.data(), wp, n, c, nullptr, 5, -8.0f, 7.0f, sums, fa);
        EXPECT_EQ(0, std::memcmp(fs, fa, sizeof(fs))) << trial;
        scalar.eval_symmetric(x.data(), wp, n, c, nullptr, 5, -8.0f, 7.0f, sums, fs);
        avx2->eval_symmetric(x.data(), wp, n, c, nullptr, 5, -8.0f, 7.0f, sums, fa);
        EXPECT_EQ(0, std::memcmp(fs, fa, sizeof(fs))) << trial;
        scalar.eval_grid(x.data(), wp, n, c, nullptr, 5, grid, sums, fs);
        avx2->eval_grid(x.data(), wp, n, c, nullptr, 5, grid, sums, fa);
        EXPECT_EQ(0, std::memcmp(fs, fa, sizeof(fs))) << trial;
      }
      const float* wp = weighted ? w.data() : nullptr;
      kernels::BlockMoments ms, ma;
      scalar.moments(x.data(), wp, n, &ms);
      avx2->moments(x.data(), wp, n, &ma);
      EXPECT_EQ(0, std::memcmp(&ms, &ma, sizeof(ms))) << trial;
      std::vector<float> y = Gaussian(n, 300 + trial);
      EXPECT_EQ(scalar.error_f64(x.data(), wp, y.data(), n),
                avx2->error_f64(x.data(), wp, y.data(), n));
    }
    for (const kernels::BlockCand& cand : c) {
      int8_t qs[32], qa[32];
      scalar.codes_affine(x.data(), n, cand, 0.0f, 15.0f, qs);
      avx2->codes_affine(x.data(), n, cand, 0.0f, 15.0f, qa);
      EXPECT_EQ(0, std::memcmp(qs, qa, static_cast<size_t>(n)));
      scalar.codes_grid(x.data(), n, cand.a, grid, qs);
      avx2->codes_grid(x.data(), n, cand.a, grid, qa);
      EXPECT_EQ(0, std::memcmp(qs, qa, static_cast<size_t>(n)));
    }
    x[3] = trial % 3 == 0 ? std::nanf("") : INFINITY;
    EXPECT_FALSE(scalar.all_finite(x.data(), n));
    EXPECT_FALSE(avx2->all_finite(x.data(), n));
  }
}

TEST(GgufBlocks, BytesDoNotDependOnThreads) {
  const int64_t rows = 40, cols = 768;
  const std::vector<float> x = Gaussian(static_cast<size_t>(rows * cols), 8);
  for (GgmlType t : kAllBlockTypes) {
    if (cols % GetTypeTraits(static_cast<uint32_t>(t))->block_size != 0) continue;
    BlockOptions one, many;
    one.exec.threads = 1;
    many.exec.threads = 2;
    ErrorStats s1, s2;
    EXPECT_EQ(Encode(t, x, rows, cols, one, &s1), Encode(t, x, rows, cols, many, &s2)) << Name(t);
    EXPECT_NEAR(s1.sum_err2, s2.sum_err2, 1e-12 * s1.sum_err2) << Name(t);  // merge order
    EXPECT_EQ(s1.count, rows * cols);
  }
}

// Root-mean-square error bound of each type as a fraction of the data's
// RMS on Gaussian rows: about 20% above what plain rounding gives.
double RelRmsBound(GgmlType t) {
  // Measured (search / reference): Q8_0 .0052/.0054, Q6_K .017/.019, Q5_K
  // .035/.038, 4-bit .071-.082/.078-.086, Q3_K .144/.155, Q2_K .26/.33.
  switch (t) {
    case GgmlType::kQ8_0:
      return 0.0065;
    case GgmlType::kQ6_K:
      return 0.023;
    case GgmlType::kQ5_K:
    case GgmlType::kQ5_0:
    case GgmlType::kQ5_1:
      return 0.046;
    case GgmlType::kQ4_0:
    case GgmlType::kQ4_1:
    case GgmlType::kQ4_K:
    case GgmlType::kIQ4_NL:
    case GgmlType::kIQ4_XS:
      return 0.1;
    case GgmlType::kQ3_K:
      return 0.19;
    case GgmlType::kQ2_K:
      return 0.4;
    default:
      return 0.0;
  }
}

TEST(GgufBlocks, RoundTripErrorWithinTheTypeBound) {
  const int64_t rows = 16, cols = 1024;
  const std::vector<float> x = Gaussian(static_cast<size_t>(rows * cols), 13, 0.02f);
  double x2 = 0.0;
  for (float v : x) x2 += static_cast<double>(v) * v;
  for (GgmlType t : kAllBlockTypes) {
    for (BlockMode mode : {BlockMode::kSearch, BlockMode::kReference}) {
      BlockOptions o;
      o.mode = mode;
      ErrorStats stats;
      const std::vector<float> y = Decode(t, Encode(t, x, rows, cols, o, &stats), rows, cols);
      const double e2 = WeightedError(x, y, cols, nullptr);
      EXPECT_LT(std::sqrt(e2 / x2), RelRmsBound(t)) << Name(t) << " " << BlockModeName(mode);
      EXPECT_NEAR(stats.sum_err2, e2, 1e-9 * e2) << Name(t);
      EXPECT_EQ(stats.count, rows * cols);
    }
  }
}

TEST(GgufBlocks, SearchNeverWorseThanPlainRoundingPerBlock) {
  const int64_t rows = 27, cols = 512;
  const std::vector<float> x = EdgeRows(rows, cols, 33);
  const std::vector<float> w = Importance(cols, 9);
  for (GgmlType t : kAllBlockTypes) {
    const int64_t bs = GetTypeTraits(static_cast<uint32_t>(t))->block_size;
    const std::vector<float> yr = Decode(t, Encode(t, x, rows, cols, Reference()), rows, cols);
    for (bool weighted : {false, true}) {
      BlockOptions o;
      if (weighted) o.importance = w.data();
      const std::vector<float> ys = Decode(t, Encode(t, x, rows, cols, o), rows, cols);
      double total_s = 0.0, total_r = 0.0;
      for (int64_t b = 0; b < rows * cols / bs; ++b) {
        double es = 0.0, er = 0.0;
        for (int64_t i = b * bs; i < (b + 1) * bs; ++i) {
          const double wi = weighted ? w[static_cast<size_t>(i % cols)] : 1.0;
          es += wi * (x[i] - static_cast<double>(ys[i])) * (x[i] - static_cast<double>(ys[i]));
          er += wi * (x[i] - static_cast<double>(yr[i])) * (x[i] - static_cast<double>(yr[i]));
        }
        EXPECT_LE(es, er * (1 + 1e-12)) << Name(t) << " block " << b;
        total_s += es;
        total_r += er;
      }
      // and on ordinary data clearly better
      EXPECT_LT(total_s, total_r) << Name(t) << (weighted ? " weighted" : "");
    }
  }
}

TEST(GgufBlocks, ImportanceLowersTheWeightedError) {
  const int64_t rows = 32, cols = 512;
  const std::vector<float> x = Gaussian(static_cast<size_t>(rows * cols), 17);
  const std::vector<float> w = Importance(cols, 3);
  for (GgmlType t : kAllBlockTypes) {
    BlockOptions weighted;
    weighted.importance = w.data();
    const double ew =
        WeightedError(x, Decode(t, Encode(t, x, rows, cols, weighted), rows, cols), cols, w.data());
    const double eu =
        WeightedError(x, Decode(t, Encode(t, x, rows, cols, {}), rows, cols), cols, w.data());
    EXPECT_LT(ew, eu) << Name(t);
  }
}

TEST(GgufBlocks, EdgeBlocks) {
  for (GgmlType t : kAllBlockTypes) {
    const int64_t bs = GetTypeTraits(static_cast<uint32_t>(t))->block_size;
    // Zeros decode to zeros; a constant block to (almost) itself.
    std::vector<float> zeros(static_cast<size_t>(bs), 0.0f), c(static_cast<size_t>(bs), 0.75f);
    for (float v : Decode(t, Encode(t, zeros, 1, bs, {}), 1, bs)) EXPECT_EQ(v, 0.0f) << Name(t);
    for (float v : Decode(t, Encode(t, c, 1, bs, {}), 1, bs))
      EXPECT_NEAR(v, 0.75f, 0.01f) << Name(t);
    // Subnormal inputs quantize (to about zero) instead of failing.
    std::vector<float> tiny = Gaussian(static_cast<size_t>(bs), 2, 1e-40f);
    for (float v : Decode(t, Encode(t, tiny, 1, bs, {}), 1, bs)) EXPECT_LT(std::fabs(v), 1e-6f);
  }
}

TEST(GgufBlocks, ClearErrors) {
  std::vector<float> x = Gaussian(2 * 512, 1);
  std::vector<uint8_t> out(4096);
  x[512 + 300] = std::nanf("");
  Status st = QuantizeBlocks(GgmlType::kQ6_K, x.data(), 2, 512, out.data());
  EXPECT_EQ(st.code(), StatusCode::kInvalid);
  EXPECT_NE(st.message().find("NaN at index 812 (row 1, column 300)"), std::string::npos)
      << st.message();
  BlockOptions from10;
  from10.first_row = 10;
  x[512 + 300] = -INFINITY;
  st = QuantizeBlocks(GgmlType::kQ6_K, x.data(), 2, 512, out.data(), from10);
  EXPECT_NE(st.message().find("Inf at index 5932 (row 11, column 300)"), std::string::npos)
      << st.message();
  x[512 + 300] = 1e9f;  // beyond the float16 scale of any type
  st = QuantizeBlocks(GgmlType::kQ8_0, x.data(), 2, 512, out.data());
  EXPECT_NE(st.message().find("too large"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("row 1, column 288"), std::string::npos) << st.message();
  // Rows that do not fill whole blocks are refused (the caller picks a type).
  st = QuantizeBlocks(GgmlType::kQ4_K, x.data(), 1, 96, out.data());
  EXPECT_NE(st.message().find("multiple of 256"), std::string::npos) << st.message();
  EXPECT_FALSE(QuantizeBlocks(GgmlType::kQ8_1, x.data(), 1, 32, out.data()).ok());
  // Bad weights, and weights with plain rounding.
  std::vector<float> w(512, 1.0f);
  w[7] = -1.0f;
  BlockOptions o;
  o.importance = w.data();
  st = QuantizeBlocks(GgmlType::kQ4_K, x.data(), 1, 512, out.data(), o);
  EXPECT_NE(st.message().find("column 7"), std::string::npos) << st.message();
  w[7] = 1.0f;
  o.mode = BlockMode::kReference;
  EXPECT_FALSE(QuantizeBlocks(GgmlType::kQ4_K, x.data(), 1, 512, out.data(), o).ok());
}

TEST(GgufBlocks, NamesAndSizes) {
  EXPECT_EQ(*ParseCodecType("q4_k"), GgmlType::kQ4_K);
  EXPECT_EQ(*ParseCodecType("iq4_nl"), GgmlType::kIQ4_NL);
  EXPECT_FALSE(ParseCodecType("Q8_1").ok());
  EXPECT_EQ(*ParseCodecType("q5_1"), GgmlType::kQ5_1);
  EXPECT_EQ(*RowBytes(GgmlType::kQ5_0, 64), 44u);
  EXPECT_EQ(*RowBytes(GgmlType::kQ2_K, 512), 168u);
  EXPECT_EQ(*RowBytes(GgmlType::kQ3_K, 256), 110u);
  EXPECT_EQ(*RowBytes(GgmlType::kQ5_K, 256), 176u);
  EXPECT_EQ(*RowBytes(GgmlType::kIQ4_XS, 256), 136u);
  EXPECT_EQ(*RowBytes(GgmlType::kIQ4_NL, 64), 36u);
  EXPECT_FALSE(RowBytes(GgmlType::kIQ4_XS, 32).ok());
  EXPECT_EQ(*ParseBlockMode("reference"), BlockMode::kReference);
  EXPECT_FALSE(ParseBlockMode("rtn").ok());
}

}  // namespace
}  // namespace arrowquant::gguf
