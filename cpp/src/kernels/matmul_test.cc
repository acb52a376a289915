// The quantized matmul against dequantize + a float64 matmul, within the
// bound of arrowquant/matmul.h, on every path (scalar, AVX2; GEMV, GEMM),
// bit width, parameter storage (float32, float16, superblock), scheme,
// group size (multiples of 16 take the fused GEMV, others the decoded one),
// input dtype, equalization and bias; and a check that the bound is tight
// enough to catch a single wrong code.
#include "arrowquant/matmul.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "arrowquant/quantize.h"
#include "kernels/matmul_kernels.h"

namespace arrowquant {
namespace {

uint16_t ToBf16(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// A quantized matrix with every buffer it points to.
struct Fixture {
  int64_t rows = 0, cols = 0;
  QuantSpec spec;
  ParamStorage storage = ParamStorage::kF32;
  std::vector<uint8_t> packed;
  std::vector<float> scales, zeros;  // expanded per-group float32
  std::vector<uint16_t> s16, z16;    // kF16 storage / superblock units
  std::vector<uint8_t> stream;       // superblock param codes
  std::vector<float> input_scales;
  std::vector<float> w_hat;  // dequantized / s (the reference weight)

  QuantMatrix matrix() const {
    QuantMatrix w;
    w.codes = packed.data();
    w.rows = rows;
    w.cols = cols;
    w.bits = spec.bits;
    w.group_size = spec.group_size;
    w.params = storage;
    if (storage == ParamStorage::kF32) {
      w.scales = scales.data();
      w.zero_points = zeros.data();
    } else {
      w.scales = s16.data();
      w.zero_points = z16.data();
    }
    if (storage == ParamStorage::kSuperblock) {
      w.param_codes = stream.data();
      w.param_code_bits = SuperblockCodeBits(spec.bits);
      w.superblock_groups = SuperblockGroups(spec.group_size);
    }
    w.input_scales = input_scales.empty() ? nullptr : input_scales.data();
    return w;
  }

  uint32_t Code(int64_t r, int64_t c) const {
    const int b = spec.bits;
    const uint8_t* row = packed.data() + r * PackedRowBytes(cols, b);
    return (row[(c * b) >> 3] >> ((c * b) & 7)) & ((1u << b) - 1u);
  }
};

void PackStream(const std::vector<uint32_t>& codes, int p, std::vector<uint8_t>* out) {
  out->assign((codes.size() * p + 7) / 8, 0);
  for (size_t k = 0; k < codes.size(); ++k) {
    for (int i = 0; i < p; ++i) {
      const size_t bit = k * p + i;
      if ((codes[k] >> i) & 1u) (*out)[bit >> 3] |= static_cast<uint8_t>(1u << (bit & 7));
    }
  }
}

Fixture Make(std::mt19937& rng, int64_t rows, int64_t cols, int bits, int64_t g,
             ParamStorage storage, Scheme scheme, bool equalize) {
  Fixture f;
  f.rows = rows;
  f.cols = cols;
  f.storage = storage;
  f.spec.bits = bits;
  f.spec.group_size = g;
  f.spec.scheme = scheme;
  f.spec.param_dtype = storage == ParamStorage::kF32   ? ParamDType::kF32
                       : storage == ParamStorage::kF16 ? ParamDType::kF16
                                                       : ParamDType::kSuperblock;
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> w(static_cast<size_t>(rows * cols));
  for (auto& v : w) v = normal(rng) * 0.05f + (rng() % 7 == 0 ? 0.02f : 0.f);
  const int64_t G = GroupsPerRow(cols, g);
  f.packed.assign(static_cast<size_t>(rows * PackedRowBytes(cols, bits)), 0);
  f.scales.assign(static_cast<size_t>(rows * G), 0.f);
  f.zeros.assign(static_cast<size_t>(rows * G), 0.f);
  const int64_t S = SuperblocksPerRow(cols, g);
  std::vector<float> d(static_cast<size_t>(rows * S)), dz(static_cast<size_t>(rows * S));
  QuantizedBuffers out{f.packed.data(), f.scales.data(), f.zeros.data(), d.data(), dz.data()};
  const Status st =
      Quantize(TensorView{w.data(), DType::kF32, rows, cols}, f.spec, out, nullptr, {1, true});
  EXPECT_TRUE(st.ok()) << st.message();
  if (storage == ParamStorage::kF16) {
    for (float v : f.scales) f.s16.push_back(FloatToHalf(v));
    for (float v : f.zeros) f.z16.push_back(FloatToHalf(v));
  } else if (storage == ParamStorage::kSuperblock) {
    const int64_t K = SuperblockGroups(g);
    std::vector<uint32_t> codes;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < G; ++j) {
        const float du = d[r * S + j / K], zu = dz[r * S + j / K];
        codes.push_back(static_cast<uint32_t>(f.scales[r * G + j] / du));
        codes.push_back(zu > 0 ? static_cast<uint32_t>(f.zeros[r * G + j] / zu) : 0u);
      }
    }
    PackStream(codes, SuperblockCodeBits(bits), &f.stream);
    for (float v : d) f.s16.push_back(FloatToHalf(v));
    for (float v : dz) f.z16.push_back(FloatToHalf(v));
  }
  if (equalize) {
    std::uniform_real_distribution<float> u(0.25f, 4.f);
    for (int64_t c = 0; c < cols; ++c) f.input_scales.push_back(u(rng));
  }
  f.w_hat.assign(static_cast<size_t>(rows * cols), 0.f);
  EXPECT_TRUE(Dequantize(f.packed.data(), rows, cols, f.spec, f.scales.data(), f.zeros.data(),
                         f.w_hat.data(), {1, true})
                  .ok());
  if (equalize) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) f.w_hat[r * cols + c] /= f.input_scales[c];
    }
  }
  return f;
}

struct Case {
  int64_t batch;
  DType dtype;
  bool bias;
  MatmulPath path;
  int isa;  // 0 scalar, 1 AVX2, 2 best (AVX-512 where it runs)
};

std::string Describe(const Fixture& f, const Case& c) {
  return "rows " + std::to_string(f.rows) + " cols " + std::to_string(f.cols) + " bits " +
         std::to_string(f.spec.bits) + " g " + std::to_string(f.spec.group_size) + " storage " +
         std::to_string(static_cast<int>(f.storage)) + " equalized " +
         std::to_string(!f.input_scales.empty()) + " batch " + std::to_string(c.batch) + " dtype " +
         std::string(DTypeName(c.dtype)) + " path " + std::to_string(static_cast<int>(c.path)) +
         " isa " + std::to_string(c.isa);
}

// Runs one case and checks every output against the bound; returns the
// largest error / bound ratio.
double Check(const Fixture& f, const Case& c, std::mt19937& rng) {
  const int64_t N = f.rows, K = f.cols, G = GroupsPerRow(K, f.spec.group_size);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> x(static_cast<size_t>(c.batch * K)), bias(static_cast<size_t>(N));
  std::vector<uint16_t> x16(x.size()), b16(bias.size());
  for (size_t i = 0; i < x.size(); ++i) {
    float v = normal(rng);
    if (c.dtype == DType::kBF16) {
      x16[i] = ToBf16(v);
      v = BFloat16ToFloat(x16[i]);
    } else if (c.dtype == DType::kF16) {
      x16[i] = FloatToHalf(v);
      v = HalfToFloat(x16[i]);
    }
    x[i] = v;
  }
  for (size_t i = 0; i < bias.size(); ++i) {
    float v = normal(rng) * 0.1f;
    if (c.dtype != DType::kF32) {
      b16[i] = c.dtype == DType::kBF16 ? ToBf16(v) : FloatToHalf(v);
      v = c.dtype == DType::kBF16 ? BFloat16ToFloat(b16[i]) : HalfToFloat(b16[i]);
    }
    bias[i] = v;
  }
  const size_t item = DTypeSize(c.dtype);
  std::vector<uint8_t> y(static_cast<size_t>(c.batch * N) * item);
  const void* xp = c.dtype == DType::kF32 ? static_cast<const void*>(x.data()) : x16.data();
  const void* bp = !c.bias                  ? nullptr
                   : c.dtype == DType::kF32 ? static_cast<const void*>(bias.data())
                                            : b16.data();
  MatmulOptions opt;
  opt.threads = 2;
  opt.force_scalar = c.isa == 0;
  opt.force_avx2 = c.isa == 1;
  opt.path = c.path;
  const Status st = QuantMatmul(f.matrix(), xp, c.dtype, c.batch, bp, c.dtype, y.data(), opt);
  EXPECT_TRUE(st.ok()) << st.message();

  const double u = std::ldexp(1.0, -24);
  const double n = static_cast<double>(MatmulErrorTerms(K, G));
  const double gamma = n * u / (1 - n * u);
  const double out_u = c.dtype == DType::kBF16  ? std::ldexp(1.0, -8)
                       : c.dtype == DType::kF16 ? std::ldexp(1.0, -11)
                                                : 0.0;
  double worst = 0;
  for (int64_t b = 0; b < c.batch; ++b) {
    for (int64_t r = 0; r < N; ++r) {
      double exact = c.bias ? bias[r] : 0.0, mag = c.bias ? std::fabs(bias[r]) : 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const double xv = x[b * K + k];
        const double xe = f.input_scales.empty() ? xv : xv / f.input_scales[k];
        exact += xv * f.w_hat[r * K + k];
        const int64_t j = k / f.spec.group_size;
        mag += std::fabs(xe) * (f.Code(r, k) + std::fabs(f.zeros[r * G + j])) *
               std::fabs(f.scales[r * G + j]);
      }
      // The reference weight w_hat / s is itself one rounding off (q - z) s / s.
      double bound = gamma * mag + 4 * u * mag;
      // Output rounding; float16 below 2^-14 is subnormal (absolute spacing 2^-24).
      bound += out_u * (std::fabs(exact) + bound);
      if (c.dtype == DType::kF16) bound += std::ldexp(1.0, -25);
      float got;
      const uint8_t* yp = y.data() + (b * N + r) * item;
      if (c.dtype == DType::kF32) {
        std::memcpy(&got, yp, 4);
      } else {
        uint16_t h;
        std::memcpy(&h, yp, 2);
        got = c.dtype == DType::kBF16 ? BFloat16ToFloat(h) : HalfToFloat(h);
      }
      const double err = std::fabs(got - exact);
      EXPECT_LE(err, bound) << Describe(f, c) << " at (" << b << ", " << r << "): got " << got
                            << " exact " << exact;
      if (bound > 0) worst = std::max(worst, err / bound);
    }
  }
  return worst;
}

TEST(QuantMatmul, AgreesWithDequantizeWithinTheBound) {
  std::mt19937 rng(7);
  const int bits_list[] = {2, 4, 8};
  const int64_t groups[] = {16, 32, 128, 7, 24, 50, 64};
  const ParamStorage storages[] = {ParamStorage::kF32, ParamStorage::kF16,
                                   ParamStorage::kSuperblock};
  const int64_t cols_list[] = {1, 15, 16, 33, 130, 300, 64, 96};
  const int64_t batches[] = {1, 2, 3, 4, 5, 17, 40};
  const DType dtypes[] = {DType::kF32, DType::kBF16, DType::kF16};
  const MatmulPath paths[] = {MatmulPath::kAuto, MatmulPath::kGemv, MatmulPath::kGemm};
  int cases = 0;
  for (int bits : bits_list) {
    for (int64_t g : groups) {
      for (ParamStorage storage : storages) {
        for (int scheme = 0; scheme < 2; ++scheme) {
          if (scheme == 1 && storage == ParamStorage::kSuperblock) continue;  // asymmetric only
          const int64_t cols = cols_list[rng() % 8];
          const int64_t rows = 1 + static_cast<int64_t>(rng() % 61);
          const bool equalize = rng() % 3 == 0;
          const Fixture f = Make(rng, rows, cols, bits, g, storage,
                                 scheme ? Scheme::kSymmetric : Scheme::kAsymmetric, equalize);
          for (int t = 0; t < 6; ++t) {
            Case c{batches[rng() % 7], dtypes[rng() % 3], rng() % 2 == 0, paths[rng() % 3], t % 3};
            Check(f, c, rng);
            ++cases;
          }
        }
      }
    }
  }
  EXPECT_GT(cases, 600);
  EXPECT_STRNE(ActiveMatmulKernel(), "");
}

TEST(QuantMatmul, LargeLayersOnBothPaths) {
  std::mt19937 rng(11);
  for (int bits : {2, 4, 8}) {
    const Fixture f =
        Make(rng, 70, 1024, bits, 128, ParamStorage::kF16, Scheme::kAsymmetric, false);
    for (int64_t batch : {1, 2, 3, 4, 33}) {
      for (int isa : {0, 1, 2})
        Check(f, Case{batch, DType::kF32, true, MatmulPath::kAuto, isa}, rng);
    }
  }
}

// The bound is tight enough that one code off by one in a row is caught.
TEST(QuantMatmul, BoundCatchesOneWrongCode) {
  std::mt19937 rng(3);
  Fixture f = Make(rng, 8, 256, 4, 32, ParamStorage::kF32, Scheme::kAsymmetric, false);
  const int64_t G = GroupsPerRow(f.cols, 32);
  // Compute the correct outputs, then flip one code and compare with the
  // unmodified reference: the difference must exceed the bound.
  std::vector<float> x(static_cast<size_t>(f.cols), 1.0f), y(static_cast<size_t>(f.rows));
  ASSERT_TRUE(
      QuantMatmul(f.matrix(), x.data(), DType::kF32, 1, nullptr, DType::kF32, y.data()).ok());
  const uint8_t old = f.packed[5];
  f.packed[5] = static_cast<uint8_t>(old ^ 0x01);  // row 0, code 10 changes by one step
  std::vector<float> y2(y.size());
  ASSERT_TRUE(
      QuantMatmul(f.matrix(), x.data(), DType::kF32, 1, nullptr, DType::kF32, y2.data()).ok());
  const double u = std::ldexp(1.0, -24);
  const double n = static_cast<double>(MatmulErrorTerms(f.cols, G));
  double mag = 0;
  for (int64_t k = 0; k < f.cols; ++k) {
    mag += (f.Code(0, k) + std::fabs(f.zeros[k / 32])) * std::fabs(f.scales[k / 32]);
  }
  const double bound = (n * u / (1 - n * u) + 4 * u) * mag;
  EXPECT_GT(std::fabs(y2[0] - y[0]), 4 * bound);
  EXPECT_EQ(y2[1], y[1]);
}

TEST(QuantMatmul, DequantizeRowsIsDequantizeOverS) {
  std::mt19937 rng(5);
  for (ParamStorage storage : {ParamStorage::kF32, ParamStorage::kF16, ParamStorage::kSuperblock}) {
    for (bool scalar : {false, true}) {
      const Fixture f = Make(rng, 9, 100, 4, 32, storage, Scheme::kAsymmetric, true);
      std::vector<float> out(static_cast<size_t>(4 * f.cols));
      MatmulOptions opt;
      opt.force_scalar = scalar;
      ASSERT_TRUE(DequantizeMatrixRows(f.matrix(), 3, 7, out.data(), opt).ok());
      EXPECT_EQ(0, std::memcmp(out.data(), f.w_hat.data() + 3 * f.cols, out.size() * 4));
    }
  }
}

TEST(QuantMatmul, GatherIsDequantizeOverS) {
  std::mt19937 rng(9);
  const Fixture f = Make(rng, 12, 40, 2, 16, ParamStorage::kSuperblock, Scheme::kAsymmetric, true);
  const int64_t ids[] = {11, 0, 5, 5};
  std::vector<float> out(4 * 40);
  ASSERT_TRUE(DequantizeMatrixGather(f.matrix(), ids, 4, out.data()).ok());
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(0, std::memcmp(&out[i * 40], &f.w_hat[ids[i] * 40], 40 * 4));
  }
  const int64_t bad[] = {12};
  EXPECT_FALSE(DequantizeMatrixGather(f.matrix(), bad, 1, out.data()).ok());
}

TEST(QuantMatmul, RejectsBadArguments) {
  std::mt19937 rng(1);
  const Fixture f = Make(rng, 4, 32, 4, 16, ParamStorage::kF32, Scheme::kAsymmetric, false);
  QuantMatrix w = f.matrix();
  std::vector<float> x(32), y(4);
  w.bits = 3;
  EXPECT_FALSE(QuantMatmul(w, x.data(), DType::kF32, 1, nullptr, DType::kF32, y.data()).ok());
  w = f.matrix();
  w.group_size = 0;
  EXPECT_FALSE(QuantMatmul(w, x.data(), DType::kF32, 1, nullptr, DType::kF32, y.data()).ok());
  w = f.matrix();
  EXPECT_FALSE(QuantMatmul(w, x.data(), DType::kI32, 1, nullptr, DType::kF32, y.data()).ok());
  w.params = ParamStorage::kSuperblock;
  w.param_code_bits = 9;
  w.superblock_groups = 1;
  w.param_codes = f.packed.data();
  EXPECT_FALSE(ValidateQuantMatrix(w).ok());
  w = f.matrix();
  EXPECT_FALSE(DequantizeMatrixRows(w, 2, 9, y.data()).ok());
}

}  // namespace
}  // namespace arrowquant
