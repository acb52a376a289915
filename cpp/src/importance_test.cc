#include "arrowquant/importance.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "arrowquant/dtype.h"

namespace arrowquant {
namespace {

struct Params {
  std::vector<float> scales, zeros;
  Status status;
};

Params Search(const std::vector<float>& x, const std::vector<float>& w, int64_t rows, int64_t cols,
              const QuantSpec& spec, const ImportanceOptions& opts = {}, ExecOptions exec = {}) {
  Params p;
  const int64_t G = GroupsPerRow(cols, spec.group_size);
  p.scales.assign(static_cast<size_t>(rows * G), -1.0f);
  p.zeros.assign(static_cast<size_t>(rows * G), -1.0f);
  p.status = ImportanceSearchParams(TensorView{x.data(), DType::kF32, rows, cols}, spec, w.data(),
                                    p.scales.data(), p.zeros.data(), opts, exec);
  return p;
}

Params Rtn(const std::vector<float>& x, int64_t rows, int64_t cols, const QuantSpec& spec) {
  Params p;
  const int64_t G = GroupsPerRow(cols, spec.group_size);
  p.scales.assign(static_cast<size_t>(rows * G), 0.0f);
  p.zeros.assign(static_cast<size_t>(rows * G), 0.0f);
  std::vector<uint8_t> packed(static_cast<size_t>(rows * PackedRowBytes(cols, spec.bits)));
  p.status = Quantize(TensorView{x.data(), DType::kF32, rows, cols}, spec,
                      QuantizedBuffers{packed.data(), p.scales.data(), p.zeros.data()}, nullptr);
  return p;
}

// Weighted error of every group from the dequantized values that the engine
// itself produces (QuantizeWithParams + Dequantize), not from the search's
// own evaluation, so that the guarantee is checked end to end.
std::vector<double> GroupErrors(const std::vector<float>& x, const std::vector<float>& w,
                                int64_t rows, int64_t cols, const QuantSpec& spec,
                                const Params& p) {
  std::vector<uint8_t> packed(static_cast<size_t>(rows * PackedRowBytes(cols, spec.bits)));
  EXPECT_TRUE(QuantizeWithParams(TensorView{x.data(), DType::kF32, rows, cols}, spec,
                                 p.scales.data(), p.zeros.data(), packed.data(), nullptr)
                  .ok());
  std::vector<float> xhat(static_cast<size_t>(rows * cols));
  EXPECT_TRUE(
      Dequantize(packed.data(), rows, cols, spec, p.scales.data(), p.zeros.data(), xhat.data())
          .ok());
  const int64_t G = GroupsPerRow(cols, spec.group_size);
  std::vector<double> err(static_cast<size_t>(rows * G), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const double e = static_cast<double>(x[r * cols + c]) - xhat[r * cols + c];
      err[r * G + c / spec.group_size] += w[c] * e * e;
    }
  }
  return err;
}

std::vector<float> Gaussian(size_t n, uint32_t seed, float sigma = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, sigma);
  std::vector<float> v(n);
  for (float& e : v) e = d(gen);
  return v;
}

std::vector<float> Importance(int64_t cols, uint32_t seed) {
  std::mt19937 gen(seed);
  std::lognormal_distribution<float> d(0.0f, 1.5f);
  std::vector<float> w(static_cast<size_t>(cols));
  for (float& e : w) e = d(gen);
  return w;
}

class NeverWorse : public ::testing::TestWithParam<std::tuple<int, Scheme>> {};

// The central guarantee: on every group the weighted error is at most rtn's,
// and over the tensor it is clearly lower.
TEST_P(NeverWorse, EveryGroupAtMostRtn) {
  const auto [bits, scheme] = GetParam();
  const int64_t rows = 16, cols = 200;  // 200 = 3 * 64 + a short group of 8
  QuantSpec spec{bits, 64, scheme};
  std::vector<float> x = Gaussian(static_cast<size_t>(rows * cols), 7);
  for (int64_t r = 0; r < rows; ++r) x[r * cols + 5] *= 8.0f;  // an outlier column
  std::vector<float> w = Importance(cols, 11);
  Params rtn = Rtn(x, rows, cols, spec);
  Params imp = Search(x, w, rows, cols, spec);
  ASSERT_TRUE(rtn.status.ok());
  ASSERT_TRUE(imp.status.ok()) << imp.status.ToString();
  std::vector<double> e_rtn = GroupErrors(x, w, rows, cols, spec, rtn);
  std::vector<double> e_imp = GroupErrors(x, w, rows, cols, spec, imp);
  double t_rtn = 0, t_imp = 0;
  for (size_t i = 0; i < e_rtn.size(); ++i) {
    EXPECT_LE(e_imp[i], e_rtn[i]) << "group " << i;
    t_rtn += e_rtn[i];
    t_imp += e_imp[i];
  }
  const double factor = bits < 8 ? 0.9 : 1.0;  // INT8 gains less: only require progress
  EXPECT_LT(t_imp, factor * t_rtn);
}

INSTANTIATE_TEST_SUITE_P(Widths, NeverWorse,
                         ::testing::Combine(::testing::Values(2, 4, 8),
                                            ::testing::Values(Scheme::kAsymmetric,
                                                              Scheme::kSymmetric)));

// The search's own error evaluation agrees with the engine's dequantization.
TEST(Importance, EvaluationMatchesEngine) {
  const int64_t cols = 64;
  QuantSpec spec{4, 64, Scheme::kAsymmetric};
  std::vector<float> x = Gaussian(cols, 3);
  std::vector<float> w = Importance(cols, 4);
  Params p = Search(x, w, 1, cols, spec);
  ASSERT_TRUE(p.status.ok());
  const double own =
      WeightedGroupError(x.data(), w.data(), cols, 4, Scheme::kAsymmetric, p.scales[0], p.zeros[0]);
  const double engine = GroupErrors(x, w, 1, cols, spec, p)[0];
  EXPECT_NEAR(own, engine, 1e-9 * std::max(1.0, engine));
}

// A heavily weighted element ends up with a smaller error than under rtn.
TEST(Importance, HeavyWeightIsProtected) {
  const int64_t cols = 128;
  QuantSpec spec{2, 128, Scheme::kAsymmetric};
  std::vector<float> x = Gaussian(cols, 21);
  std::vector<float> w(cols, 1.0f);
  const int64_t hot = 17;
  w[hot] = 1000.0f;
  Params rtn = Rtn(x, 1, cols, spec);
  Params imp = Search(x, w, 1, cols, spec);
  ASSERT_TRUE(imp.status.ok());
  auto err_at = [&](const Params& p) {
    std::vector<float> one(cols, 0.0f);
    one[hot] = 1.0f;
    return GroupErrors(x, one, 1, cols, spec, p)[0];
  };
  EXPECT_LT(err_at(imp), err_at(rtn));
  EXPECT_LT(err_at(imp), 1e-3 * (1.0 + err_at(rtn)));
}

TEST(Importance, ZeroWeightsKeepRtn) {
  const int64_t rows = 3, cols = 96;
  QuantSpec spec{4, 32, Scheme::kAsymmetric};
  std::vector<float> x = Gaussian(static_cast<size_t>(rows * cols), 5);
  std::vector<float> w(cols, 0.0f);
  Params rtn = Rtn(x, rows, cols, spec);
  Params imp = Search(x, w, rows, cols, spec);
  ASSERT_TRUE(imp.status.ok());
  EXPECT_EQ(imp.scales, rtn.scales);
  EXPECT_EQ(imp.zeros, rtn.zeros);
}

TEST(Importance, DeterministicAcrossThreads) {
  const int64_t rows = 64, cols = 300;
  QuantSpec spec{4, 128, Scheme::kAsymmetric};
  std::vector<float> x = Gaussian(static_cast<size_t>(rows * cols), 9);
  std::vector<float> w = Importance(cols, 10);
  Params one = Search(x, w, rows, cols, spec, {}, ExecOptions{1, false});
  Params many = Search(x, w, rows, cols, spec, {}, ExecOptions{4, false});
  Params scalar = Search(x, w, rows, cols, spec, {}, ExecOptions{3, true});
  ASSERT_TRUE(one.status.ok() && many.status.ok() && scalar.status.ok());
  EXPECT_EQ(one.scales, many.scales);
  EXPECT_EQ(one.zeros, many.zeros);
  EXPECT_EQ(one.scales, scalar.scales);
}

TEST(Importance, Float16ParamsAreRepresentable) {
  const int64_t cols = 128;
  QuantSpec spec{4, 64, Scheme::kAsymmetric, Method::kRtn, ParamDType::kF16};
  std::vector<float> x = Gaussian(cols, 12);
  std::vector<float> w = Importance(cols, 13);
  Params p = Search(x, w, 1, cols, spec);
  ASSERT_TRUE(p.status.ok());
  for (size_t i = 0; i < p.scales.size(); ++i) {
    EXPECT_EQ(p.scales[i], HalfToFloat(FloatToHalf(p.scales[i])));
    EXPECT_EQ(p.zeros[i], HalfToFloat(FloatToHalf(p.zeros[i])));
  }
}

TEST(Importance, Float16InputMatchesFloat32OfSameValues) {
  const int64_t rows = 4, cols = 64;
  QuantSpec spec{4, 32, Scheme::kAsymmetric};
  std::vector<float> x = Gaussian(static_cast<size_t>(rows * cols), 14);
  std::vector<uint16_t> h(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    h[i] = FloatToHalf(x[i]);
    x[i] = HalfToFloat(h[i]);
  }
  std::vector<float> w = Importance(cols, 15);
  Params from_f32 = Search(x, w, rows, cols, spec);
  Params from_f16;
  from_f16.scales.assign(from_f32.scales.size(), 0.0f);
  from_f16.zeros.assign(from_f32.zeros.size(), 0.0f);
  ASSERT_TRUE(ImportanceSearchParams(TensorView{h.data(), DType::kF16, rows, cols}, spec, w.data(),
                                     from_f16.scales.data(), from_f16.zeros.data())
                  .ok());
  EXPECT_EQ(from_f32.scales, from_f16.scales);
  EXPECT_EQ(from_f32.zeros, from_f16.zeros);
}

TEST(Importance, RejectsBadImportance) {
  QuantSpec spec{4, 4, Scheme::kAsymmetric};
  std::vector<float> x = {1.f, 2.f, 3.f, 4.f};
  Params neg = Search(x, {1.f, -1.f, 1.f, 1.f}, 1, 4, spec);
  EXPECT_EQ(neg.status.code(), StatusCode::kInvalid);
  EXPECT_NE(neg.status.message().find("column 1"), std::string::npos);
  Params nan = Search(x, {1.f, 1.f, NAN, 1.f}, 1, 4, spec);
  EXPECT_EQ(nan.status.code(), StatusCode::kInvalid);
}

TEST(Importance, NanInDataNamesIndex) {
  QuantSpec spec{4, 4, Scheme::kAsymmetric};
  std::vector<float> x = {1.f, 2.f, 3.f, 4.f, 5.f, NAN, 7.f, 8.f};
  Params p = Search(x, {1.f, 1.f, 1.f, 1.f}, 2, 4, spec);
  EXPECT_EQ(p.status.code(), StatusCode::kInvalid);
  EXPECT_NE(p.status.message().find("index 5"), std::string::npos) << p.status.message();
}

TEST(Importance, RejectsBadOptions) {
  ImportanceOptions o;
  o.max_clip = 1.0f;
  EXPECT_FALSE(ValidateImportanceOptions(o).ok());
  o = {};
  o.grid_steps = -1;
  EXPECT_FALSE(ValidateImportanceOptions(o).ok());
}

// QuantizeImportance writes the searched parameters and codes that the plain
// QuantizeWithParams gives for them.
TEST(Importance, QuantizeUsesSearchedParams) {
  const int64_t rows = 5, cols = 70;
  QuantSpec spec{4, 32, Scheme::kSymmetric};
  std::vector<float> x = Gaussian(static_cast<size_t>(rows * cols), 16);
  std::vector<float> w = Importance(cols, 17);
  Params p = Search(x, w, rows, cols, spec);
  const int64_t G = GroupsPerRow(cols, spec.group_size);
  std::vector<uint8_t> packed(static_cast<size_t>(rows * PackedRowBytes(cols, 4)));
  std::vector<uint8_t> expect(packed.size());
  std::vector<float> s(static_cast<size_t>(rows * G)), z(s.size());
  ErrorStats stats;
  ASSERT_TRUE(QuantizeImportance(TensorView{x.data(), DType::kF32, rows, cols}, spec, w.data(),
                                 QuantizedBuffers{packed.data(), s.data(), z.data()}, &stats)
                  .ok());
  ASSERT_TRUE(QuantizeWithParams(TensorView{x.data(), DType::kF32, rows, cols}, spec,
                                 p.scales.data(), p.zeros.data(), expect.data(), nullptr)
                  .ok());
  EXPECT_EQ(s, p.scales);
  EXPECT_EQ(z, p.zeros);
  EXPECT_EQ(packed, expect);
  EXPECT_EQ(stats.count, rows * cols);
}

}  // namespace
}  // namespace arrowquant
