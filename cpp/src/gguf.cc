// GGUF writer, block quantizers and header reader (see gguf.h for the layout).
#include "arrowquant/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <mutex>
#include <set>

#include "arrowquant/parallel.h"
#include "arrowquant/text.h"

namespace arrowquant::gguf {

namespace {

// Elements converted per piece on the F16 / F32 path.
constexpr int64_t kBlock = 32;

uint64_t AlignUp(uint64_t n, uint64_t alignment) {
  return (n + alignment - 1) / alignment * alignment;
}

// ---- little-endian encoding ---------------------------------------------

void PutU32(std::vector<uint8_t>& out, uint32_t v) {
  for (int k = 0; k < 4; ++k) out.push_back(static_cast<uint8_t>(v >> (8 * k)));
}
void PutU64(std::vector<uint8_t>& out, uint64_t v) {
  for (int k = 0; k < 8; ++k) out.push_back(static_cast<uint8_t>(v >> (8 * k)));
}
void PutString(std::vector<uint8_t>& out, const std::string& s) {
  PutU64(out, s.size());
  out.insert(out.end(), s.begin(), s.end());
}
void PutHalf(uint8_t* p, uint16_t h) {
  p[0] = static_cast<uint8_t>(h);
  p[1] = static_cast<uint8_t>(h >> 8);
}

int ScalarSize(ValueType t) {
  switch (t) {
    case ValueType::kUint8:
    case ValueType::kInt8:
    case ValueType::kBool:
      return 1;
    case ValueType::kUint16:
    case ValueType::kInt16:
      return 2;
    case ValueType::kUint32:
    case ValueType::kInt32:
    case ValueType::kFloat32:
      return 4;
    case ValueType::kUint64:
    case ValueType::kInt64:
    case ValueType::kFloat64:
      return 8;
    default:
      return 0;
  }
}

bool IsSigned(ValueType t) {
  return t == ValueType::kInt8 || t == ValueType::kInt16 || t == ValueType::kInt32 ||
         t == ValueType::kInt64;
}

Status EncodeScalar(std::vector<uint8_t>& out, const Value& v, ValueType t) {
  const int size = ScalarSize(t);
  uint64_t bits = 0;
  if (t == ValueType::kFloat32) {
    const float f = static_cast<float>(v.f);
    uint32_t b;
    std::memcpy(&b, &f, 4);
    bits = b;
  } else if (t == ValueType::kFloat64) {
    std::memcpy(&bits, &v.f, 8);
  } else if (t == ValueType::kBool) {
    bits = v.u ? 1 : 0;
  } else if (IsSigned(t)) {
    bits = static_cast<uint64_t>(v.i);
  } else {
    bits = v.u;
  }
  for (int k = 0; k < size; ++k) out.push_back(static_cast<uint8_t>(bits >> (8 * k)));
  return Status::OK();
}

Status EncodeValue(std::vector<uint8_t>& out, const Value& v) {
  PutU32(out, static_cast<uint32_t>(v.type));
  if (v.type == ValueType::kString) {
    PutString(out, v.s);
    return Status::OK();
  }
  if (v.type == ValueType::kArray) {
    if (v.elem_type == ValueType::kArray) {
      return Status::Invalid("GGUF arrays of arrays are not supported");
    }
    PutU32(out, static_cast<uint32_t>(v.elem_type));
    PutU64(out, v.items.size());
    for (const Value& item : v.items) {
      if (v.elem_type == ValueType::kString) {
        PutString(out, item.s);
      } else {
        if (ScalarSize(v.elem_type) == 0) return Status::Invalid("bad GGUF array element type");
        AQ_RETURN_NOT_OK(EncodeScalar(out, item, v.elem_type));
      }
    }
    return Status::OK();
  }
  if (ScalarSize(v.type) == 0) return Status::Invalid("bad GGUF value type");
  return EncodeScalar(out, v, v.type);
}

// float16 -> float32 by table (256 KiB, built once): the exact conversion of
// dtype.h, without its branches, for the common float16 checkpoints.
const float* HalfTable() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t h = 0; h < 65536; ++h) t[h] = HalfToFloat(static_cast<uint16_t>(h));
    return t;
  }();
  return table.data();
}

void ConvertPiece(DType dtype, const uint8_t* src, float* dst, int64_t n, const float* half_table) {
  if (dtype == DType::kF16) {
    for (int64_t j = 0; j < n; ++j) {
      uint16_t h;
      std::memcpy(&h, src + 2 * j, 2);
      dst[j] = half_table[h];
    }
  } else {
    ConvertToFloat32(dtype, src, dst, static_cast<size_t>(n));
  }
}

Status MakeIOError(const std::string& what, const std::string& path) {
  return Status::IOError(what + " '" + path + "': " + std::strerror(errno));
}

}  // namespace

// ---- types ----------------------------------------------------------------

bool IsWritableType(GgmlType type) { return IsCodecType(type); }

Result<GgmlType> ParseWritableType(const std::string& name) { return ParseCodecType(name); }

Result<uint64_t> TensorBytes(GgmlType type, int64_t numel) {
  AQ_ASSIGN_OR_RETURN(TypeTraits t, GetTypeTraits(static_cast<uint32_t>(type)));
  if (numel < 0 || numel % t.block_size != 0) {
    return Status::Invalid(std::to_string(numel) + " elements do not fill whole " +
                           GgmlTypeName(static_cast<uint32_t>(type)) + " blocks");
  }
  return static_cast<uint64_t>(numel / t.block_size) * static_cast<uint64_t>(t.block_bytes);
}

namespace {

struct FileTypeName {
  const char* name;
  uint32_t value;
};

// enum llama_ftype (gguf.constants.LlamaFileType), without the MOSTLY_ prefix.
constexpr FileTypeName kFileTypes[] = {
    {"ALL_F32", 0}, {"F32", 0},      {"F16", 1},      {"Q4_0", 2},    {"Q4_1", 3},
    {"Q8_0", 7},    {"Q5_0", 8},     {"Q5_1", 9},     {"Q2_K", 10},   {"Q3_K_S", 11},
    {"Q3_K_M", 12}, {"Q3_K_L", 13},  {"Q4_K_S", 14},  {"Q4_K_M", 15}, {"Q5_K_S", 16},
    {"Q5_K_M", 17}, {"Q6_K", 18},    {"IQ2_XXS", 19}, {"IQ2_XS", 20}, {"Q2_K_S", 21},
    {"IQ3_XS", 22}, {"IQ3_XXS", 23}, {"IQ1_S", 24},   {"IQ4_NL", 25}, {"IQ3_S", 26},
    {"IQ3_M", 27},  {"IQ2_S", 28},   {"IQ2_M", 29},   {"IQ4_XS", 30}, {"IQ1_M", 31},
    {"BF16", 32},   {"TQ1_0", 36},   {"TQ2_0", 37},
};

}  // namespace

uint32_t FileTypeFor(GgmlType type) {
  switch (type) {
    case GgmlType::kF32:
      return 0;  // LLAMA_FTYPE_ALL_F32
    case GgmlType::kF16:
      return 1;  // MOSTLY_F16
    case GgmlType::kQ4_0:
      return 2;  // MOSTLY_Q4_0
    case GgmlType::kQ4_1:
      return 3;  // MOSTLY_Q4_1
    case GgmlType::kQ8_0:
      return 7;  // MOSTLY_Q8_0
    case GgmlType::kQ5_0:
      return 8;  // MOSTLY_Q5_0
    case GgmlType::kQ5_1:
      return 9;  // MOSTLY_Q5_1
    case GgmlType::kQ2_K:
      return 10;  // MOSTLY_Q2_K
    case GgmlType::kQ3_K:
      return 11;  // MOSTLY_Q3_K_S
    case GgmlType::kQ4_K:
      return 14;  // MOSTLY_Q4_K_S
    case GgmlType::kQ5_K:
      return 16;  // MOSTLY_Q5_K_S
    case GgmlType::kQ6_K:
      return 18;  // MOSTLY_Q6_K
    case GgmlType::kIQ4_NL:
      return 25;  // MOSTLY_IQ4_NL
    case GgmlType::kIQ4_XS:
      return 30;  // MOSTLY_IQ4_XS
    case GgmlType::kBF16:
      return 32;  // MOSTLY_BF16
    default:
      return 0;
  }
}

Result<uint32_t> ParseFileType(const std::string& name) {
  std::string upper;
  for (char c : name)
    upper.push_back(static_cast<char>(std::toupper(static_cast<unsigned char>(c))));
  if (upper.rfind("LLAMA_FTYPE_", 0) == 0) upper = upper.substr(12);
  if (upper.rfind("MOSTLY_", 0) == 0) upper = upper.substr(7);
  for (const FileTypeName& f : kFileTypes) {
    if (upper == f.name) return f.value;
  }
  return Status::Invalid("unknown llama.cpp file type '" + name + "'");
}

// ---- values ---------------------------------------------------------------

const char* ValueTypeName(ValueType type) {
  switch (type) {
    case ValueType::kUint8:
      return "uint8";
    case ValueType::kInt8:
      return "int8";
    case ValueType::kUint16:
      return "uint16";
    case ValueType::kInt16:
      return "int16";
    case ValueType::kUint32:
      return "uint32";
    case ValueType::kInt32:
      return "int32";
    case ValueType::kFloat32:
      return "float32";
    case ValueType::kBool:
      return "bool";
    case ValueType::kString:
      return "string";
    case ValueType::kArray:
      return "array";
    case ValueType::kUint64:
      return "uint64";
    case ValueType::kInt64:
      return "int64";
    case ValueType::kFloat64:
      return "float64";
  }
  return "unknown";
}

Value Value::U32(uint32_t v) {
  Value x;
  x.type = ValueType::kUint32;
  x.u = v;
  return x;
}
Value Value::I32(int32_t v) {
  Value x;
  x.type = ValueType::kInt32;
  x.i = v;
  return x;
}
Value Value::U64(uint64_t v) {
  Value x;
  x.type = ValueType::kUint64;
  x.u = v;
  return x;
}
Value Value::I64(int64_t v) {
  Value x;
  x.type = ValueType::kInt64;
  x.i = v;
  return x;
}
Value Value::F32(float v) {
  Value x;
  x.type = ValueType::kFloat32;
  x.f = v;
  return x;
}
Value Value::F64(double v) {
  Value x;
  x.type = ValueType::kFloat64;
  x.f = v;
  return x;
}
Value Value::Bool(bool v) {
  Value x;
  x.type = ValueType::kBool;
  x.u = v ? 1 : 0;
  return x;
}
Value Value::String(std::string v) {
  Value x;
  x.type = ValueType::kString;
  x.s = std::move(v);
  return x;
}
Value Value::Array(ValueType elem_type, std::vector<Value> items) {
  Value x;
  x.type = ValueType::kArray;
  x.elem_type = elem_type;
  x.items = std::move(items);
  return x;
}

// ---- layout ---------------------------------------------------------------

Result<std::vector<TensorLayout>> LayoutTensors(const std::vector<TensorSpec>& tensors,
                                                uint32_t alignment) {
  if (alignment == 0 || (alignment & (alignment - 1)) != 0) {
    return Status::Invalid("GGUF alignment must be a power of two, got " +
                           std::to_string(alignment));
  }
  std::vector<TensorLayout> out;
  std::set<std::string> names;
  uint64_t offset = 0;
  for (const TensorSpec& t : tensors) {
    const std::string where = "tensor '" + t.name + "'";
    if (t.name.empty()) return Status::Invalid("GGUF tensor names must not be empty");
    if (!names.insert(t.name).second) return Status::Invalid(where + ": duplicate tensor name");
    if (!IsWritableType(t.type)) {
      return Status::Invalid(where + ": the writer cannot make type " +
                             GgmlTypeName(static_cast<uint32_t>(t.type)));
    }
    if (t.shape.size() > static_cast<size_t>(kMaxDims)) {
      return Status::Invalid(where + ": GGUF tensors have at most 4 dimensions, got " +
                             std::to_string(t.shape.size()));
    }
    TensorLayout l;
    l.name = t.name;
    l.type = t.type;
    int64_t numel = 1;
    for (auto it = t.shape.rbegin(); it != t.shape.rend(); ++it) {
      if (*it <= 0) return Status::Invalid(where + ": dimensions must be positive");
      if (numel > std::numeric_limits<int64_t>::max() / *it) {
        return Status::Invalid(where + ": element count overflows");
      }
      numel *= *it;
      l.dims.push_back(static_cast<uint64_t>(*it));
    }
    if (l.dims.empty()) l.dims.push_back(1);  // a 0-D tensor is stored as [1]
    l.numel = numel;
    l.rows = t.shape.size() >= 2 ? t.shape[0] : 1;
    l.cols = numel / l.rows;
    AQ_ASSIGN_OR_RETURN(TypeTraits traits, GetTypeTraits(static_cast<uint32_t>(t.type)));
    if (static_cast<int64_t>(l.dims[0]) % traits.block_size != 0) {
      return Status::Invalid(where + ": row length " + std::to_string(l.dims[0]) +
                             " is not a multiple of " + std::to_string(traits.block_size) + " as " +
                             GgmlTypeName(static_cast<uint32_t>(t.type)) + " needs");
    }
    AQ_ASSIGN_OR_RETURN(l.nbytes, TensorBytes(t.type, numel));
    l.offset = offset;
    offset = AlignUp(offset + l.nbytes, alignment);
    out.push_back(std::move(l));
  }
  return out;
}

// ---- writer ---------------------------------------------------------------

Result<std::unique_ptr<Writer>> Writer::Create(const std::string& path,
                                               std::vector<KeyValue> metadata,
                                               const std::vector<TensorSpec>& tensors,
                                               uint32_t alignment) {
  AQ_ASSIGN_OR_RETURN(std::vector<TensorLayout> layout, LayoutTensors(tensors, alignment));
  std::set<std::string> keys;
  for (const KeyValue& kv : metadata) {
    if (kv.first.empty()) return Status::Invalid("GGUF metadata keys must not be empty");
    if (!keys.insert(kv.first).second) {
      return Status::Invalid("duplicate GGUF metadata key '" + kv.first + "'");
    }
  }
  if (keys.count("general.alignment") != 0) {
    for (const KeyValue& kv : metadata) {
      if (kv.first == "general.alignment" &&
          (kv.second.type != ValueType::kUint32 || kv.second.u != alignment)) {
        return Status::Invalid("general.alignment must be the uint32 " + std::to_string(alignment));
      }
    }
  } else {
    metadata.emplace_back("general.alignment", Value::U32(alignment));
  }
  bool has_block_type = false;
  for (const TensorLayout& l : layout) {
    has_block_type |= IsBlockType(l.type);
  }
  if (has_block_type && keys.count("general.quantization_version") == 0) {
    metadata.emplace_back("general.quantization_version", Value::U32(kQuantizationVersion));
  }

  std::vector<uint8_t> header;
  PutU32(header, kMagic);
  PutU32(header, kVersion);
  PutU64(header, layout.size());
  PutU64(header, metadata.size());
  for (const KeyValue& kv : metadata) {
    PutString(header, kv.first);
    AQ_RETURN_NOT_OK(EncodeValue(header, kv.second).WithContext("metadata '" + kv.first + "'"));
  }
  for (const TensorLayout& l : layout) {
    PutString(header, l.name);
    PutU32(header, static_cast<uint32_t>(l.dims.size()));
    for (uint64_t d : l.dims) PutU64(header, d);
    PutU32(header, static_cast<uint32_t>(l.type));
    PutU64(header, l.offset);
  }
  const uint64_t data_offset = AlignUp(header.size(), alignment);
  header.resize(data_offset, 0);

  std::unique_ptr<Writer> w(new Writer());
  w->path_ = path;
  w->temp_path_ = path + ".tmp-" + std::to_string(::getpid());
  w->alignment_ = alignment;
  w->data_offset_ = data_offset;
  w->layout_ = std::move(layout);
  w->fd_ = ::open(w->temp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW,
                  0644);  // never through a symlink planted in its place
  if (w->fd_ < 0) return MakeIOError("cannot create", w->temp_path_);
  AQ_RETURN_NOT_OK(w->WriteAll(header.data(), header.size()));
  // Tensors with nothing to stream (never: every tensor has >= 1 element) would be skipped here.
  return w;
}

Writer::~Writer() { Abort(); }

void Writer::Abort() {
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
  }
  if (!finished_ && !temp_path_.empty()) {
    ::unlink(temp_path_.c_str());
    temp_path_.clear();
  }
  failed_ = !finished_;
}

Status Writer::Fail(Status st) {
  Abort();
  return st;
}

Status Writer::WriteAll(const void* data, size_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    const ssize_t k = ::write(fd_, p, n);
    if (k < 0) {
      if (errno == EINTR) continue;
      return Fail(MakeIOError("cannot write", temp_path_));
    }
    p += k;
    n -= static_cast<size_t>(k);
    position_ += static_cast<uint64_t>(k);
  }
  return Status::OK();
}

Status Writer::AppendRows(const TensorView& src, const ExecOptions& exec, ErrorStats* stats) {
  if (finished_ || failed_ || fd_ < 0) return Status::Invalid("GGUF writer is closed");
  if (current_ >= layout_.size()) {
    return Fail(Status::Invalid("every tensor is already complete"));
  }
  const TensorLayout& l = layout_[current_];
  const std::string where = "tensor '" + l.name + "'";
  if (!IsQuantizableFloat(src.dtype)) {
    return Fail(Status::Invalid(where + ": dtype " + std::string(DTypeName(src.dtype)) +
                                " cannot be written as " +
                                GgmlTypeName(static_cast<uint32_t>(l.type))));
  }
  if (src.cols != l.cols) {
    return Fail(Status::ShapeMismatch(where + ": rows of " + std::to_string(src.cols) +
                                      " elements given, the tensor's rows have " +
                                      std::to_string(l.cols)));
  }
  if (src.rows <= 0 || src.rows > l.rows - rows_done_) {
    return Fail(Status::ShapeMismatch(where + ": " + std::to_string(src.rows) + " rows given, " +
                                      std::to_string(l.rows - rows_done_) + " left"));
  }
  if (src.data == nullptr) return Fail(Status::Invalid(where + ": null data"));

  const int64_t n = src.rows * src.cols;
  const TypeTraits traits = *GetTypeTraits(static_cast<uint32_t>(l.type));
  const uint64_t out_bytes =
      static_cast<uint64_t>(n / traits.block_size) * static_cast<uint64_t>(traits.block_bytes);
  buffer_.resize(out_bytes);
  const size_t in_item = DTypeSize(src.dtype);
  const uint8_t* in = static_cast<const uint8_t*>(src.data);
  uint8_t* out = buffer_.data();

  const GgmlType type = l.type;
  const float* half_table = src.dtype == DType::kF16 ? HalfTable() : nullptr;
  const int threads = ResolveThreads(exec.threads);
  if (IsBlockType(type)) {
    // Slices of whole rows converted to float32 (a few MiB, reused), then
    // encoded by QuantizeBlocks with this tensor's options.
    const int64_t slice_rows = std::max<int64_t>(1, (int64_t{1} << 20) / src.cols);
    const uint64_t row_bytes = out_bytes / static_cast<uint64_t>(src.rows);
    BlockOptions opts;
    opts.mode = mode_;
    opts.importance = importance_.empty() ? nullptr : importance_.data();
    opts.exec = exec;
    for (int64_t r0 = 0; r0 < src.rows; r0 += slice_rows) {
      const int64_t nr = std::min(slice_rows, src.rows - r0);
      const int64_t count = nr * src.cols;
      rows_f32_.resize(static_cast<size_t>(count));
      float* xf = rows_f32_.data();
      const uint8_t* base = in + static_cast<size_t>(r0 * src.cols) * in_item;
      ParallelFor(count / kBlock, threads, 1024, [&](int64_t p0, int64_t p1) {
        ConvertPiece(src.dtype, base + static_cast<size_t>(p0 * kBlock) * in_item, xf + p0 * kBlock,
                     (p1 - p0) * kBlock, half_table);
      });
      opts.first_row = rows_done_ + r0;
      Status st = QuantizeBlocks(type, xf, nr, src.cols,
                                 out + static_cast<uint64_t>(r0) * row_bytes, opts, stats);
      if (!st.ok()) return Fail(st.WithContext(where));
    }
  } else {
    // F32 / F16: pieces of 32 elements converted to float32 on the stack;
    // threads take disjoint ranges of pieces.
    const int64_t pieces = (n + kBlock - 1) / kBlock;
    OrderedStats parts;
    ParallelFor(pieces, threads, 256, [&](int64_t begin, int64_t end) {
      float x[kBlock];
      float y[kBlock];
      ErrorStats local;
      for (int64_t p = begin; p < end; ++p) {
        const int64_t start = p * kBlock;
        const int64_t count = std::min<int64_t>(kBlock, n - start);
        ConvertPiece(src.dtype, in + static_cast<size_t>(start) * in_item, x, count, half_table);
        if (type == GgmlType::kF32) {
          std::memcpy(out + start * 4, x, static_cast<size_t>(count) * 4);
          if (stats != nullptr) std::memcpy(y, x, static_cast<size_t>(count) * 4);
        } else if (src.dtype == DType::kF16) {
          // float16 to F16: the bytes themselves.
          std::memcpy(out + start * 2, in + start * 2, static_cast<size_t>(count) * 2);
          if (stats != nullptr) std::memcpy(y, x, static_cast<size_t>(count) * 4);
        } else {
          for (int64_t j = 0; j < count; ++j) {
            const uint16_t h = FloatToHalf(x[j]);
            PutHalf(out + (start + j) * 2, h);
            y[j] = HalfToFloat(h);
          }
        }
        if (stats != nullptr) {
          for (int64_t j = 0; j < count; ++j) {
            const double xv = x[j];
            const double yv = y[j];
            const double e = xv - yv;
            local.sum_x2 += xv * xv;
            local.sum_xhat2 += yv * yv;
            local.sum_x_xhat += xv * yv;
            local.sum_err2 += e * e;
            local.max_abs_err = std::max(local.max_abs_err, std::fabs(e));
          }
          local.count += count;
        }
      }
      if (stats != nullptr) parts.Add(begin, local);
    });
    if (stats != nullptr) parts.MergeInto(stats);
  }

  AQ_RETURN_NOT_OK(WriteAll(buffer_.data(), buffer_.size()));
  rows_done_ += src.rows;
  if (rows_done_ == l.rows) {
    // Pad to the next tensor's (aligned) offset.
    const uint64_t end = data_offset_ + AlignUp(l.offset + l.nbytes, alignment_);
    if (current_ + 1 < layout_.size()) {
      static const uint8_t kZeros[256] = {};
      while (position_ < end) {
        const size_t k = static_cast<size_t>(std::min<uint64_t>(sizeof(kZeros), end - position_));
        AQ_RETURN_NOT_OK(WriteAll(kZeros, k));
      }
    }
    ++current_;
    rows_done_ = 0;
    mode_ = BlockMode::kSearch;
    importance_.clear();
  }
  return Status::OK();
}

Status Writer::SetTensorOptions(BlockMode mode, std::vector<float> importance) {
  if (finished_ || failed_ || fd_ < 0) return Status::Invalid("GGUF writer is closed");
  if (current_ >= layout_.size()) return Status::Invalid("every tensor is already complete");
  const TensorLayout& l = layout_[current_];
  const std::string where = "tensor '" + l.name + "'";
  if (rows_done_ != 0) {
    return Status::Invalid(where + ": options must be set before the tensor's first rows");
  }
  if (!importance.empty()) {
    if (static_cast<int64_t>(importance.size()) != l.cols) {
      return Status::ShapeMismatch(where + ": " + std::to_string(importance.size()) +
                                   " importance weights given, its rows have " +
                                   std::to_string(l.cols) + " columns");
    }
    if (!IsBlockType(l.type)) {
      return Status::Invalid(where + ": importance weights apply to block types, not " +
                             GgmlTypeName(static_cast<uint32_t>(l.type)));
    }
    if (mode == BlockMode::kReference) {
      return Status::Invalid(where + ": importance weights need block mode 'search'");
    }
    for (size_t c = 0; c < importance.size(); ++c) {
      if (!std::isfinite(importance[c]) || importance[c] < 0.0f) {
        return Status::Invalid(where + ": importance weight of column " + std::to_string(c) +
                               " is " + std::to_string(importance[c]) +
                               "; weights must be finite and >= 0");
      }
    }
  }
  mode_ = mode;
  importance_ = std::move(importance);
  return Status::OK();
}

Status Writer::Finish() {
  if (finished_) return Status::OK();
  if (failed_ || fd_ < 0) return Status::Invalid("GGUF writer is closed");
  if (current_ < layout_.size()) {
    return Fail(Status::Invalid("tensor '" + layout_[current_].name + "' is incomplete (" +
                                std::to_string(rows_done_) + " of " +
                                std::to_string(layout_[current_].rows) + " rows written)"));
  }
  if (::fsync(fd_) != 0) return Fail(MakeIOError("cannot sync", temp_path_));
  if (::close(fd_) != 0) {
    fd_ = -1;
    return Fail(MakeIOError("cannot close", temp_path_));
  }
  fd_ = -1;
  if (::rename(temp_path_.c_str(), path_.c_str()) != 0) {
    return Fail(MakeIOError("cannot rename to '" + path_ + "' from", temp_path_));
  }
  finished_ = true;
  return Status::OK();
}

// ---- reader ---------------------------------------------------------------

const Value* File::Find(const std::string& key) const {
  for (const KeyValue& kv : metadata) {
    if (kv.first == key) return &kv.second;
  }
  return nullptr;
}

namespace {

class Cursor {
 public:
  Cursor(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  size_t pos() const { return pos_; }
  size_t left() const { return size_ - pos_; }

  Status Need(size_t n, const char* what) {
    if (n > left()) {
      return Status::FormatError(std::string("truncated GGUF header: ") + what + " at byte " +
                                 std::to_string(pos_) + " needs " + std::to_string(n) + " bytes, " +
                                 std::to_string(left()) + " left");
    }
    return Status::OK();
  }
  Result<uint64_t> Uint(int size, const char* what) {
    AQ_RETURN_NOT_OK(Need(static_cast<size_t>(size), what));
    uint64_t v = 0;
    for (int k = 0; k < size; ++k) v |= static_cast<uint64_t>(data_[pos_ + k]) << (8 * k);
    pos_ += static_cast<size_t>(size);
    return v;
  }
  Result<std::string> String(const char* what) {
    AQ_ASSIGN_OR_RETURN(uint64_t n, Uint(8, what));
    if (n > left()) {
      return Status::FormatError(std::string("GGUF ") + what + " of " + std::to_string(n) +
                                 " bytes at byte " + std::to_string(pos_) + " runs past the end");
    }
    std::string s(reinterpret_cast<const char*>(data_ + pos_), static_cast<size_t>(n));
    const size_t bad = text::FirstInvalidUtf8(s);
    if (bad != s.size()) {
      return Status::FormatError(std::string("GGUF ") + what + " at byte " + std::to_string(pos_) +
                                 " is not valid UTF-8 (byte " + std::to_string(pos_ + bad) + ")");
    }
    pos_ += static_cast<size_t>(n);
    return s;
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

Result<Value> ReadScalar(Cursor& c, ValueType t) {
  Value v;
  v.type = t;
  const int size = ScalarSize(t);
  AQ_ASSIGN_OR_RETURN(uint64_t bits, c.Uint(size, "value"));
  if (t == ValueType::kFloat32) {
    const uint32_t b = static_cast<uint32_t>(bits);
    float f;
    std::memcpy(&f, &b, 4);
    v.f = f;
  } else if (t == ValueType::kFloat64) {
    std::memcpy(&v.f, &bits, 8);
  } else if (t == ValueType::kBool) {
    if (bits > 1) return Status::FormatError("GGUF bool value " + std::to_string(bits));
    v.u = bits;
  } else if (IsSigned(t)) {
    // Sign-extend from `size` bytes.
    const int shift = 64 - 8 * size;
    v.i = static_cast<int64_t>(bits << shift) >> shift;
  } else {
    v.u = bits;
  }
  return v;
}

bool KnownValueType(uint32_t t) { return t <= static_cast<uint32_t>(ValueType::kFloat64); }

Result<Value> ReadValue(Cursor& c) {
  AQ_ASSIGN_OR_RETURN(uint64_t raw_type, c.Uint(4, "value type"));
  if (!KnownValueType(static_cast<uint32_t>(raw_type))) {
    return Status::FormatError("unknown GGUF value type " + std::to_string(raw_type));
  }
  const ValueType t = static_cast<ValueType>(raw_type);
  if (t == ValueType::kString) {
    Value v;
    v.type = t;
    AQ_ASSIGN_OR_RETURN(v.s, c.String("string value"));
    return v;
  }
  if (t != ValueType::kArray) return ReadScalar(c, t);
  AQ_ASSIGN_OR_RETURN(uint64_t raw_elem, c.Uint(4, "array element type"));
  if (!KnownValueType(static_cast<uint32_t>(raw_elem))) {
    return Status::FormatError("unknown GGUF array element type " + std::to_string(raw_elem));
  }
  const ValueType elem = static_cast<ValueType>(raw_elem);
  if (elem == ValueType::kArray)
    return Status::FormatError("GGUF arrays of arrays are not supported");
  AQ_ASSIGN_OR_RETURN(uint64_t count, c.Uint(8, "array length"));
  // Every item takes at least its scalar size (a string at least its 8-byte
  // length), so a count the remaining bytes cannot hold is refused before
  // anything is allocated.
  const uint64_t min_item =
      elem == ValueType::kString ? 8 : static_cast<uint64_t>(ScalarSize(elem));
  if (count > c.left() / min_item) {
    return Status::FormatError("GGUF array of " + std::to_string(count) + " " +
                               ValueTypeName(elem) + " items runs past the end");
  }
  std::vector<Value> items;
  items.reserve(static_cast<size_t>(count));
  for (uint64_t k = 0; k < count; ++k) {
    if (elem == ValueType::kString) {
      Value v;
      v.type = elem;
      AQ_ASSIGN_OR_RETURN(v.s, c.String("string item"));
      items.push_back(std::move(v));
    } else {
      AQ_ASSIGN_OR_RETURN(Value v, ReadScalar(c, elem));
      items.push_back(std::move(v));
    }
  }
  return Value::Array(elem, std::move(items));
}

}  // namespace

Result<File> Parse(const uint8_t* data, size_t size, bool header_only, uint64_t file_size) {
  if (!header_only) file_size = size;
  Cursor c(data, size);
  File f;
  f.file_size = file_size;
  AQ_ASSIGN_OR_RETURN(uint64_t magic, c.Uint(4, "magic"));
  if (magic != kMagic) return Status::FormatError("not a GGUF file (bad magic)");
  AQ_ASSIGN_OR_RETURN(uint64_t version, c.Uint(4, "version"));
  if (version != 2 && version != 3) {
    return Status::FormatError("unsupported GGUF version " + std::to_string(version) +
                               " (2 and 3 are read)");
  }
  f.version = static_cast<uint32_t>(version);
  AQ_ASSIGN_OR_RETURN(uint64_t n_tensors, c.Uint(8, "tensor count"));
  AQ_ASSIGN_OR_RETURN(uint64_t n_kv, c.Uint(8, "metadata count"));
  // Minimum encoded sizes: a key-value takes 8 + 4 + 1 bytes, a tensor info 8 + 4 + 4 + 8.
  if (n_kv > c.left() / 13) {
    return Status::FormatError("GGUF metadata count " + std::to_string(n_kv) +
                               " does not fit in the file");
  }
  if (n_tensors > c.left() / 24) {
    return Status::FormatError("GGUF tensor count " + std::to_string(n_tensors) +
                               " does not fit in the file");
  }
  std::set<std::string> keys;
  for (uint64_t k = 0; k < n_kv; ++k) {
    AQ_ASSIGN_OR_RETURN(std::string key, c.String("metadata key"));
    if (!keys.insert(key).second) return Status::FormatError("duplicate GGUF key '" + key + "'");
    Result<Value> v = ReadValue(c);
    if (!v.ok()) return v.status().WithContext("GGUF key '" + key + "'");
    f.metadata.emplace_back(std::move(key), std::move(v).value());
  }
  if (const Value* a = f.Find("general.alignment")) {
    if (a->type != ValueType::kUint32 || a->u == 0 || (a->u & (a->u - 1)) != 0) {
      return Status::FormatError("general.alignment must be a uint32 power of two");
    }
    f.alignment = static_cast<uint32_t>(a->u);
  }
  std::set<std::string> names;
  for (uint64_t k = 0; k < n_tensors; ++k) {
    TensorInfo t;
    AQ_ASSIGN_OR_RETURN(t.name, c.String("tensor name"));
    const std::string where = "GGUF tensor '" + t.name + "'";
    if (!names.insert(t.name).second) return Status::FormatError(where + " appears twice");
    AQ_ASSIGN_OR_RETURN(uint64_t n_dims, c.Uint(4, "n_dims"));
    if (n_dims == 0 || n_dims > static_cast<uint64_t>(kMaxDims)) {
      return Status::FormatError(where + ": " + std::to_string(n_dims) +
                                 " dimensions (1 to 4 allowed)");
    }
    uint64_t numel = 1;
    for (uint64_t d = 0; d < n_dims; ++d) {
      AQ_ASSIGN_OR_RETURN(uint64_t dim, c.Uint(8, "dimension"));
      if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          (dim != 0 && numel > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / dim)) {
        return Status::FormatError(where + ": element count overflows");
      }
      numel *= dim;
      t.dims.push_back(dim);
    }
    t.numel = numel;
    AQ_ASSIGN_OR_RETURN(uint64_t type, c.Uint(4, "tensor type"));
    t.type = static_cast<uint32_t>(type);
    Result<TypeTraits> traits = GetTypeTraits(t.type);
    if (!traits.ok()) return traits.status().WithContext(where);
    if (t.dims[0] % static_cast<uint64_t>(traits->block_size) != 0) {
      return Status::FormatError(where + ": row length " + std::to_string(t.dims[0]) +
                                 " is not a multiple of the " + GgmlTypeName(t.type) +
                                 " block size");
    }
    const uint64_t blocks = numel / static_cast<uint64_t>(traits->block_size);
    if (blocks >
        std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(traits->block_bytes)) {
      return Status::FormatError(where + ": byte size overflows");
    }
    t.nbytes = blocks * static_cast<uint64_t>(traits->block_bytes);
    AQ_ASSIGN_OR_RETURN(t.offset, c.Uint(8, "tensor offset"));
    if (t.offset % f.alignment != 0) {
      return Status::FormatError(where + ": offset " + std::to_string(t.offset) +
                                 " is not a multiple of the alignment " +
                                 std::to_string(f.alignment));
    }
    f.tensors.push_back(std::move(t));
  }
  f.data_offset = AlignUp(c.pos(), f.alignment);
  if (f.data_offset > file_size) {
    return Status::FormatError("GGUF file ends inside the header padding");
  }
  const uint64_t data_size = file_size - f.data_offset;
  // Bounds and overlaps: sort tensors by offset and walk them.
  std::vector<const TensorInfo*> by_offset;
  for (const TensorInfo& t : f.tensors) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->offset < b->offset; });
  uint64_t end_prev = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo* t : by_offset) {
    if (t->offset > data_size || t->nbytes > data_size - t->offset) {
      return Status::FormatError("GGUF tensor '" + t->name + "' (" + std::to_string(t->nbytes) +
                                 " bytes at data offset " + std::to_string(t->offset) +
                                 ") runs past the end of the file");
    }
    if (prev != nullptr && t->offset < end_prev) {
      return Status::FormatError("GGUF tensors '" + prev->name + "' and '" + t->name + "' overlap");
    }
    end_prev = t->offset + t->nbytes;
    prev = t;
  }
  return f;
}

Result<File> ReadFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return Status::NotFound("no such file '" + path + "'");
    return MakeIOError("cannot open", path);
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const Status s = MakeIOError("cannot stat", path);
    ::close(fd);
    return s;
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (size == 0) {
    ::close(fd);
    return Status::FormatError("'" + path + "' is empty, not a GGUF file");
  }
  // Map the file read-only: only the pages of the header are touched.
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) return MakeIOError("cannot map", path);
  Result<File> f = Parse(static_cast<const uint8_t*>(map), size);
  ::munmap(map, size);
  if (!f.ok()) return f.status().WithContext("'" + path + "'");
  return f;
}

}  // namespace arrowquant::gguf
