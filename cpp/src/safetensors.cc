#include "arrowquant/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <mutex>

#include "arrowquant/text.h"

namespace arrowquant {

namespace {

constexpr size_t kMaxQuotedName = 120;  // bytes of a name shown in a message

// A name for an error message: valid UTF-8 kept (printable), anything else
// escaped, long names cut at a character boundary. Messages must stay valid
// UTF-8 because Python decodes them.
std::string Quote(std::string_view s) {
  std::string out = "'";
  size_t i = 0;
  while (i < s.size()) {
    if (out.size() > kMaxQuotedName) {
      out += "...";
      break;
    }
    const auto c = static_cast<unsigned char>(s[i]);
    size_t len = 0;
    if (c >= 0x20 && c < 0x7F) {
      len = 1;
    } else if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
    }
    bool valid = len > 0 && i + len <= s.size();
    for (size_t k = 1; valid && k < len; ++k) {
      valid = (static_cast<unsigned char>(s[i + k]) & 0xC0) == 0x80;
    }
    if (valid) {
      out.append(s.substr(i, len));
      i += len;
    } else {
      static const char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
      ++i;
    }
  }
  out += "'";
  return out;
}

using text::Utf8SequenceLength;

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// A cursor over the header text that knows just enough JSON for SafeTensors:
// strings and non-negative integers are decoded, anything else can only be
// skipped. Recursion is bounded by kMaxJsonDepth, and nothing is allocated
// beyond the decoded strings and shapes (both bounded by the header size).
class JsonCursor {
 public:
  JsonCursor(std::string_view text, const std::string& label) : s_(text), label_(label) {}

  Status Error(const std::string& what) const {
    return Status::FormatError(label_ + ": invalid SafeTensors header: " + what + " (at byte " +
                               std::to_string(pos_) + " of the JSON header)");
  }

  void SkipWhitespace() {
    while (pos_ < s_.size()) {
      const char c = s_[pos_];
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
      ++pos_;
    }
  }

  bool AtEnd() const { return pos_ >= s_.size(); }
  char Peek() const { return pos_ < s_.size() ? s_[pos_] : '\0'; }

  // Skips whitespace, then consumes `c` if it is next.
  bool Consume(char c) {
    SkipWhitespace();
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }

  Status Expect(char c, const char* where) {
    if (Consume(c)) return Status::OK();
    if (AtEnd()) return Error(std::string("unexpected end of JSON, expected '") + c + "' " + where);
    return Error(std::string("expected '") + c + "' " + where + ", found " + Describe());
  }

  std::string Describe() const {
    if (AtEnd()) return "end of JSON";
    const auto c = static_cast<unsigned char>(s_[pos_]);
    if (c >= 0x20 && c < 0x7F) return std::string("'") + static_cast<char>(c) + "'";
    static const char kHex[] = "0123456789abcdef";
    return std::string("byte 0x") + kHex[c >> 4] + kHex[c & 15];
  }

  Result<uint32_t> ParseHex4() {
    if (s_.size() - pos_ < 4) return Error("truncated \\u escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      const char c = s_[pos_++];
      v <<= 4;
      if (c >= '0' && c <= '9') {
        v |= static_cast<uint32_t>(c - '0');
      } else if (c >= 'a' && c <= 'f') {
        v |= static_cast<uint32_t>(c - 'a' + 10);
      } else if (c >= 'A' && c <= 'F') {
        v |= static_cast<uint32_t>(c - 'A' + 10);
      } else {
        return Error("bad hex digit in \\u escape");
      }
    }
    return v;
  }

  // A JSON string, decoded. Raw bytes must be valid UTF-8; escapes must not
  // produce lone surrogates, so the result is always valid UTF-8.
  Result<std::string> ParseString(const char* what) {
    SkipWhitespace();
    if (Peek() != '"')
      return Error(std::string("expected a string for ") + what + ", found " + Describe());
    ++pos_;
    std::string out;
    while (true) {
      if (AtEnd()) return Error(std::string("unterminated string in ") + what);
      const auto c = static_cast<unsigned char>(s_[pos_]);
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (c < 0x20) return Error(std::string("control character in a string in ") + what);
      if (c == '\\') {
        ++pos_;
        if (AtEnd()) return Error(std::string("unterminated escape in ") + what);
        const char e = s_[pos_++];
        switch (e) {
          case '"':
            out.push_back('"');
            break;
          case '\\':
            out.push_back('\\');
            break;
          case '/':
            out.push_back('/');
            break;
          case 'b':
            out.push_back('\b');
            break;
          case 'f':
            out.push_back('\f');
            break;
          case 'n':
            out.push_back('\n');
            break;
          case 'r':
            out.push_back('\r');
            break;
          case 't':
            out.push_back('\t');
            break;
          case 'u': {
            AQ_ASSIGN_OR_RETURN(uint32_t cp, ParseHex4());
            if (cp >= 0xDC00 && cp <= 0xDFFF) {
              return Error(std::string("lone low surrogate \\u escape in ") + what +
                           " (not valid UTF-8)");
            }
            if (cp >= 0xD800 && cp <= 0xDBFF) {
              if (s_.size() - pos_ < 2 || s_[pos_] != '\\' || s_[pos_ + 1] != 'u') {
                return Error(std::string("lone high surrogate \\u escape in ") + what +
                             " (not valid UTF-8)");
              }
              pos_ += 2;
              AQ_ASSIGN_OR_RETURN(uint32_t low, ParseHex4());
              if (low < 0xDC00 || low > 0xDFFF) {
                return Error(std::string("unpaired surrogate \\u escape in ") + what +
                             " (not valid UTF-8)");
              }
              cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
            }
            AppendUtf8(cp, &out);
            break;
          }
          default:
            return Error(std::string("invalid escape in ") + what);
        }
        continue;
      }
      const size_t len = Utf8SequenceLength(s_, pos_);
      if (len == 0) return Error(std::string("invalid UTF-8 in ") + what);
      out.append(s_.substr(pos_, len));
      pos_ += len;
    }
  }

  // A JSON integer >= 0 that fits in uint64. Negative numbers, fractions and
  // exponents are errors: SafeTensors shapes and offsets are unsigned.
  Result<uint64_t> ParseUnsigned(const std::string& what) {
    SkipWhitespace();
    if (Peek() == '-') return Error(what + " is negative");
    if (Peek() < '0' || Peek() > '9')
      return Error(what + " must be an integer, found " + Describe());
    if (Peek() == '0' && pos_ + 1 < s_.size() && s_[pos_ + 1] >= '0' && s_[pos_ + 1] <= '9') {
      return Error(what + " has a leading zero");
    }
    uint64_t v = 0;
    while (!AtEnd() && Peek() >= '0' && Peek() <= '9') {
      const auto d = static_cast<uint64_t>(Peek() - '0');
      if (v > (std::numeric_limits<uint64_t>::max() - d) / 10) return Error(what + " is too large");
      v = v * 10 + d;
      ++pos_;
    }
    if (Peek() == '.' || Peek() == 'e' || Peek() == 'E') return Error(what + " must be an integer");
    return v;
  }

  // Skips any JSON value, at nesting `depth` (1 = inside the top object).
  Status SkipValue(int depth) {
    if (depth > kMaxJsonDepth) {
      return Error("JSON nested deeper than " + std::to_string(kMaxJsonDepth) + " levels");
    }
    SkipWhitespace();
    const char c = Peek();
    if (c == '"') return ParseString("a value").status();
    if (c == '{') {
      ++pos_;
      if (Consume('}')) return Status::OK();
      while (true) {
        AQ_RETURN_NOT_OK(ParseString("an object key").status());
        AQ_RETURN_NOT_OK(Expect(':', "after an object key"));
        AQ_RETURN_NOT_OK(SkipValue(depth + 1));
        if (Consume(',')) continue;
        return Expect('}', "to close an object");
      }
    }
    if (c == '[') {
      ++pos_;
      if (Consume(']')) return Status::OK();
      while (true) {
        AQ_RETURN_NOT_OK(SkipValue(depth + 1));
        if (Consume(',')) continue;
        return Expect(']', "to close an array");
      }
    }
    if (c == '-' || (c >= '0' && c <= '9')) return SkipNumber();
    for (std::string_view word :
         {std::string_view("true"), std::string_view("false"), std::string_view("null")}) {
      if (s_.substr(pos_, word.size()) == word) {
        pos_ += word.size();
        return Status::OK();
      }
    }
    return Error("expected a JSON value, found " + Describe());
  }

  bool ConsumeWord(std::string_view word) {
    SkipWhitespace();
    if (s_.substr(pos_, word.size()) == word) {
      pos_ += word.size();
      return true;
    }
    return false;
  }

 private:
  bool Digits() {
    const size_t start = pos_;
    while (!AtEnd() && Peek() >= '0' && Peek() <= '9') ++pos_;
    return pos_ > start;
  }

  Status SkipNumber() {
    if (Peek() == '-') ++pos_;
    if (Peek() == '0') {
      ++pos_;
    } else if (!Digits()) {
      return Error("malformed number");
    }
    if (Peek() == '.') {
      ++pos_;
      if (!Digits()) return Error("malformed number");
    }
    if (Peek() == 'e' || Peek() == 'E') {
      ++pos_;
      if (Peek() == '+' || Peek() == '-') ++pos_;
      if (!Digits()) return Error("malformed number");
    }
    return Status::OK();
  }

  std::string_view s_;
  size_t pos_ = 0;
  const std::string& label_;
};

struct DTypeCode {
  std::string_view code;
  DType dtype;
};
constexpr DTypeCode kDTypeCodes[] = {
    {"F64", DType::kF64},   {"F32", DType::kF32},        {"F16", DType::kF16},
    {"BF16", DType::kBF16}, {"F8_E4M3", DType::kF8E4M3}, {"F8_E5M2", DType::kF8E5M2},
    {"I64", DType::kI64},   {"I32", DType::kI32},        {"I16", DType::kI16},
    {"I8", DType::kI8},     {"U8", DType::kU8},          {"BOOL", DType::kBool},
};

Status ParseMetadata(JsonCursor* json, const std::string& label,
                     std::vector<std::pair<std::string, std::string>>* metadata) {
  if (json->ConsumeWord("null")) return Status::OK();  // the reference accepts null
  AQ_RETURN_NOT_OK(json->Expect('{', "to open __metadata__"));
  if (json->Consume('}')) return Status::OK();
  while (true) {
    AQ_ASSIGN_OR_RETURN(std::string key, json->ParseString("a __metadata__ key"));
    AQ_RETURN_NOT_OK(json->Expect(':', "after a __metadata__ key"));
    json->SkipWhitespace();
    if (json->Peek() != '"') {
      return Status::FormatError(label + ": __metadata__ value of " + Quote(key) +
                                 " is not a string (SafeTensors metadata maps strings to strings)");
    }
    AQ_ASSIGN_OR_RETURN(std::string value, json->ParseString("a __metadata__ value"));
    metadata->emplace_back(std::move(key), std::move(value));
    if (json->Consume(',')) continue;
    AQ_RETURN_NOT_OK(json->Expect('}', "to close __metadata__"));
    break;
  }
  // Duplicate keys would make the map ambiguous.
  std::vector<std::string_view> keys;
  keys.reserve(metadata->size());
  for (const auto& kv : *metadata) keys.push_back(kv.first);
  std::sort(keys.begin(), keys.end());
  for (size_t i = 1; i < keys.size(); ++i) {
    if (keys[i] == keys[i - 1]) {
      return Status::FormatError(label + ": __metadata__ key " + Quote(keys[i]) +
                                 " appears more than once");
    }
  }
  return Status::OK();
}

Status ParseTensor(JsonCursor* json, const std::string& label, uint64_t data_size,
                   SafeTensorInfo* t) {
  const std::string where = label + ": tensor " + Quote(t->name) + ": ";
  AQ_RETURN_NOT_OK(json->Expect('{', "to open a tensor entry"));
  bool have_dtype = false, have_shape = false, have_offsets = false;
  if (!json->Consume('}')) {
    while (true) {
      AQ_ASSIGN_OR_RETURN(std::string key, json->ParseString("a tensor entry key"));
      AQ_RETURN_NOT_OK(json->Expect(':', "after a tensor entry key"));
      const bool is_dtype = key == "dtype", is_shape = key == "shape",
                 is_offsets = key == "data_offsets";
      if ((is_dtype && have_dtype) || (is_shape && have_shape) || (is_offsets && have_offsets)) {
        return Status::FormatError(where + "\"" + key + "\" appears more than once");
      }
      if (is_dtype) {
        have_dtype = true;
        json->SkipWhitespace();
        if (json->Peek() != '"') return Status::FormatError(where + "\"dtype\" is not a string");
        AQ_ASSIGN_OR_RETURN(std::string code, json->ParseString("dtype"));
        auto dt = ParseSafeTensorsDType(code);
        if (!dt.ok()) return dt.status().WithContext(where.substr(0, where.size() - 2));
        t->dtype = *dt;
      } else if (is_shape) {
        have_shape = true;
        AQ_RETURN_NOT_OK(json->Expect('[', "to open \"shape\""));
        if (!json->Consume(']')) {
          while (true) {
            if (t->shape.size() == kMaxRank) {
              return Status::FormatError(where + "shape has more than " + std::to_string(kMaxRank) +
                                         " dimensions");
            }
            AQ_ASSIGN_OR_RETURN(
                uint64_t d, json->ParseUnsigned("tensor " + Quote(t->name) + " shape dimension"));
            if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
              return Status::FormatError(where + "shape dimension " + std::to_string(d) +
                                         " does not fit in int64");
            }
            t->shape.push_back(static_cast<int64_t>(d));
            if (json->Consume(',')) continue;
            AQ_RETURN_NOT_OK(json->Expect(']', "to close \"shape\""));
            break;
          }
        }
      } else if (is_offsets) {
        have_offsets = true;
        AQ_RETURN_NOT_OK(json->Expect('[', "to open \"data_offsets\""));
        AQ_ASSIGN_OR_RETURN(
            t->begin, json->ParseUnsigned("tensor " + Quote(t->name) + " data_offsets begin"));
        AQ_RETURN_NOT_OK(json->Expect(',', "in \"data_offsets\" (two numbers expected)"));
        AQ_ASSIGN_OR_RETURN(t->end,
                            json->ParseUnsigned("tensor " + Quote(t->name) + " data_offsets end"));
        AQ_RETURN_NOT_OK(json->Expect(']', "to close \"data_offsets\" (two numbers expected)"));
      } else {
        AQ_RETURN_NOT_OK(json->SkipValue(3));  // unknown keys are ignored, as in the reference
      }
      if (json->Consume(',')) continue;
      AQ_RETURN_NOT_OK(json->Expect('}', "to close a tensor entry"));
      break;
    }
  }
  if (!have_dtype) return Status::FormatError(where + "missing \"dtype\"");
  if (!have_shape) return Status::FormatError(where + "missing \"shape\"");
  if (!have_offsets) return Status::FormatError(where + "missing \"data_offsets\"");

  // Element count: a zero dimension makes it 0, but the product of the other
  // dimensions must still fit in int64 so that any 2-D view of it does.
  int64_t product = 1;
  bool has_zero = false;
  for (int64_t d : t->shape) {
    if (d == 0) {
      has_zero = true;
      continue;
    }
    if (__builtin_mul_overflow(product, d, &product)) {
      return Status::FormatError(where + "the product of the shape overflows int64");
    }
  }
  t->numel = has_zero ? 0 : product;
  int64_t nbytes = 0;
  if (__builtin_mul_overflow(t->numel, static_cast<int64_t>(DTypeSize(t->dtype)), &nbytes)) {
    return Status::FormatError(where + "the byte size of the shape overflows int64");
  }
  if (t->begin > t->end) {
    return Status::FormatError(where + "data_offsets [" + std::to_string(t->begin) + ", " +
                               std::to_string(t->end) + "] end before they begin");
  }
  if (t->end > data_size) {
    return Status::FormatError(where + "data_offsets [" + std::to_string(t->begin) + ", " +
                               std::to_string(t->end) + "] run past the end of the data section (" +
                               std::to_string(data_size) + " bytes)");
  }
  if (t->end - t->begin != static_cast<uint64_t>(nbytes)) {
    return Status::FormatError(where + "data_offsets cover " + std::to_string(t->end - t->begin) +
                               " bytes but the shape and dtype " +
                               std::string(SafeTensorsDTypeCode(t->dtype)) + " need " +
                               std::to_string(nbytes));
  }
  return Status::OK();
}

}  // namespace

Result<DType> ParseSafeTensorsDType(std::string_view code) {
  for (const DTypeCode& c : kDTypeCodes) {
    if (c.code == code) return c.dtype;
  }
  return Status::FormatError("unsupported dtype " + Quote(code) +
                             " (supported: F64, F32, F16, BF16, F8_E4M3, F8_E5M2, I64, I32, I16, "
                             "I8, U8, BOOL)");
}

std::string_view SafeTensorsDTypeCode(DType dtype) {
  for (const DTypeCode& c : kDTypeCodes) {
    if (c.dtype == dtype) return c.code;
  }
  return "?";
}

Result<SafeTensorsHeader> ParseSafeTensorsHeader(std::string_view header_json, uint64_t data_size,
                                                 const std::string& file_label) {
  if (header_json.size() > kMaxSafeTensorsHeaderSize) {
    return Status::FormatError(file_label + ": SafeTensors header of " +
                               std::to_string(header_json.size()) + " bytes is larger than the " +
                               std::to_string(kMaxSafeTensorsHeaderSize) + "-byte limit");
  }
  JsonCursor json(header_json, file_label);
  SafeTensorsHeader header;
  json.SkipWhitespace();
  if (json.Peek() != '{') {
    return json.Error("the header must be a JSON object, found " + json.Describe());
  }
  AQ_RETURN_NOT_OK(json.Expect('{', "to open the header"));
  bool have_metadata = false;
  if (!json.Consume('}')) {
    while (true) {
      AQ_ASSIGN_OR_RETURN(std::string key, json.ParseString("a tensor name"));
      AQ_RETURN_NOT_OK(json.Expect(':', "after a tensor name"));
      if (key == "__metadata__") {
        if (have_metadata) {
          return Status::FormatError(file_label + ": __metadata__ appears more than once");
        }
        have_metadata = true;
        AQ_RETURN_NOT_OK(ParseMetadata(&json, file_label, &header.metadata));
      } else {
        if (key.find('\0') != std::string::npos) {
          return Status::FormatError(file_label + ": tensor name " + Quote(key) +
                                     " contains a NUL character");
        }
        SafeTensorInfo t;
        t.name = std::move(key);
        AQ_RETURN_NOT_OK(ParseTensor(&json, file_label, data_size, &t));
        header.tensors.push_back(std::move(t));
      }
      if (json.Consume(',')) continue;
      AQ_RETURN_NOT_OK(json.Expect('}', "to close the header"));
      break;
    }
  }
  json.SkipWhitespace();  // writers pad the header with spaces to 8 bytes
  if (!json.AtEnd()) return json.Error("trailing characters after the header object");

  std::vector<SafeTensorInfo>& ts = header.tensors;
  {
    std::vector<const SafeTensorInfo*> by_name;
    by_name.reserve(ts.size());
    for (const auto& t : ts) by_name.push_back(&t);
    std::sort(by_name.begin(), by_name.end(),
              [](const SafeTensorInfo* a, const SafeTensorInfo* b) { return a->name < b->name; });
    for (size_t i = 1; i < by_name.size(); ++i) {
      if (by_name[i]->name == by_name[i - 1]->name) {
        return Status::FormatError(file_label + ": tensor name " + Quote(by_name[i]->name) +
                                   " appears more than once");
      }
    }
  }
  std::sort(ts.begin(), ts.end(), [](const SafeTensorInfo& a, const SafeTensorInfo& b) {
    if (a.begin != b.begin) return a.begin < b.begin;
    if (a.end != b.end) return a.end < b.end;
    return a.name < b.name;
  });
  // Tiling: sorted by offset, each tensor starts where the previous ended.
  uint64_t expected = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    if (ts[i].begin != expected) {
      if (ts[i].begin < expected) {
        return Status::FormatError(file_label + ": tensor " + Quote(ts[i].name) + " at bytes [" +
                                   std::to_string(ts[i].begin) + ", " + std::to_string(ts[i].end) +
                                   ") overlaps tensor " + Quote(ts[i - 1].name) + " at [" +
                                   std::to_string(ts[i - 1].begin) + ", " +
                                   std::to_string(ts[i - 1].end) + ")");
      }
      return Status::FormatError(file_label + ": gap in the data section: bytes [" +
                                 std::to_string(expected) + ", " + std::to_string(ts[i].begin) +
                                 ") before tensor " + Quote(ts[i].name) + " belong to no tensor");
    }
    expected = ts[i].end;
  }
  if (expected != data_size) {
    return Status::FormatError(file_label + ": the tensors cover " + std::to_string(expected) +
                               " bytes of a " + std::to_string(data_size) +
                               "-byte data section (trailing bytes belong to no tensor)");
  }
  return header;
}

Result<uint64_t> CheckSafeTensorsHeaderLength(const uint8_t prefix[8], uint64_t file_size,
                                              const std::string& file_label) {
  if (file_size < 8) {
    return Status::FormatError(file_label + ": file of " + std::to_string(file_size) +
                               " bytes is too short to be SafeTensors (8-byte header length)");
  }
  uint64_t n = 0;
  for (int k = 7; k >= 0; --k) n = (n << 8) | prefix[k];
  if (n > file_size - 8) {
    return Status::FormatError(file_label + ": SafeTensors header length " + std::to_string(n) +
                               " is larger than the rest of the file (" +
                               std::to_string(file_size - 8) + " bytes)");
  }
  if (n > kMaxSafeTensorsHeaderSize) {
    return Status::FormatError(file_label + ": SafeTensors header length " + std::to_string(n) +
                               " exceeds the " + std::to_string(kMaxSafeTensorsHeaderSize) +
                               "-byte limit");
  }
  if (n < 2) {
    return Status::FormatError(file_label + ": SafeTensors header length " + std::to_string(n) +
                               " is too short for a JSON object");
  }
  return n;
}

Result<SafeTensorsHeader> ParseSafeTensorsBuffer(std::string_view file_bytes,
                                                 const std::string& file_label) {
  uint8_t prefix[8] = {0};
  std::memcpy(prefix, file_bytes.data(), std::min<size_t>(8, file_bytes.size()));
  AQ_ASSIGN_OR_RETURN(uint64_t n,
                      CheckSafeTensorsHeaderLength(prefix, file_bytes.size(), file_label));
  const uint64_t data_size = file_bytes.size() - 8 - n;
  AQ_ASSIGN_OR_RETURN(SafeTensorsHeader header,
                      ParseSafeTensorsHeader(file_bytes.substr(8, n), data_size, file_label));
  header.header_size = n;
  header.data_start = 8 + n;
  return header;
}

// ---------------------------------------------------------------------------

namespace {

std::string ErrnoText(int err) { return std::strerror(err); }

// pread of exactly `count` bytes; continues after short reads and EINTR.
// Returns the number of bytes read (< count only at end of file) or -errno.
int64_t PreadFully(int fd, void* out, uint64_t count, uint64_t offset) {
  auto* dst = static_cast<uint8_t*>(out);
  uint64_t done = 0;
  while (done < count) {
    // Linux transfers at most ~2 GiB per call; ask for 1 GiB at a time.
    const size_t want = static_cast<size_t>(std::min<uint64_t>(count - done, uint64_t{1} << 30));
    const ssize_t n = ::pread(fd, dst + done, want, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return -static_cast<int64_t>(errno);
    }
    if (n == 0) break;
    done += static_cast<uint64_t>(n);
  }
  return static_cast<int64_t>(done);
}

}  // namespace

Result<std::unique_ptr<SafeTensorsFile>> SafeTensorsFile::Open(const std::string& path,
                                                               SafeTensorsOpenOptions options) {
  int fd;
  do {
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT || err == ENOTDIR) {
      return Status::NotFound(path + ": no such SafeTensors file");
    }
    return Status::IOError(path + ": cannot open: " + ErrnoText(err));
  }
  std::unique_ptr<SafeTensorsFile> file(new SafeTensorsFile());
  file->path_ = path;
  file->fd_ = fd;  // closed by the destructor on every error path below
  file->options_ = options;
  struct stat st;
  if (::fstat(fd, &st) != 0) return Status::IOError(path + ": cannot stat: " + ErrnoText(errno));
  if (!S_ISREG(st.st_mode)) return Status::Invalid(path + ": not a regular file");
  file->file_size_ = static_cast<uint64_t>(st.st_size);

  uint8_t prefix[8] = {0};
  if (file->file_size_ >= 8) {
    const int64_t n = PreadFully(fd, prefix, 8, 0);
    if (n < 0) return Status::IOError(path + ": read failed: " + ErrnoText(static_cast<int>(-n)));
    if (n < 8) return Status::FormatError(path + ": file shrank while its header was read");
  }
  AQ_ASSIGN_OR_RETURN(uint64_t header_len,
                      CheckSafeTensorsHeaderLength(prefix, file->file_size_, path));
  // header_len <= min(100 MB, file size - 8): the allocation is bounded.
  std::string json(static_cast<size_t>(header_len), '\0');
  const int64_t n = PreadFully(fd, json.data(), header_len, 8);
  if (n < 0) return Status::IOError(path + ": read failed: " + ErrnoText(static_cast<int>(-n)));
  if (static_cast<uint64_t>(n) < header_len) {
    return Status::FormatError(path + ": file shrank while its header was read");
  }
  AQ_ASSIGN_OR_RETURN(file->header_,
                      ParseSafeTensorsHeader(json, file->file_size_ - 8 - header_len, path));
  file->header_.header_size = header_len;
  file->header_.data_start = 8 + header_len;
#ifdef POSIX_FADV_SEQUENTIAL
  // Tensors are read front to back: a larger read-ahead window helps.
  (void)::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
#endif
  return file;
}

SafeTensorsFile::~SafeTensorsFile() { (void)Close(); }

bool SafeTensorsFile::is_open() const {
  std::shared_lock lock(mutex_);
  return fd_ >= 0;
}

Status SafeTensorsFile::Close() {
  std::unique_lock lock(mutex_);
  if (fd_ < 0) return Status::OK();
  // On Linux the descriptor is released even when close() reports EINTR, so
  // it is never retried.
  const int rc = ::close(fd_);
  const int err = errno;
  fd_ = -1;
  if (rc != 0 && err != EINTR) return Status::IOError(path_ + ": close failed: " + ErrnoText(err));
  return Status::OK();
}

Result<size_t> SafeTensorsFile::FindTensor(std::string_view name) const {
  for (size_t i = 0; i < header_.tensors.size(); ++i) {
    if (header_.tensors[i].name == name) return i;
  }
  return Status::NotFound(path_ + ": no tensor named " + Quote(name));
}

Status SafeTensorsFile::ReadRange(size_t tensor_index, uint64_t byte_offset, uint64_t byte_count,
                                  void* out) const {
  std::shared_lock lock(mutex_);
  if (fd_ < 0) return Status::Invalid(path_ + ": read from a closed SafeTensors file");
  if (tensor_index >= header_.tensors.size()) {
    return Status::Invalid(path_ + ": tensor index " + std::to_string(tensor_index) +
                           " out of range (" + std::to_string(header_.tensors.size()) +
                           " tensors)");
  }
  const SafeTensorInfo& t = header_.tensors[tensor_index];
  if (byte_offset > t.nbytes() || byte_count > t.nbytes() - byte_offset) {
    return Status::Invalid(path_ + ": tensor " + Quote(t.name) + ": bytes [" +
                           std::to_string(byte_offset) + ", +" + std::to_string(byte_count) +
                           ") out of range (" + std::to_string(t.nbytes()) + " bytes)");
  }
  if (byte_count == 0) return Status::OK();
  const uint64_t at = header_.data_start + t.begin + byte_offset;
  const int64_t n = PreadFully(fd_, out, byte_count, at);
  if (n < 0) {
    return Status::IOError(path_ + ": tensor " + Quote(t.name) +
                           ": read failed: " + ErrnoText(static_cast<int>(-n)));
  }
  if (static_cast<uint64_t>(n) < byte_count) {
    struct stat st;
    const std::string now =
        ::fstat(fd_, &st) == 0 ? std::to_string(static_cast<uint64_t>(st.st_size)) : "?";
    return Status::FormatError(path_ + ": tensor " + Quote(t.name) + ": file ends at byte " +
                               std::to_string(at + static_cast<uint64_t>(n)) + ", " +
                               std::to_string(byte_count) + " bytes were expected at byte " +
                               std::to_string(at) + " (the file was " + std::to_string(file_size_) +
                               " bytes when opened, " + now +
                               " now: truncated or replaced while being read)");
  }
  if (options_.drop_cache_after_read) {
    (void)::posix_fadvise(fd_, static_cast<off_t>(at), static_cast<off_t>(byte_count),
                          POSIX_FADV_DONTNEED);
  }
  return Status::OK();
}

}  // namespace arrowquant
