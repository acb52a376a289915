#include "arrowquant/gguf.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

namespace arrowquant::gguf {
namespace {

std::vector<float> RandomFloats(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> x(n);
  for (float& v : x) v = dist(rng);
  return x;
}

std::string TempPath(const std::string& name) {
  return ::testing::TempDir() + "/aq_gguf_" + std::to_string(::getpid()) + "_" + name;
}

std::vector<uint8_t> ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

bool Exists(const std::string& path) { return ::access(path.c_str(), F_OK) == 0; }

TEST(GgufTypes, NamesAndSizes) {
  EXPECT_EQ(*ParseWritableType("q4_0"), GgmlType::kQ4_0);
  EXPECT_EQ(*ParseWritableType("F16"), GgmlType::kF16);
  EXPECT_FALSE(ParseWritableType("Q8_1").ok());
  EXPECT_EQ(FileTypeFor(GgmlType::kQ5_0), 8u);
  EXPECT_EQ(FileTypeFor(GgmlType::kQ5_1), 9u);
  EXPECT_EQ(*TensorBytes(GgmlType::kQ8_0, 64), 68u);
  EXPECT_EQ(*TensorBytes(GgmlType::kQ4_1, 32), 20u);
  EXPECT_EQ(*TensorBytes(GgmlType::kF16, 3), 6u);
  EXPECT_FALSE(TensorBytes(GgmlType::kQ4_0, 33).ok());
  EXPECT_EQ(FileTypeFor(GgmlType::kQ8_0), 7u);
  EXPECT_EQ(FileTypeFor(GgmlType::kQ6_K), 18u);
  EXPECT_EQ(FileTypeFor(GgmlType::kIQ4_XS), 30u);
  EXPECT_EQ(*ParseFileType("Q4_K_M"), 15u);
  EXPECT_EQ(*ParseFileType("mostly_q5_k_m"), 17u);
  EXPECT_FALSE(ParseFileType("Q4_K_X").ok());
  EXPECT_EQ(*ParseWritableType("q4_k"), GgmlType::kQ4_K);
  EXPECT_EQ(*ParseWritableType("IQ4_XS"), GgmlType::kIQ4_XS);
  EXPECT_EQ(*TensorBytes(GgmlType::kQ4_K, 512), 288u);
  EXPECT_FALSE(TensorBytes(GgmlType::kQ6_K, 32).ok());
  // A K-quant needs rows of 256: the layout names the tensor and the block size.
  auto l = LayoutTensors({{"blk.0.w", {4, 96}, GgmlType::kQ4_K}}, 32);
  ASSERT_FALSE(l.ok());
  EXPECT_NE(l.status().message().find("blk.0.w"), std::string::npos);
  EXPECT_NE(l.status().message().find("256"), std::string::npos);
}

TEST(GgufLayout, ReversesDimsAndAligns) {
  auto layout = LayoutTensors({{"a", {3, 64}, GgmlType::kQ4_0},
                               {"b", {5}, GgmlType::kF32},
                               {"c", {}, GgmlType::kF16},
                               {"d", {2, 3, 4, 32}, GgmlType::kQ8_0}},
                              32);
  ASSERT_TRUE(layout.ok()) << layout.status().ToString();
  const auto& l = *layout;
  EXPECT_EQ(l[0].dims, (std::vector<uint64_t>{64, 3}));
  EXPECT_EQ(l[0].nbytes, 3u * 2 * 18);
  EXPECT_EQ(l[1].offset, 128u);  // 108 rounded up to 32
  EXPECT_EQ(l[2].dims, (std::vector<uint64_t>{1}));
  EXPECT_EQ(l[3].dims, (std::vector<uint64_t>{32, 4, 3, 2}));
  EXPECT_EQ(l[3].rows, 2);
  EXPECT_EQ(l[3].cols, 3 * 4 * 32);
  for (const auto& t : l) EXPECT_EQ(t.offset % 32, 0u);

  EXPECT_FALSE(LayoutTensors({{"x", {4, 48}, GgmlType::kQ4_0}}, 32).ok());  // 48 % 32
  EXPECT_FALSE(LayoutTensors({{"x", {1, 1, 1, 1, 32}, GgmlType::kF32}}, 32).ok());
  EXPECT_FALSE(LayoutTensors({{"x", {32}, GgmlType::kF32}, {"x", {32}, GgmlType::kF32}}, 32).ok());
  EXPECT_TRUE(LayoutTensors({{std::string(80, 'n'), {32}, GgmlType::kF32}}, 32).ok());
  EXPECT_FALSE(LayoutTensors({{"x", {32}, GgmlType::kF32}}, 24).ok());
}

struct Written {
  std::string path;
  std::vector<float> a, b;
};

// Writes a (4 x 64, Q4_1, in `chunk`-row pieces) and b (a float16 1-D vector as F16).
Written WriteSample(const std::string& name, int64_t chunk, int threads = 1) {
  Written w;
  w.path = TempPath(name);
  w.a = RandomFloats(4 * 64, 1);
  w.b = RandomFloats(7, 2);
  std::vector<KeyValue> md = {
      {"general.architecture", Value::String("arrowquant")},
      {"general.name", Value::String("sample")},
      {"general.file_type", Value::U32(FileTypeFor(GgmlType::kQ4_1))},
      {"sample.list", Value::Array(ValueType::kString, {Value::String("x"), Value::String("yz")})},
      {"sample.neg", Value::I32(-5)},
      {"sample.flag", Value::Bool(true)},
      {"sample.pi", Value::F32(3.25f)},
  };
  auto writer =
      Writer::Create(w.path, md, {{"a", {4, 64}, GgmlType::kQ4_1}, {"b", {7}, GgmlType::kF16}});
  EXPECT_TRUE(writer.ok()) << writer.status().ToString();
  Writer& wr = **writer;
  EXPECT_TRUE(Exists(wr.temp_path()));
  EXPECT_FALSE(Exists(w.path));
  for (int64_t r = 0; r < 4; r += chunk) {
    const int64_t n = std::min<int64_t>(chunk, 4 - r);
    Status st = wr.AppendRows(TensorView{w.a.data() + r * 64, DType::kF32, n, 64},
                              ExecOptions{threads, false});
    EXPECT_TRUE(st.ok()) << st.ToString();
  }
  std::vector<uint16_t> half(7);
  for (int j = 0; j < 7; ++j) half[j] = FloatToHalf(w.b[j]);
  EXPECT_TRUE(wr.AppendRows(TensorView{half.data(), DType::kF16, 1, 7}).ok());
  const std::string temp = wr.temp_path();
  EXPECT_TRUE(wr.Finish().ok());
  EXPECT_FALSE(Exists(temp));
  return w;
}

TEST(GgufWriter, RoundTripThroughParse) {
  Written w = WriteSample("roundtrip.gguf", 4);
  auto f = ReadFile(w.path);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->version, 3u);
  EXPECT_EQ(f->alignment, 32u);
  EXPECT_EQ(f->data_offset % 32, 0u);
  ASSERT_EQ(f->tensors.size(), 2u);
  EXPECT_EQ(f->tensors[0].dims, (std::vector<uint64_t>{64, 4}));
  EXPECT_EQ(f->tensors[0].type, 3u);
  EXPECT_EQ(f->tensors[1].offset, 160u);  // 4*2*20 = 160
  EXPECT_EQ(f->Find("general.alignment")->u, 32u);
  EXPECT_EQ(f->Find("general.quantization_version")->u, 2u);
  EXPECT_EQ(f->Find("sample.neg")->i, -5);
  EXPECT_EQ(f->Find("sample.flag")->u, 1u);
  EXPECT_EQ(f->Find("sample.pi")->f, 3.25);
  EXPECT_EQ(f->Find("sample.list")->items.at(1).s, "yz");

  const std::vector<uint8_t> bytes = ReadAll(w.path);
  std::vector<uint8_t> expect(160);
  ASSERT_TRUE(QuantizeBlocks(GgmlType::kQ4_1, w.a.data(), 4, 64, expect.data()).ok());
  EXPECT_TRUE(
      std::equal(expect.begin(), expect.end(), bytes.begin() + static_cast<long>(f->data_offset)));
  std::vector<float> b(7);
  ASSERT_TRUE(
      DequantizeBlocks(GgmlType::kF16, bytes.data() + f->data_offset + 160, 1, 7, b.data()).ok());
  for (int j = 0; j < 7; ++j) EXPECT_EQ(b[j], HalfToFloat(FloatToHalf(w.b[j])));
  std::remove(w.path.c_str());
}

TEST(GgufWriter, ChunkedEqualsOneShot) {
  Written one = WriteSample("one.gguf", 4, 1);
  Written many = WriteSample("many.gguf", 1, 2);
  EXPECT_EQ(ReadAll(one.path), ReadAll(many.path));
  std::remove(one.path.c_str());
  std::remove(many.path.c_str());
}

TEST(GgufWriter, FailuresLeaveNoFile) {
  const std::string path = TempPath("fail.gguf");
  std::vector<float> x(2 * 32, 1.0f);
  {
    auto w = Writer::Create(path, {}, {{"w", {2, 32}, GgmlType::kQ8_0}});
    ASSERT_TRUE(w.ok());
    const std::string temp = (*w)->temp_path();
    ASSERT_TRUE((*w)->AppendRows(TensorView{x.data(), DType::kF32, 1, 32}).ok());
    Status st = (*w)->Finish();  // one row missing
    EXPECT_FALSE(st.ok());
    EXPECT_NE(st.message().find("incomplete"), std::string::npos);
    EXPECT_FALSE(Exists(temp));
    EXPECT_FALSE(Exists(path));
  }
  {
    x[40] = INFINITY;
    auto w = Writer::Create(path, {}, {{"w", {2, 32}, GgmlType::kQ8_0}});
    ASSERT_TRUE(w.ok());
    const std::string temp = (*w)->temp_path();
    Status st = (*w)->AppendRows(TensorView{x.data(), DType::kF32, 2, 32});
    EXPECT_EQ(st.code(), StatusCode::kInvalid);
    EXPECT_NE(st.message().find("'w'"), std::string::npos) << st.message();
    EXPECT_NE(st.message().find("Inf at index 40 (row 1, column 8)"), std::string::npos)
        << st.message();
    EXPECT_FALSE(Exists(temp));
    EXPECT_FALSE((*w)->Finish().ok());
  }
  {
    auto w = Writer::Create(path, {}, {{"w", {2, 32}, GgmlType::kQ8_0}});
    ASSERT_TRUE(w.ok());
    const std::string temp = (*w)->temp_path();
    EXPECT_FALSE((*w)->AppendRows(TensorView{x.data(), DType::kF32, 1, 31}).ok());  // wrong cols
    EXPECT_FALSE(Exists(temp));
  }
  {
    std::string temp;
    {
      auto w = Writer::Create(path, {}, {{"w", {2, 32}, GgmlType::kQ8_0}});
      ASSERT_TRUE(w.ok());
      temp = (*w)->temp_path();
      EXPECT_TRUE(Exists(temp));
    }  // destroyed unfinished
    EXPECT_FALSE(Exists(temp));
  }
  EXPECT_FALSE(Exists(path));
  EXPECT_EQ(Writer::Create("/nonexistent-dir/x.gguf", {}, {}).status().code(),
            StatusCode::kIOError);
}

TEST(GgufReader, EveryTruncationFailsCleanly) {
  Written w = WriteSample("trunc.gguf", 2);
  const std::vector<uint8_t> bytes = ReadAll(w.path);
  ASSERT_TRUE(Parse(bytes.data(), bytes.size()).ok());
  for (size_t n = 0; n < bytes.size(); ++n) {
    auto f = Parse(bytes.data(), n);
    EXPECT_FALSE(f.ok()) << "prefix " << n;
    if (!f.ok()) {
      EXPECT_EQ(f.status().code(), StatusCode::kFormatError);
    }
  }
  std::remove(w.path.c_str());
}

TEST(GgufReader, RejectsCorruptHeaders) {
  Written w = WriteSample("corrupt.gguf", 4);
  const std::vector<uint8_t> good = ReadAll(w.path);
  auto f = Parse(good.data(), good.size());
  ASSERT_TRUE(f.ok());
  auto expect_error = [](std::vector<uint8_t> bytes, const char* needle) {
    auto r = Parse(bytes.data(), bytes.size());
    ASSERT_FALSE(r.ok()) << needle;
    EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status().message();
  };
  std::vector<uint8_t> b = good;
  b[0] = 'X';
  expect_error(b, "magic");
  b = good;
  b[4] = 1;  // version 1
  expect_error(b, "version");
  b = good;
  b[8 + 7] = 0x10;  // an absurd tensor count
  expect_error(b, "tensor count");
  b = good;
  b[16 + 7] = 0x10;  // an absurd metadata count
  expect_error(b, "metadata count");

  // Point tensor 'b' at tensor 'a': the last 8 header bytes before padding are b's offset.
  // Find b's offset field: the tensor infos end just before the padding.
  size_t end = 0;
  {
    // Re-encode a header without padding to learn where the infos end.
    const std::string name = "b";
    const size_t b_info = f->data_offset;  // upper bound; search backwards for offset 160
    for (size_t p = b_info - 8; p > 24; --p) {
      uint64_t v = 0;
      for (int k = 0; k < 8; ++k) v |= static_cast<uint64_t>(good[p + k]) << (8 * k);
      if (v == 160) {
        end = p;
        break;
      }
    }
  }
  ASSERT_GT(end, 0u);
  b = good;
  b[end] = 0;  // offset 160 -> 0: overlaps 'a'
  expect_error(b, "overlap");
  b = good;
  b[end] = 161;  // misaligned
  expect_error(b, "alignment");
  b = good;
  b[end + 2] = 1;  // 160 + 65536: past the end
  expect_error(b, "past the end");
  b = good;
  b[end - 4] = 99;  // unknown tensor type
  expect_error(b, "unknown ggml tensor type");
  std::remove(w.path.c_str());
}

}  // namespace
}  // namespace arrowquant::gguf

namespace arrowquant::gguf {
namespace {

TEST(GgufWriter, ErrorStatsMatchDecodedValues) {
  const std::string path = TempPath("stats.gguf");
  const std::vector<float> x = RandomFloats(8 * 64, 11);
  for (GgmlType t :
       {GgmlType::kQ8_0, GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kF16, GgmlType::kF32}) {
    auto w = Writer::Create(path, {}, {{"w", {8, 64}, t}});
    ASSERT_TRUE(w.ok());
    ErrorStats stats;
    ASSERT_TRUE(
        (*w)->AppendRows(TensorView{x.data(), DType::kF32, 3, 64}, ExecOptions{2, false}, &stats)
            .ok());
    ASSERT_TRUE(
        (*w)->AppendRows(TensorView{x.data() + 3 * 64, DType::kF32, 5, 64}, {}, &stats).ok());
    ASSERT_TRUE((*w)->Finish().ok());
    const std::vector<uint8_t> bytes = ReadAll(path);
    auto f = Parse(bytes.data(), bytes.size());
    ASSERT_TRUE(f.ok());
    std::vector<float> y(x.size());
    ASSERT_TRUE(DequantizeBlocks(t, bytes.data() + f->data_offset, 8, 64, y.data()).ok());
    double err2 = 0.0, max_err = 0.0;
    for (size_t j = 0; j < x.size(); ++j) {
      const double e = static_cast<double>(x[j]) - y[j];
      err2 += e * e;
      max_err = std::max(max_err, std::fabs(e));
    }
    EXPECT_EQ(stats.count, static_cast<int64_t>(x.size()));
    EXPECT_NEAR(stats.sum_err2, err2, 1e-9 * (1 + err2));
    EXPECT_EQ(stats.max_abs_err, max_err);
    if (t == GgmlType::kF32) {
      EXPECT_EQ(stats.sum_err2, 0.0);
    } else {
      EXPECT_GT(stats.sum_err2, 0.0);
    }
  }
  std::remove(path.c_str());
}

}  // namespace
}  // namespace arrowquant::gguf

namespace arrowquant::gguf {
namespace {

// A deterministic stand-in for the libFuzzer target in every test run:
// random byte flips, truncations and insertions of a valid file must parse
// or fail with a FormatError, never crash (run under ASan/UBSan with
// -DARROWQUANT_SANITIZE=ON to catch out-of-bounds reads).
TEST(GgufReader, SurvivesRandomMutations) {
  Written w = WriteSample("mutate.gguf", 4);
  const std::vector<uint8_t> good = ReadAll(w.path);
  std::remove(w.path.c_str());
  std::mt19937 rng(1234);
  int parsed = 0;
  for (int iter = 0; iter < 20000; ++iter) {
    std::vector<uint8_t> b = good;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t pos = rng() % b.size();
      switch (rng() % 4) {
        case 0:
          b[pos] = static_cast<uint8_t>(rng());
          break;
        case 1:
          b[pos] ^= static_cast<uint8_t>(1u << (rng() % 8));
          break;
        case 2:
          b.resize(pos + 1);
          break;
        default:
          b.insert(b.begin() + static_cast<long>(pos), static_cast<uint8_t>(rng()));
          break;
      }
      if (b.empty()) b.push_back(0);
    }
    auto f = Parse(b.data(), b.size());
    if (f.ok()) {
      ++parsed;
      for (const TensorInfo& t : f->tensors) {
        ASSERT_LE(f->data_offset + t.offset + t.nbytes, b.size());
      }
    } else {
      ASSERT_EQ(f.status().code(), StatusCode::kFormatError) << f.status().ToString();
    }
  }
  // Flips inside tensor data leave the header valid: some mutants must still parse.
  EXPECT_GT(parsed, 0);
}

}  // namespace
}  // namespace arrowquant::gguf
