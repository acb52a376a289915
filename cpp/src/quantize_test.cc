#include "arrowquant/quantize.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

namespace arrowquant {
namespace {

struct Quantized {
  std::vector<uint8_t> packed;
  std::vector<float> scales, zeros;
  ErrorStats stats;
  Status status;
};

Quantized RunQuantize(const std::vector<float>& x, int64_t rows, int64_t cols, QuantSpec spec,
                      ExecOptions exec = {}) {
  Quantized q;
  const int64_t G = GroupsPerRow(cols, spec.group_size);
  q.packed.assign(static_cast<size_t>(rows * PackedRowBytes(cols, spec.bits)), 0xAB);
  q.scales.assign(static_cast<size_t>(rows * G), 0.0f);
  q.zeros.assign(static_cast<size_t>(rows * G), 0.0f);
  q.status =
      Quantize(TensorView{x.data(), DType::kF32, rows, cols}, spec,
               QuantizedBuffers{q.packed.data(), q.scales.data(), q.zeros.data()}, &q.stats, exec);
  return q;
}

// Hand-computed from FORMAT.md: group [0, 1, 2, 3] at INT2 asymmetric:
// lo 0, hi 3, scale 1, zero 0, codes 0 1 2 3 -> byte 0b11100100 = 0xE4.
TEST(Quantize, KnownAnswerInt2) {
  QuantSpec spec{2, 4, Scheme::kAsymmetric};
  Quantized q = RunQuantize({0.f, 1.f, 2.f, 3.f}, 1, 4, spec);
  ASSERT_TRUE(q.status.ok()) << q.status.ToString();
  EXPECT_EQ(q.scales[0], 1.0f);
  EXPECT_EQ(q.zeros[0], 0.0f);
  EXPECT_EQ(q.packed[0], 0xE4);
}

// Group [0, 2.5, 7.5, 15] INT4 asym: scale 15/15 = 1, zero -0/1 = -0; codes
// rint(0) = 0, rint(2.5) = 2 and rint(7.5) = 8 (half to even), 15.
// Packed: byte0 = 0 | 2<<4 = 0x20, byte1 = 8 | 15<<4 = 0xF8.
TEST(Quantize, KnownAnswerInt4HalfToEven) {
  QuantSpec spec{4, 4, Scheme::kAsymmetric};
  Quantized q = RunQuantize({0.f, 2.5f, 7.5f, 15.f}, 1, 4, spec);
  ASSERT_TRUE(q.status.ok());
  EXPECT_EQ(q.scales[0], 1.0f);
  EXPECT_EQ(q.zeros[0], 0.0f);
  EXPECT_EQ(q.packed[0], 0x20);
  EXPECT_EQ(q.packed[1], 0xF8);
}

// Symmetric INT8: a = 127 -> scale 1, zero 128; x = -127, 0, 5.5 (-> 6, even), 127.
TEST(Quantize, KnownAnswerSymmetricInt8) {
  QuantSpec spec{8, 4, Scheme::kSymmetric};
  Quantized q = RunQuantize({-127.f, 0.f, 5.5f, 127.f}, 1, 4, spec);
  ASSERT_TRUE(q.status.ok());
  EXPECT_EQ(q.scales[0], 1.0f);
  EXPECT_EQ(q.zeros[0], 128.0f);
  EXPECT_EQ(q.packed[0], 1);
  EXPECT_EQ(q.packed[1], 128);
  EXPECT_EQ(q.packed[2], 134);
  EXPECT_EQ(q.packed[3], 255);
}

TEST(Quantize, ShortLastGroupAndRowPadding) {
  // cols 5, group 4, INT4: groups [4, 1]; row takes 3 bytes, top nibble zero.
  QuantSpec spec{4, 4, Scheme::kAsymmetric};
  Quantized q = RunQuantize({0.f, 1.f, 2.f, 3.f, 7.f, 0.f, 1.f, 2.f, 3.f, -7.f}, 2, 5, spec);
  ASSERT_TRUE(q.status.ok());
  ASSERT_EQ(q.packed.size(), 6u);
  ASSERT_EQ(q.scales.size(), 4u);
  // Constant single-element group: scale 1, zero -lo, code rint(7 - 7) = 0.
  EXPECT_EQ(q.scales[1], 1.0f);
  EXPECT_EQ(q.zeros[1], -7.0f);
  EXPECT_EQ(q.packed[2] & 0xF0, 0);
  EXPECT_EQ(q.packed[5] & 0xF0, 0);
}

TEST(Quantize, RejectsNaNWithIndex) {
  QuantSpec spec{4, 2, Scheme::kAsymmetric};
  std::vector<float> x = {1.f, 2.f, 3.f, NAN};
  Quantized q = RunQuantize(x, 2, 2, spec);
  ASSERT_FALSE(q.status.ok());
  EXPECT_EQ(q.status.code(), StatusCode::kInvalid);
  EXPECT_NE(q.status.message().find("index 3"), std::string::npos) << q.status.message();
}

TEST(Quantize, RejectsBadSpec) {
  EXPECT_FALSE(ValidateSpec(QuantSpec{3, 32, Scheme::kAsymmetric}).ok());
  EXPECT_FALSE(ValidateSpec(QuantSpec{4, 0, Scheme::kAsymmetric}).ok());
}

TEST(Quantize, ErrorBoundAndDequantize) {
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.f, 1.f);
  const int64_t rows = 64, cols = 300;
  std::vector<float> x(static_cast<size_t>(rows * cols));
  for (float& v : x) v = dist(rng);
  for (int bits : {2, 4, 8}) {
    QuantSpec spec{bits, 128, Scheme::kAsymmetric};
    Quantized q = RunQuantize(x, rows, cols, spec);
    ASSERT_TRUE(q.status.ok());
    std::vector<float> out(x.size());
    ASSERT_TRUE(
        Dequantize(q.packed.data(), rows, cols, spec, q.scales.data(), q.zeros.data(), out.data())
            .ok());
    const int64_t G = GroupsPerRow(cols, 128);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        const float s = q.scales[r * G + c / 128];
        ASSERT_LE(std::fabs(x[r * cols + c] - out[r * cols + c]), s * 0.5f * (1 + 1e-5f));
      }
    }
    const ErrorMetrics m = FinalizeMetrics(q.stats);
    if (bits == 4) {
      EXPECT_GT(m.cosine, 0.99);
    }
    if (bits == 8) {
      EXPECT_GT(m.cosine, 0.9999);
    }
  }
}

TEST(Quantize, ThreadsGiveIdenticalBytes) {
  std::mt19937 rng(3);
  std::normal_distribution<float> dist(0.f, 2.f);
  const int64_t rows = 257, cols = 1000;
  std::vector<float> x(static_cast<size_t>(rows * cols));
  for (float& v : x) v = dist(rng);
  QuantSpec spec{4, 64, Scheme::kAsymmetric};
  Quantized one = RunQuantize(x, rows, cols, spec, ExecOptions{1, false});
  Quantized four = RunQuantize(x, rows, cols, spec, ExecOptions{4, false});
  Quantized scalar = RunQuantize(x, rows, cols, spec, ExecOptions{3, true});
  EXPECT_EQ(one.packed, four.packed);
  EXPECT_EQ(one.scales, four.scales);
  EXPECT_EQ(one.packed, scalar.packed);
  EXPECT_EQ(one.zeros, scalar.zeros);
}

// Error sums are merged from fixed row blocks, so the totals (floating-point
// sums of values spread over many magnitudes) do not depend on the thread count.
TEST(Quantize, ThreadsGiveIdenticalErrorSums) {
  std::mt19937 rng(11);
  std::student_t_distribution<float> dist(2.f);
  std::uniform_real_distribution<float> scale(-20.f, 20.f);
  const int64_t rows = 1500, cols = 200;
  std::vector<float> x(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    const float s = std::exp(scale(rng));
    for (int64_t c = 0; c < cols; ++c) x[r * cols + c] = dist(rng) * s;
  }
  QuantSpec spec{4, 50, Scheme::kAsymmetric};
  Quantized one = RunQuantize(x, rows, cols, spec, ExecOptions{1, false});
  for (int threads : {2, 3, 8}) {
    Quantized many = RunQuantize(x, rows, cols, spec, ExecOptions{threads, false});
    ASSERT_TRUE(many.status.ok());
    EXPECT_EQ(one.stats.sum_x2, many.stats.sum_x2) << threads;
    EXPECT_EQ(one.stats.sum_xhat2, many.stats.sum_xhat2) << threads;
    EXPECT_EQ(one.stats.sum_x_xhat, many.stats.sum_x_xhat) << threads;
    EXPECT_EQ(one.stats.sum_err2, many.stats.sum_err2) << threads;
    EXPECT_EQ(one.stats.count, many.stats.count) << threads;
  }
}

// A view of rows of a larger tensor reports a NaN where it is in the whole
// tensor: row_offset + row, and the index counted from the tensor's start.
TEST(Quantize, NonFinitePositionCountsFromTheRowOffset) {
  const int64_t rows = 3, cols = 8;
  std::vector<float> x(static_cast<size_t>(rows * cols), 0.5f);
  x[2 * cols + 5] = std::nanf("");
  for (Method method : {Method::kRtn, Method::kMse}) {
    for (bool force_scalar : {false, true}) {
      QuantSpec spec{4, 4, Scheme::kAsymmetric, method};
      std::vector<uint8_t> packed(static_cast<size_t>(rows * PackedRowBytes(cols, 4)));
      std::vector<float> s(static_cast<size_t>(rows * 2)), z(s.size());
      TensorView view{x.data(), DType::kF32, rows, cols, /*row_offset=*/1000};
      Status st = Quantize(view, spec, QuantizedBuffers{packed.data(), s.data(), z.data()}, nullptr,
                           ExecOptions{1, force_scalar});
      EXPECT_EQ(st.message(), "NaN at index 8021 (row 1002, column 5)");
    }
  }
}

}  // namespace
}  // namespace arrowquant
