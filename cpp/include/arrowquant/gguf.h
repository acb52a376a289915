// GGUF (version 3) export: ggml block quantizers (Q8_0, Q4_0, Q4_1), F16/F32
// passthrough, a streaming writer and a validating header reader.
//
// File layout (little-endian):
//   "GGUF" | uint32 version | uint64 tensor_count | uint64 kv_count
//   kv_count x (string key | uint32 value_type | value)
//   tensor_count x (string name | uint32 n_dims | uint64 dims[n_dims] |
//                   uint32 ggml_type | uint64 offset)
//   zero padding to `general.alignment` | tensor data, each tensor at its
//   offset (relative to the start of the data section, a multiple of the
//   alignment), padded to the alignment.
// A string is uint64 length + bytes (no terminator). Dimensions are in ggml
// order: dims[0] is the innermost (fastest varying) axis, i.e. the reverse of
// the SafeTensors / numpy shape. Block types group 32 consecutive elements of
// dims[0], so dims[0] must be a multiple of 32 for them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "arrowquant/dtype.h"
#include "arrowquant/quantize.h"
#include "arrowquant/status.h"

namespace arrowquant::gguf {

inline constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian uint32
inline constexpr uint32_t kVersion = 3;
inline constexpr uint32_t kDefaultAlignment = 32;
inline constexpr uint32_t kQuantizationVersion = 2;
inline constexpr int kMaxDims = 4;        // GGML_MAX_DIMS
// ggml keeps names in char[64]: longer names are valid GGUF (and written) but
// ggml-based loaders such as llama.cpp refuse them; exporters warn.
inline constexpr size_t kMaxNameLength = 63;

// ggml tensor types (the values of enum ggml_type).
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kI8 = 24,
  kI16 = 25,
  kI32 = 26,
  kI64 = 27,
  kF64 = 28,
  kBF16 = 30,
};

// Elements per block and bytes per block of a type the reader knows;
// FormatError for others.
struct TypeTraits {
  int64_t block_size;
  int64_t block_bytes;
};
Result<TypeTraits> GetTypeTraits(uint32_t type);
const char* GgmlTypeName(uint32_t type);  // "Q4_0", ...; "unknown" otherwise
// "Q8_0", "Q4_0", "Q4_1", "F16", "F32" (case-insensitive): the types the writer makes.
Result<GgmlType> ParseWritableType(const std::string& name);
bool IsWritableType(GgmlType type);

// Bytes of a tensor of `numel` elements of `type` (numel a multiple of the block size).
Result<uint64_t> TensorBytes(GgmlType type, int64_t numel);

// llama_ftype value for general.file_type when (almost) all weights are `type`.
uint32_t FileTypeFor(GgmlType type);

// ---- block quantizers (ggml's reference rounding rules) -------------------
//
// Q8_0 (34 bytes): d = max|x| / 127, q = roundf(x / d) (half away from zero),
//   stored f16 d + 32 int8.      x_hat = q * d
// Q4_0 (18 bytes): m = the x of largest |x| (first one), d = m / -8,
//   q = min(15, trunc(x / d + 8.5)), f16 d + 16 bytes: byte j holds element j
//   in its low nibble and element j + 16 in its high nibble. x_hat = (q - 8) * d
// Q4_1 (20 bytes): d = (max - min) / 15, q = min(15, trunc((x - min) / d + 0.5)),
//   f16 d, f16 min, 16 bytes as Q4_0.                       x_hat = q * d + min
// In every case "/ d" is a multiplication by id = 1/d computed from the float32
// d (0 when d is 0) before d is rounded to f16; dequantization uses the stored
// f16 values. `n` must be a multiple of 32. NaN/Inf is an Invalid status.
Status QuantizeBlocks(GgmlType type, const float* x, int64_t n, uint8_t* out);
// Inverse of QuantizeBlocks (and F16/F32 decoding) into n floats.
Status DequantizeBlocks(GgmlType type, const uint8_t* data, int64_t n, float* out);

// ---- metadata values --------------------------------------------------------

enum class ValueType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};
const char* ValueTypeName(ValueType type);

// A typed metadata value. Integers are kept in u (unsigned types, bool) or i
// (signed types), floats in f, strings in s; arrays hold scalar or string
// items of one elem_type (arrays of arrays are refused, as ggml does).
struct Value {
  ValueType type = ValueType::kUint32;
  uint64_t u = 0;
  int64_t i = 0;
  double f = 0.0;
  std::string s;
  ValueType elem_type = ValueType::kUint8;
  std::vector<Value> items;

  static Value U32(uint32_t v);
  static Value I32(int32_t v);
  static Value U64(uint64_t v);
  static Value I64(int64_t v);
  static Value F32(float v);
  static Value F64(double v);
  static Value Bool(bool v);
  static Value String(std::string v);
  static Value Array(ValueType elem_type, std::vector<Value> items);
};

using KeyValue = std::pair<std::string, Value>;

// ---- writer -----------------------------------------------------------------

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;  // SafeTensors / numpy order (outermost first)
  GgmlType type = GgmlType::kF32;
};

struct TensorLayout {
  std::string name;
  std::vector<uint64_t> dims;  // ggml order (reversed shape; a 0-D tensor is [1])
  GgmlType type = GgmlType::kF32;
  uint64_t offset = 0;         // relative to the data section
  uint64_t nbytes = 0;
  int64_t numel = 0;
  int64_t rows = 0;            // rows of the 2-D view (FORMAT.md section 1)
  int64_t cols = 0;
};

// Checks the tensors (names unique and non-empty; at most 4 dims; block types need shape[-1] % 32 == 0) and lays them out.
Result<std::vector<TensorLayout>> LayoutTensors(const std::vector<TensorSpec>& tensors,
                                                uint32_t alignment);

// Writes a GGUF file in one pass with bounded memory. Create() writes the
// header and every tensor info (sizes follow from shapes and types) into
// `<path>.tmp-<pid>`; AppendRows() then streams each tensor's rows in order
// (rows of the 2-D view; a tensor may arrive in any number of chunks); Finish()
// checks that every tensor is complete, flushes, fsyncs and renames the file to
// `path`. A writer destroyed (or aborted, or failed) before Finish() removes its
// temporary file, so nothing that looks complete is left behind.
class Writer {
 public:
  // The writer adds general.alignment (and general.quantization_version when a
  // block type is used) unless `metadata` has them; other keys come from the caller.
  static Result<std::unique_ptr<Writer>> Create(const std::string& path,
                                                std::vector<KeyValue> metadata,
                                                const std::vector<TensorSpec>& tensors,
                                                uint32_t alignment = kDefaultAlignment);
  ~Writer();
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;

  // Appends `src.rows` rows of the current tensor (src.cols must equal its
  // row length in the 2-D view), converting / quantizing to its type.
  // Source dtypes: any quantizable float (float32, float16, bfloat16, float8).
  // When `stats` is given, the error of the stored values (decoded exactly as
  // a reader decodes them) against the source is added to it.
  Status AppendRows(const TensorView& src, const ExecOptions& exec = {},
                    ErrorStats* stats = nullptr);
  Status Finish();
  void Abort();

  const std::vector<TensorLayout>& layout() const { return layout_; }
  uint64_t data_offset() const { return data_offset_; }
  const std::string& temp_path() const { return temp_path_; }
  const std::string& path() const { return path_; }
  // Index of the tensor the next AppendRows goes to (== tensor count when done).
  size_t current_tensor() const { return current_; }
  int64_t rows_written() const { return rows_done_; }

 private:
  Writer() = default;
  Status WriteAll(const void* data, size_t n);
  Status Fail(Status st);

  std::string path_;
  std::string temp_path_;
  int fd_ = -1;
  bool finished_ = false;
  bool failed_ = false;
  uint32_t alignment_ = kDefaultAlignment;
  uint64_t data_offset_ = 0;
  uint64_t position_ = 0;  // bytes written so far
  std::vector<TensorLayout> layout_;
  size_t current_ = 0;
  int64_t rows_done_ = 0;
  std::vector<uint8_t> buffer_;  // converted rows of one chunk, reused
};

// ---- reader -----------------------------------------------------------------

struct TensorInfo {
  std::string name;
  std::vector<uint64_t> dims;  // ggml order
  uint32_t type = 0;
  uint64_t offset = 0;         // relative to the data section
  uint64_t nbytes = 0;
  uint64_t numel = 0;
};

struct File {
  uint32_t version = 0;
  uint32_t alignment = kDefaultAlignment;
  std::vector<KeyValue> metadata;
  std::vector<TensorInfo> tensors;
  uint64_t data_offset = 0;  // absolute offset of the data section
  uint64_t file_size = 0;

  const Value* Find(const std::string& key) const;
};

// Parses and validates the header of a GGUF file held in memory: magic,
// version 2 or 3, every length against the bytes left, value types, unique
// keys and tensor names, dims (1..4, no overflow), known tensor types, row
// lengths that fit the block size, offsets aligned and inside the data, no
// two tensors overlapping. With `header_only`, `data` may stop after the
// tensor infos: data bounds are then checked against `file_size` instead.
Result<File> Parse(const uint8_t* data, size_t size, bool header_only = false,
                   uint64_t file_size = 0);

// Reads and validates the header of the file at `path` (tensor data is not read).
Result<File> ReadFile(const std::string& path);

}  // namespace arrowquant::gguf
