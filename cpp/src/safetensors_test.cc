#include "arrowquant/safetensors.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace arrowquant {
namespace {

// A whole file: 8-byte little-endian length, the JSON, then `data`.
std::string MakeFile(const std::string& json, const std::string& data, uint64_t length_override = 0,
                     bool override_length = false) {
  const uint64_t n = override_length ? length_override : json.size();
  std::string out(8, '\0');
  for (int k = 0; k < 8; ++k) out[k] = static_cast<char>((n >> (8 * k)) & 0xFF);
  return out + json + data;
}

// Expects a FormatError mentioning the label and `needle`.
void ExpectFormatError(const Result<SafeTensorsHeader>& r, const std::string& needle) {
  ASSERT_FALSE(r.ok()) << "expected an error containing: " << needle;
  EXPECT_EQ(r.status().code(), StatusCode::kFormatError) << r.status().ToString();
  EXPECT_NE(r.status().message().find("f.safetensors"), std::string::npos) << r.status().message();
  EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status().message();
}

Result<SafeTensorsHeader> Parse(const std::string& json, uint64_t data_size) {
  return ParseSafeTensorsHeader(json, data_size, "f.safetensors");
}

const char* kTwo = R"({"__metadata__":{"format":"pt"},)"
                   R"("b":{"dtype":"F16","shape":[2,3],"data_offsets":[8,20]},)"
                   R"("a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})";

TEST(SafeTensorsHeader, ValidSortedByOffset) {
  auto r = Parse(kTwo, 20);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->tensors.size(), 2u);
  EXPECT_EQ(r->tensors[0].name, "a");
  EXPECT_EQ(r->tensors[0].dtype, DType::kI64);
  EXPECT_EQ(r->tensors[1].name, "b");
  EXPECT_EQ(r->tensors[1].dtype, DType::kF16);
  EXPECT_EQ(r->tensors[1].shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(r->tensors[1].numel, 6);
  EXPECT_EQ(r->tensors[1].begin, 8u);
  EXPECT_EQ(r->tensors[1].nbytes(), 12u);
  ASSERT_EQ(r->metadata.size(), 1u);
  EXPECT_EQ(r->metadata[0].first, "format");
  EXPECT_EQ(r->metadata[0].second, "pt");
}

TEST(SafeTensorsHeader, EmptyScalarAndPadding) {
  auto r = Parse(R"({"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]},)"
                 R"("e":{"dtype":"BF16","shape":[0,7],"data_offsets":[4,4]},)"
                 R"("f":{"dtype":"BOOL","shape":[3,0],"data_offsets":[4,4]}}      )",
                 4);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->tensors.size(), 3u);
  EXPECT_EQ(r->tensors[0].name, "s");
  EXPECT_EQ(r->tensors[0].numel, 1);
  EXPECT_EQ(r->tensors[1].name, "e");
  EXPECT_EQ(r->tensors[1].numel, 0);
  EXPECT_TRUE(Parse("{}", 0).ok());
  EXPECT_TRUE(Parse(R"({"__metadata__":null})", 0).ok());
}

TEST(SafeTensorsHeader, AllDTypes) {
  const char* codes[] = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2",
                         "I64", "I32", "I16", "I8",   "U8",      "BOOL"};
  for (const char* code : codes) {
    auto dt = ParseSafeTensorsDType(code);
    ASSERT_TRUE(dt.ok()) << code;
    EXPECT_EQ(SafeTensorsDTypeCode(*dt), code);
    const uint64_t n = 3 * DTypeSize(*dt);
    auto r = Parse(std::string(R"({"t":{"dtype":")") + code +
                       R"(","shape":[3],"data_offsets":[0,)" + std::to_string(n) + "]}}",
                   n);
    EXPECT_TRUE(r.ok()) << code << ": " << r.status().ToString();
  }
}

TEST(SafeTensorsHeader, UnknownFieldsSkipped) {
  auto r = Parse(R"({"t":{"extra":{"a":[1,2.5e-3,-7,true,false,null,"x"]},)"
                 R"("dtype":"U8","shape":[2],"data_offsets":[0,2]}})",
                 2);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
}

TEST(SafeTensorsHeader, EscapedNamesDecoded) {
  auto r =
      Parse(R"({"caf\u00e9.\ud83d\ude00\n":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 1);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->tensors[0].name, "caf\xc3\xa9.\xf0\x9f\x98\x80\n");
}

TEST(SafeTensorsHeader, Attacks) {
  ExpectFormatError(Parse(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8),
                    "past the end");
  ExpectFormatError(Parse(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                          R"("b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}})",
                          6),
                    "overlaps");
  ExpectFormatError(Parse(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[4,0]}})", 4),
                    "end before they begin");
  ExpectFormatError(Parse(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})", 4), "gap");
  ExpectFormatError(Parse(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", 4),
                    "trailing bytes");
  ExpectFormatError(
      Parse(R"({"a":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", 0),
      "overflows int64");
  ExpectFormatError(
      Parse(R"({"a":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,0]}})", 0),
      "byte size");
  ExpectFormatError(
      Parse(R"({"a":{"dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,0]}})", 0),
      "does not fit in int64");
  ExpectFormatError(
      Parse(R"({"a":{"dtype":"U8","shape":[99999999999999999999],"data_offsets":[0,0]}})", 0),
      "too large");
  ExpectFormatError(Parse(R"({"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}})", 0),
                    "negative");
  ExpectFormatError(Parse(R"({"a":{"dtype":"U8","shape":[1.5],"data_offsets":[0,0]}})", 0),
                    "must be an integer");
  ExpectFormatError(Parse(R"({"a":{"dtype":"U8","shape":[01],"data_offsets":[0,1]}})", 1),
                    "leading zero");
  ExpectFormatError(Parse(R"({"a":{"dtype":"F12","shape":[1],"data_offsets":[0,1]}})", 1),
                    "unsupported dtype 'F12'");
  ExpectFormatError(Parse(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                          R"("a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
                          2),
                    "more than once");
  ExpectFormatError(Parse(R"({"__metadata__":{"k":"1","k":"2"}})", 0), "more than once");
  ExpectFormatError(Parse(R"({"__metadata__":{},"__metadata__":{}})", 0), "more than once");
  ExpectFormatError(Parse(R"({"__metadata__":{"k":3}})", 0), "not a string");
  ExpectFormatError(Parse(R"({"a":{"dtype":"U8","shape":[3],"data_offsets":[0,2]}})", 2), "need 3");
  ExpectFormatError(Parse(R"({"a":{"dtype":"U8","data_offsets":[0,2]}})", 2), "missing \"shape\"");
  ExpectFormatError(Parse(R"({"a":{"shape":[2],"data_offsets":[0,2]}})", 2), "missing \"dtype\"");
  ExpectFormatError(Parse(R"({"a":{"dtype":"U8","shape":[2]}})", 2), "missing \"data_offsets\"");
  ExpectFormatError(
      Parse(R"({"a":{"dtype":"U8","dtype":"U8","shape":[2],"data_offsets":[0,2]}})", 2),
      "more than once");
  ExpectFormatError(Parse(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,1,2]}})", 2),
                    "two numbers");
  ExpectFormatError(Parse(R"({"a":{"dtype":7,"shape":[2],"data_offsets":[0,2]}})", 2),
                    "not a string");
  ExpectFormatError(Parse("[1,2]", 0), "must be a JSON object");
  ExpectFormatError(Parse("", 0), "must be a JSON object");
  ExpectFormatError(Parse("{", 0), "end of JSON");
  ExpectFormatError(Parse(R"({"a":)", 0), "end of JSON");
  ExpectFormatError(Parse(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}} x)", 2),
                    "trailing characters");
  ExpectFormatError(Parse(R"({"a\u0000b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 1),
                    "NUL");
}

TEST(SafeTensorsHeader, NonUtf8Rejected) {
  for (std::string bad : {std::string("\xff"), std::string("\xc0\xaf"), std::string("\xed\xa0\x80"),
                          std::string("\xf4\x90\x80\x80"), std::string("\xe2\x82")}) {
    ExpectFormatError(
        Parse("{\"n" + bad + "\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1),
        "UTF-8");
  }
  ExpectFormatError(Parse(R"({"\ud800":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 1),
                    "surrogate");
  ExpectFormatError(Parse(R"({"\udc00x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 1),
                    "surrogate");
  ExpectFormatError(Parse(R"({"\ud800\u0041":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 1),
                    "surrogate");
}

TEST(SafeTensorsHeader, DeepNestingIsBounded) {
  // A million nested arrays in an ignored field: refused at the depth limit,
  // without a stack overflow.
  std::string deep(1000000, '[');
  auto r = Parse(R"({"a":{"x":)" + deep, 0);
  ExpectFormatError(r, "nested deeper");
  std::string ok_depth = R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":)";
  for (int i = 0; i < kMaxJsonDepth - 2; ++i) ok_depth += "[";
  for (int i = 0; i < kMaxJsonDepth - 2; ++i) ok_depth += "]";
  EXPECT_TRUE(Parse(ok_depth + "}}", 1).ok());
}

TEST(SafeTensorsHeader, RankIsBounded) {
  std::string shape = "[1";
  for (size_t i = 1; i <= kMaxRank; ++i) shape += ",1";
  ExpectFormatError(
      Parse(R"({"a":{"dtype":"U8","shape":)" + shape + R"(],"data_offsets":[0,1]}})", 1),
      "dimensions");
}

TEST(SafeTensorsHeader, ErrorNamesQuotedSafely) {
  // A long name with control characters is cut and escaped in messages.
  std::string name(500, 'x');
  auto r =
      Parse("{\"" + name + "\\u0001\":{\"dtype\":\"Q\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1);
  ASSERT_FALSE(r.ok());
  EXPECT_LT(r.status().message().size(), 400u);
  EXPECT_NE(r.status().message().find("..."), std::string::npos);
}

TEST(SafeTensorsBuffer, HeaderLength) {
  const std::string json = R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})";
  auto ok = ParseSafeTensorsBuffer(MakeFile(json, "xy"), "f.safetensors");
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(ok->header_size, json.size());
  EXPECT_EQ(ok->data_start, 8 + json.size());
  ExpectFormatError(
      ParseSafeTensorsBuffer(MakeFile(json, "xy", uint64_t{1} << 63, true), "f.safetensors"),
      "larger than the rest of the file");
  ExpectFormatError(
      ParseSafeTensorsBuffer(MakeFile(json, "xy", ~uint64_t{0}, true), "f.safetensors"),
      "larger than the rest of the file");
  ExpectFormatError(
      ParseSafeTensorsBuffer(MakeFile(json, "xy", json.size() + 3, true), "f.safetensors"),
      "larger than the rest of the file");
  ExpectFormatError(ParseSafeTensorsBuffer(MakeFile(json, "x"), "f.safetensors"), "past the end");
  ExpectFormatError(ParseSafeTensorsBuffer("abc", "f.safetensors"), "too short");
  ExpectFormatError(ParseSafeTensorsBuffer(MakeFile("", ""), "f.safetensors"), "too short");
  uint8_t prefix[8] = {0x01, 0xe1, 0xf5, 0x05, 0, 0, 0, 0};  // 100,000,001
  auto big = CheckSafeTensorsHeaderLength(prefix, uint64_t{1} << 40, "f.safetensors");
  ASSERT_FALSE(big.ok());
  EXPECT_NE(big.status().message().find("limit"), std::string::npos);
}

class TempFile {
 public:
  explicit TempFile(const std::string& contents) {
    char tmpl[] = "/tmp/aq_st_test_XXXXXX";
    const int fd = mkstemp(tmpl);
    EXPECT_GE(fd, 0);
    path_ = tmpl;
    EXPECT_EQ(write(fd, contents.data(), contents.size()), static_cast<ssize_t>(contents.size()));
    close(fd);
  }
  ~TempFile() { std::remove(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

TEST(SafeTensorsFile, OpenAndRead) {
  std::string data;
  for (int i = 0; i < 20; ++i) data.push_back(static_cast<char>(i));
  TempFile f(MakeFile(std::string(kTwo) + "   ", data));
  auto r = SafeTensorsFile::Open(f.path());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  SafeTensorsFile& file = **r;
  EXPECT_EQ(file.tensors().size(), 2u);
  EXPECT_EQ(file.data_start(), 8 + std::string(kTwo).size() + 3);
  auto idx = file.FindTensor("b");
  ASSERT_TRUE(idx.ok());
  uint8_t buf[12] = {0};
  ASSERT_TRUE(file.ReadRange(*idx, 0, 12, buf).ok());
  for (int i = 0; i < 12; ++i) EXPECT_EQ(buf[i], 8 + i);
  ASSERT_TRUE(file.ReadRange(*idx, 10, 2, buf).ok());
  EXPECT_EQ(buf[0], 18);
  EXPECT_EQ(file.ReadRange(*idx, 10, 3, buf).code(), StatusCode::kInvalid);
  EXPECT_EQ(file.ReadRange(*idx, ~uint64_t{0}, 2, buf).code(), StatusCode::kInvalid);
  EXPECT_EQ(file.ReadRange(7, 0, 1, buf).code(), StatusCode::kInvalid);
  EXPECT_EQ(file.FindTensor("zz").status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(file.ReadRange(*idx, 12, 0, buf).ok());
  ASSERT_TRUE(file.Close().ok());
  EXPECT_FALSE(file.is_open());
  EXPECT_TRUE(file.Close().ok());
  EXPECT_EQ(file.ReadRange(*idx, 0, 1, buf).code(), StatusCode::kInvalid);
}

TEST(SafeTensorsFile, DropCacheOptionReadsTheSame) {
  std::string data(20, 'z');
  TempFile f(MakeFile(kTwo, data));
  auto r = SafeTensorsFile::Open(f.path(), SafeTensorsOpenOptions{true});
  ASSERT_TRUE(r.ok());
  uint8_t buf[12];
  ASSERT_TRUE((*r)->ReadRange(1, 0, 12, buf).ok());
  EXPECT_EQ(buf[11], 'z');
}

TEST(SafeTensorsFile, Errors) {
  auto missing = SafeTensorsFile::Open("/nonexistent/dir/model.safetensors");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("/nonexistent/dir/model.safetensors"),
            std::string::npos);

  auto dir = SafeTensorsFile::Open("/tmp");
  ASSERT_FALSE(dir.ok());
  EXPECT_EQ(dir.status().code(), StatusCode::kInvalid);

  TempFile tiny("abc");
  auto t = SafeTensorsFile::Open(tiny.path());
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), StatusCode::kFormatError);
  EXPECT_NE(t.status().message().find(tiny.path()), std::string::npos);

  TempFile truncated(MakeFile(kTwo, std::string(19, 'x')));
  auto tr = SafeTensorsFile::Open(truncated.path());
  ASSERT_FALSE(tr.ok());
  EXPECT_EQ(tr.status().code(), StatusCode::kFormatError);
}

TEST(SafeTensorsFile, TruncatedUnderTheReader) {
  TempFile f(MakeFile(kTwo, std::string(20, 'x')));
  auto r = SafeTensorsFile::Open(f.path());
  ASSERT_TRUE(r.ok());
  ASSERT_EQ(truncate(f.path().c_str(), static_cast<off_t>((*r)->data_start() + 10)), 0);
  uint8_t buf[12];
  Status st = (*r)->ReadRange(1, 0, 12, buf);
  EXPECT_EQ(st.code(), StatusCode::kFormatError);
  EXPECT_NE(st.message().find("truncated"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("'b'"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find(f.path()), std::string::npos) << st.message();
  // The first tensor lies wholly before the cut and still reads.
  EXPECT_TRUE((*r)->ReadRange(0, 0, 8, buf).ok());
}

TEST(SafeTensorsFile, ConcurrentReads) {
  std::string data;
  for (int i = 0; i < 20; ++i) data.push_back(static_cast<char>(i));
  TempFile f(MakeFile(kTwo, data));
  auto r = SafeTensorsFile::Open(f.path());
  ASSERT_TRUE(r.ok());
  const SafeTensorsFile& file = **r;
  std::vector<std::thread> threads;
  std::vector<int> failures(4, 0);
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k] {
      uint8_t buf[12];
      for (int it = 0; it < 200; ++it) {
        if (!file.ReadRange(1, 0, 12, buf).ok() || buf[5] != 13) ++failures[k];
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int k = 0; k < 4; ++k) EXPECT_EQ(failures[k], 0);
}

}  // namespace
}  // namespace arrowquant
