// The AVX2 path against the scalar reference: identical bytes, parameters,
// dequantized values and error statuses on random data of every input dtype,
// bit width, scheme and group size, plus edge values. Error sums are metrics
// and are compared with a tolerance.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "arrowquant/quantize.h"
#include "kernels/row_kernels.h"

namespace arrowquant::kernels {
namespace {

// Raw bytes of a rows x cols tensor of `dtype`.
struct RawTensor {
  DType dtype;
  int64_t rows, cols;
  std::vector<uint8_t> bytes;
  TensorView view() const { return TensorView{bytes.data(), dtype, rows, cols}; }
};

// Values of a "weight-like" row: normal with a per-row scale, sometimes
// offset, sometimes with a few outliers or exact zeros of either sign.
std::vector<float> WeightLike(std::mt19937& rng, int64_t n) {
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_int_distribution<int> pick(0, 9);
  const float scales[] = {1e-6f, 1e-3f, 0.02f, 1.f, 300.f};
  const float scale = scales[pick(rng) % 5];
  const float offset = pick(rng) == 0 ? 3.f * scale : 0.f;
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) {
    x = normal(rng) * scale + offset;
    const int p = pick(rng);
    if (p == 0 && pick(rng) < 2) x = 0.f;
    if (p == 1 && pick(rng) < 2) x = -0.f;
    if (p == 2 && pick(rng) == 0) x *= 50.f;
  }
  return v;
}

// Either weight-like values rounded to dtype, or random finite bit patterns.
RawTensor RandomTensor(std::mt19937& rng, DType dtype, int64_t rows, int64_t cols,
                       bool bit_patterns) {
  RawTensor t{dtype, rows, cols, {}};
  const int64_t n = rows * cols;
  t.bytes.resize(static_cast<size_t>(n) * DTypeSize(dtype));
  std::uniform_int_distribution<uint32_t> u32;
  std::vector<float> values;
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<float> row = WeightLike(rng, cols);
    values.insert(values.end(), row.begin(), row.end());
  }
  for (int64_t i = 0; i < n; ++i) {
    const float v = values[static_cast<size_t>(i)];
    uint8_t* dst = t.bytes.data() + i * DTypeSize(dtype);
    switch (dtype) {
      case DType::kF32: {
        float f = v;
        if (bit_patterns) {
          // Finite patterns with exponents kept below overflow of max - min.
          uint32_t b;
          do {
            b = u32(rng);
          } while (((b >> 23) & 0xFF) >= 0xFE);
          std::memcpy(&f, &b, sizeof f);
        }
        std::memcpy(dst, &f, sizeof f);
        break;
      }
      case DType::kF16: {
        uint16_t h = FloatToHalf(v);
        if (bit_patterns) {
          do {
            h = static_cast<uint16_t>(u32(rng));
          } while (((h >> 10) & 0x1F) == 0x1F);
        }
        std::memcpy(dst, &h, sizeof h);
        break;
      }
      case DType::kBF16: {
        uint16_t b = static_cast<uint16_t>(std::bit_cast<uint32_t>(v) >> 16);
        if (bit_patterns) {
          do {
            b = static_cast<uint16_t>(u32(rng));
          } while (((b >> 7) & 0xFF) >= 0xFE);
        }
        std::memcpy(dst, &b, sizeof b);
        break;
      }
      case DType::kF8E4M3: {
        uint8_t b;
        do {
          b = static_cast<uint8_t>(u32(rng));
        } while ((b & 0x7F) == 0x7F);
        dst[0] = b;
        break;
      }
      case DType::kF8E5M2: {
        uint8_t b;
        do {
          b = static_cast<uint8_t>(u32(rng));
        } while (((b >> 2) & 0x1F) == 0x1F);
        dst[0] = b;
        break;
      }
      default:
        ADD_FAILURE() << "unexpected dtype";
    }
  }
  return t;
}

struct Output {
  Status status;
  std::vector<uint8_t> packed;
  std::vector<float> scales, zeros, dequant;
  ErrorStats stats;
};

Output RunBoth(const RawTensor& t, const QuantSpec& spec, bool force_scalar, int threads) {
  Output o;
  const int64_t G = GroupsPerRow(t.cols, spec.group_size);
  o.packed.assign(static_cast<size_t>(t.rows * PackedRowBytes(t.cols, spec.bits)), 0xCD);
  o.scales.assign(static_cast<size_t>(t.rows * G), -1.f);
  o.zeros.assign(static_cast<size_t>(t.rows * G), -1.f);
  o.status =
      Quantize(t.view(), spec, QuantizedBuffers{o.packed.data(), o.scales.data(), o.zeros.data()},
               &o.stats, ExecOptions{threads, force_scalar});
  if (o.status.ok()) {
    o.dequant.assign(static_cast<size_t>(t.rows * t.cols), NAN);
    const Status st =
        Dequantize(o.packed.data(), t.rows, t.cols, spec, o.scales.data(), o.zeros.data(),
                   o.dequant.data(), ExecOptions{threads, force_scalar});
    EXPECT_TRUE(st.ok()) << st.ToString();
  }
  return o;
}

std::vector<uint32_t> BitsOf(const std::vector<float>& v) {
  std::vector<uint32_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = std::bit_cast<uint32_t>(v[i]);
  return b;
}

void ExpectClose(double a, double b, double scale, const char* what) {
  if (a == b) return;  // also both infinite (sums of squares of huge values)
  EXPECT_NEAR(a, b, 2e-5 * scale + 1e-300) << what;
}

void ExpectSame(const Output& scalar, const Output& simd, const std::string& ctx) {
  ASSERT_EQ(scalar.status.code(), simd.status.code())
      << ctx << ": " << scalar.status.ToString() << " vs " << simd.status.ToString();
  ASSERT_EQ(scalar.status.message(), simd.status.message()) << ctx;
  if (!scalar.status.ok()) return;
  ASSERT_EQ(scalar.packed, simd.packed) << ctx;
  ASSERT_EQ(BitsOf(scalar.scales), BitsOf(simd.scales)) << ctx;
  ASSERT_EQ(BitsOf(scalar.zeros), BitsOf(simd.zeros)) << ctx;
  ASSERT_EQ(BitsOf(scalar.dequant), BitsOf(simd.dequant)) << ctx;
  const ErrorStats& a = scalar.stats;
  const ErrorStats& b = simd.stats;
  EXPECT_EQ(a.count, b.count) << ctx;
  const double mag = a.sum_x2 + a.sum_xhat2;
  ExpectClose(a.sum_x2, b.sum_x2, a.sum_x2, ctx.c_str());
  ExpectClose(a.sum_xhat2, b.sum_xhat2, a.sum_xhat2, ctx.c_str());
  ExpectClose(a.sum_x_xhat, b.sum_x_xhat, mag, ctx.c_str());
  ExpectClose(a.sum_err2, b.sum_err2, a.sum_err2, ctx.c_str());
  ExpectClose(a.max_abs_err, b.max_abs_err, a.max_abs_err, ctx.c_str());
}

class Avx2Test : public ::testing::Test {
 protected:
  void SetUp() override {
    if (Avx2Kernels() == nullptr) GTEST_SKIP() << "CPU without AVX2 + F16C + FMA";
  }
};

TEST_F(Avx2Test, IsSelectedByDefault) {
  EXPECT_STREQ(ActiveKernelName(), "avx2");
  EXPECT_STREQ(Select(true).name, "scalar");
  EXPECT_EQ(SelectFusedRtn(true), nullptr);
  EXPECT_NE(SelectFusedRtn(false), nullptr);
}

TEST_F(Avx2Test, RandomTensorsAllDtypesBitsSchemesGroups) {
  std::mt19937 rng(20261123);
  const DType dtypes[] = {DType::kF32, DType::kF16, DType::kBF16, DType::kF8E4M3, DType::kF8E5M2};
  const int64_t cols_list[] = {1, 5, 8, 33, 64, 129, 300, 1031};
  const int64_t groups[] = {1, 3, 8, 17, 32, 64, 100, 128, 256, 5000};
  int cases = 0;
  for (DType dtype : dtypes) {
    for (int64_t cols : cols_list) {
      const int64_t rows = 1 + static_cast<int64_t>(rng() % 4);
      const bool patterns = (rng() % 3) == 0;
      const RawTensor t = RandomTensor(rng, dtype, rows, cols, patterns);
      for (int bits : {2, 4, 8}) {
        for (Scheme scheme : {Scheme::kAsymmetric, Scheme::kSymmetric}) {
          for (int64_t g : groups) {
            QuantSpec spec{bits, g, scheme};
            const std::string ctx =
                std::string(DTypeName(dtype)) + " " + std::to_string(rows) + "x" +
                std::to_string(cols) + " bits " + std::to_string(bits) + " g " + std::to_string(g) +
                (scheme == Scheme::kSymmetric ? " sym" : " asym") + (patterns ? " patterns" : "");
            const Output a = RunBoth(t, spec, true, 1);
            const Output b = RunBoth(t, spec, false, 1 + cases % 2);
            ExpectSame(a, b, ctx);
            if (HasFatalFailure()) return;
            ++cases;
          }
        }
      }
    }
  }
  EXPECT_GT(cases, 1000);
}

TEST_F(Avx2Test, LargeRowsAndMultipleThreads) {
  std::mt19937 rng(5);
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
    const RawTensor t = RandomTensor(rng, dtype, 37, 4133, false);
    for (int bits : {2, 4, 8}) {
      for (int64_t g : {32, 128, 4133}) {
        QuantSpec spec{bits, g, Scheme::kAsymmetric};
        ExpectSame(RunBoth(t, spec, true, 1), RunBoth(t, spec, false, 3),
                   std::string(DTypeName(dtype)) + " bits " + std::to_string(bits) + " g " +
                       std::to_string(g));
      }
    }
  }
}

RawTensor FromFloats(const std::vector<float>& v, int64_t rows) {
  RawTensor t{DType::kF32, rows, static_cast<int64_t>(v.size()) / rows, {}};
  t.bytes.resize(v.size() * sizeof(float));
  std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
  return t;
}

void CompareAllSpecs(const std::vector<float>& v, int64_t rows, const std::string& name) {
  for (int bits : {2, 4, 8}) {
    for (Scheme scheme : {Scheme::kAsymmetric, Scheme::kSymmetric}) {
      for (int64_t g : {1, 4, 8, 16, 24, 1000}) {
        QuantSpec spec{bits, g, scheme};
        const RawTensor t = FromFloats(v, rows);
        ExpectSame(RunBoth(t, spec, true, 1), RunBoth(t, spec, false, 1),
                   name + " bits " + std::to_string(bits) + " g " + std::to_string(g));
      }
    }
  }
}

TEST_F(Avx2Test, EdgeValues) {
  const float sub = std::numeric_limits<float>::denorm_min();
  const float fmax = std::numeric_limits<float>::max();
  // Constant groups, signed zeros, subnormals, huge and tiny magnitudes.
  CompareAllSpecs(std::vector<float>(48, 0.f), 2, "zeros");
  CompareAllSpecs(std::vector<float>(48, -0.f), 2, "negative zeros");
  CompareAllSpecs(std::vector<float>(48, 3.25f), 3, "constant");
  CompareAllSpecs(std::vector<float>(48, -1e30f), 1, "constant huge");
  std::vector<float> mixed_zero(48);
  for (size_t i = 0; i < mixed_zero.size(); ++i) mixed_zero[i] = (i % 3) ? -0.f : 0.f;
  CompareAllSpecs(mixed_zero, 2, "mixed signed zeros");
  std::vector<float> subnormal(48);
  for (size_t i = 0; i < subnormal.size(); ++i) {
    subnormal[i] = sub * static_cast<float>(i * 7919 % 1000) * ((i % 2) ? -1.f : 1.f);
  }
  CompareAllSpecs(subnormal, 2, "subnormals");
  std::vector<float> huge(48), tiny(48), ramp(48);
  for (size_t i = 0; i < huge.size(); ++i) {
    huge[i] = 1e30f * std::sin(static_cast<float>(i));
    tiny[i] = 1e-30f * std::cos(static_cast<float>(i));
    ramp[i] = static_cast<float>(i) - 20.f;
  }
  CompareAllSpecs(huge, 2, "huge");
  CompareAllSpecs(tiny, 4, "tiny");
  CompareAllSpecs(ramp, 1, "ramp");
  std::vector<float> near_max(48);
  for (size_t i = 0; i < near_max.size(); ++i) near_max[i] = fmax * (0.25f + 0.01f * (i % 7));
  CompareAllSpecs(near_max, 2, "near max, same sign");
  // max - min overflows float32: an error on both paths, same message.
  std::vector<float> overflow = {fmax, -fmax, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f};
  CompareAllSpecs(overflow, 1, "overflow");
  // ... in a later group of a block, after degenerate (subnormal-range) groups.
  std::vector<float> later(64, 1.f);
  for (size_t i = 0; i < 16; ++i) later[i] = sub * static_cast<float>(i % 4);
  later[41] = fmax;
  later[42] = -fmax;
  CompareAllSpecs(later, 1, "overflow in a later group");
  CompareAllSpecs(later, 2, "overflow in a later group, two rows");
}

TEST_F(Avx2Test, NonFiniteErrorsMatch) {
  std::mt19937 rng(11);
  for (float bad : {NAN, INFINITY, -INFINITY}) {
    for (int64_t pos : {0, 5, 8, 37, 99}) {
      std::vector<float> v = WeightLike(rng, 100);
      v[static_cast<size_t>(pos)] = bad;
      // An overflowing group before the bad value in its row: NaN/Inf
      // still wins (the scalar path checks the row before its groups).
      std::vector<float> w = v;
      const size_t row_start = static_cast<size_t>(pos / 50 * 50);
      if (pos - static_cast<int64_t>(row_start) >= 8) {
        w[row_start] = std::numeric_limits<float>::max();
        w[row_start + 1] = -std::numeric_limits<float>::max();
      }
      for (const auto& x : {v, w}) {
        const RawTensor t = FromFloats(x, 2);
        QuantSpec spec{4, 8, Scheme::kAsymmetric};
        const Output a = RunBoth(t, spec, true, 1);
        const Output b = RunBoth(t, spec, false, 1);
        ASSERT_FALSE(a.status.ok());
        EXPECT_EQ(a.status.message(), b.status.message());
        EXPECT_NE(a.status.message().find("index " + std::to_string(pos)), std::string::npos)
            << a.status.message();
      }
    }
  }
  // float16 Inf and NaN.
  for (uint16_t h : {uint16_t{0x7C00}, uint16_t{0xFC00}, uint16_t{0x7E00}}) {
    RawTensor t{DType::kF16, 3, 20, std::vector<uint8_t>(120, 0)};
    std::memcpy(t.bytes.data() + 2 * 47, &h, 2);
    QuantSpec spec{8, 16, Scheme::kSymmetric};
    const Output a = RunBoth(t, spec, true, 1);
    const Output b = RunBoth(t, spec, false, 2);
    ASSERT_FALSE(a.status.ok());
    EXPECT_EQ(a.status.message(), b.status.message());
    EXPECT_NE(a.status.message().find("index 47 (row 2, column 7)"), std::string::npos)
        << a.status.message();
  }
}

// The four RowKernels operations one by one.
TEST_F(Avx2Test, KernelOperationsMatchScalar) {
  const RowKernels& s = ScalarKernels();
  const RowKernels& v = *Avx2Kernels();
  std::mt19937 rng(99);
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBF16, DType::kF8E4M3, DType::kF8E5M2}) {
    for (int64_t cols : {1, 7, 8, 9, 63, 200, 515, 2000}) {
      for (bool patterns : {false, true}) {
        const RawTensor t = RandomTensor(rng, dtype, 1, cols, patterns);
        std::vector<float> xs(static_cast<size_t>(cols)), xv(static_cast<size_t>(cols));
        s.convert(dtype, t.bytes.data(), xs.data(), xs.size());
        v.convert(dtype, t.bytes.data(), xv.data(), xv.size());
        ASSERT_EQ(BitsOf(xs), BitsOf(xv)) << DTypeName(dtype) << " cols " << cols;
        for (int bits : {2, 4, 8}) {
          for (Scheme scheme : {Scheme::kAsymmetric, Scheme::kSymmetric}) {
            for (int64_t g : {1, 5, 32, 1000}) {
              const QuantSpec spec{bits, g, scheme};
              const int64_t G = GroupsPerRow(cols, g);
              std::vector<float> ss(G), zs(G), sv(G), zv(G);
              const Status sts = s.choose_params(xs.data(), cols, spec, ss.data(), zs.data(), 7);
              const Status stv = v.choose_params(xs.data(), cols, spec, sv.data(), zv.data(), 7);
              ASSERT_EQ(sts.ok(), stv.ok()) << sts.ToString() << " vs " << stv.ToString();
              ASSERT_EQ(sts.message(), stv.message());
              if (!sts.ok()) continue;  // max - min overflowed (bit patterns)
              ASSERT_EQ(BitsOf(ss), BitsOf(sv));
              ASSERT_EQ(BitsOf(zs), BitsOf(zv));
              const int64_t nb = PackedRowBytes(cols, bits);
              std::vector<uint8_t> ps(nb, 0x11), pv(nb, 0x77);
              ErrorStats es, ev;
              s.encode(xs.data(), cols, spec, ss.data(), zs.data(), ps.data(), &es);
              v.encode(xs.data(), cols, spec, ss.data(), zs.data(), pv.data(), &ev);
              ASSERT_EQ(ps, pv) << DTypeName(dtype) << " cols " << cols << " bits " << bits;
              EXPECT_EQ(es.count, ev.count);
              ExpectClose(es.sum_x2, ev.sum_x2, es.sum_x2, "encode sum_x2");
              ExpectClose(es.sum_xhat2, ev.sum_xhat2, es.sum_xhat2, "encode sum_xhat2");
              ExpectClose(es.sum_err2, ev.sum_err2, es.sum_err2, "encode sum_err2");
              ExpectClose(es.max_abs_err, ev.max_abs_err, es.max_abs_err, "encode max_abs_err");
              // Without error sums too.
              std::fill(pv.begin(), pv.end(), 0x55);
              v.encode(xs.data(), cols, spec, ss.data(), zs.data(), pv.data(), nullptr);
              ASSERT_EQ(ps, pv);
              std::vector<float> ds(cols), dv(cols);
              s.decode(ps.data(), cols, spec, ss.data(), zs.data(), ds.data());
              v.decode(ps.data(), cols, spec, ss.data(), zs.data(), dv.data());
              ASSERT_EQ(BitsOf(ds), BitsOf(dv));
            }
          }
        }
      }
    }
  }
}

// QuantizeWithParams (caller's parameters) goes through convert + encode.
TEST_F(Avx2Test, GivenParamsMatchScalar) {
  std::mt19937 rng(4);
  std::uniform_real_distribution<float> u(0.001f, 2.f);
  const RawTensor t = RandomTensor(rng, DType::kF16, 5, 77, false);
  for (int bits : {2, 4, 8}) {
    const QuantSpec spec{bits, 16, Scheme::kAsymmetric};
    const int64_t G = GroupsPerRow(77, 16);
    std::vector<float> scales(5 * G), zeros(5 * G);
    for (float& s : scales) s = u(rng) * 1e-3f;
    for (float& z : zeros) z = u(rng) * 4.f;
    const int64_t nb = 5 * PackedRowBytes(77, bits);
    std::vector<uint8_t> a(nb), b(nb);
    ErrorStats ea, eb;
    ASSERT_TRUE(QuantizeWithParams(t.view(), spec, scales.data(), zeros.data(), a.data(), &ea,
                                   ExecOptions{1, true})
                    .ok());
    ASSERT_TRUE(QuantizeWithParams(t.view(), spec, scales.data(), zeros.data(), b.data(), &eb,
                                   ExecOptions{2, false})
                    .ok());
    EXPECT_EQ(a, b);
    ExpectClose(ea.sum_err2, eb.sum_err2, ea.sum_err2, "sum_err2");
  }
}

// Error sums do not depend on thread timing: same thread count, same bits.
TEST_F(Avx2Test, ErrorSumsDeterministic) {
  std::mt19937 rng(8);
  const RawTensor t = RandomTensor(rng, DType::kF32, 300, 257, false);
  const QuantSpec spec{4, 32, Scheme::kAsymmetric};
  const Output first = RunBoth(t, spec, false, 4);
  for (int i = 0; i < 5; ++i) {
    const Output again = RunBoth(t, spec, false, 4);
    EXPECT_EQ(first.stats.sum_x2, again.stats.sum_x2);
    EXPECT_EQ(first.stats.sum_err2, again.stats.sum_err2);
    EXPECT_EQ(first.stats.sum_x_xhat, again.stats.sum_x_xhat);
  }
}

}  // namespace
}  // namespace arrowquant::kernels
