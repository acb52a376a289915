// GGUF (version 3) container: a streaming writer (tensors in any codec type
// of gguf_blocks.h: F32, F16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, K-quants, IQ4_NL, IQ4_XS)
// and a validating header reader.
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
// the SafeTensors / numpy shape. Block types group 32 (or 256: K-quants,
// IQ4_XS) consecutive elements of dims[0], so dims[0] must be a multiple of
// the block size.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "arrowquant/dtype.h"
#include "arrowquant/gguf_blocks.h"
#include "arrowquant/quantize.h"
#include "arrowquant/status.h"

namespace arrowquant::gguf {

inline constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian uint32
inline constexpr uint32_t kVersion = 3;
inline constexpr uint32_t kDefaultAlignment = 32;
inline constexpr uint32_t kQuantizationVersion = 2;
inline constexpr int kMaxDims = 4;  // GGML_MAX_DIMS
// ggml keeps names in char[64]: longer names are valid GGUF (and written) but
// ggml-based loaders such as llama.cpp refuse them; exporters warn.
inline constexpr size_t kMaxNameLength = 63;

// The ggml types, their block geometry and the block codecs (QuantizeBlocks,
// DequantizeBlocks) are gguf_blocks.h, included above.

// The types the writer makes (case-insensitive names): F32, F16 and every
// block type of gguf_blocks.h (Q8_0, Q4_0, Q4_1, Q2_K, Q3_K, Q4_K, Q5_K,
// Q6_K, IQ4_NL, IQ4_XS).
Result<GgmlType> ParseWritableType(const std::string& name);
bool IsWritableType(GgmlType type);

// Bytes of a tensor of `numel` elements of `type` (numel a multiple of the block size).
Result<uint64_t> TensorBytes(GgmlType type, int64_t numel);

// llama_ftype value for general.file_type when (almost) all weights are
// `type`: F32 0, F16 1, Q4_0 2, Q4_1 3, Q8_0 7, Q5_0 8, Q5_1 9, Q2_K 10, Q3_K 11 (Q3_K_S),
// Q4_K 14 (Q4_K_S), Q5_K 16 (Q5_K_S), Q6_K 18, IQ4_NL 25, IQ4_XS 30, BF16 32.
uint32_t FileTypeFor(GgmlType type);
// llama_ftype value of a llama.cpp file type name ("Q4_K_M" -> 15, "MOSTLY_Q4_K_M"
// or "q4_k_m" too; the names of gguf.constants.LlamaFileType).
Result<uint32_t> ParseFileType(const std::string& name);

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
  uint64_t offset = 0;  // relative to the data section
  uint64_t nbytes = 0;
  int64_t numel = 0;
  int64_t rows = 0;  // rows of the 2-D view (FORMAT.md section 1)
  int64_t cols = 0;
};

// Checks the tensors (names unique and non-empty; at most 4 dims; a block
// type needs shape[-1] to be a multiple of its block size: Invalid naming the
// tensor otherwise) and lays them out.
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

  // How the current tensor's blocks are chosen (gguf_blocks.h BlockMode)
  // and its optional per-column importance weights (`importance` holds the
  // row length of its 2-D view, or is empty: unweighted). Call before the
  // tensor's first AppendRows; the options hold for that tensor only (the
  // next one starts again at mode search, unweighted). The weights are copied.
  Status SetTensorOptions(BlockMode mode, std::vector<float> importance = {});

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
  std::vector<uint8_t> buffer_;          // converted rows of one chunk, reused
  std::vector<float> rows_f32_;          // float32 rows of a slice of the chunk, reused
  BlockMode mode_ = BlockMode::kSearch;  // of the current tensor
  std::vector<float> importance_;        // of the current tensor (or empty)
};

// ---- reader -----------------------------------------------------------------

struct TensorInfo {
  std::string name;
  std::vector<uint64_t> dims;  // ggml order
  uint32_t type = 0;
  uint64_t offset = 0;  // relative to the data section
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
