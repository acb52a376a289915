// SafeTensors reader: a strict, bounded header parser and a pread-based file
// reader (no mmap, so the page cache never counts toward our resident memory
// and a file truncated under us gives an error instead of SIGBUS).
//
// File layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON,
// then the data section. Validation is complete before any data is read:
//   - N <= 100 MB and N <= file size - 8;
//   - the header is one JSON object (trailing whitespace allowed: writers pad
//     with spaces), nesting at most kMaxJsonDepth deep, strings valid UTF-8;
//   - "__metadata__" (optional) maps strings to strings;
//   - every other key is a tensor: "dtype" one of F64 F32 F16 BF16 F8_E4M3
//     F8_E5M2 I64 I32 I16 I8 U8 BOOL, "shape" at most kMaxRank non-negative
//     integers whose product (and its byte size) fits in int64,
//     "data_offsets" [begin, end] with end - begin == numel * itemsize;
//     other keys in a tensor object are ignored (skipped without allocation);
//   - names are unique, valid UTF-8 and free of NUL bytes;
//   - like the reference implementation (the Rust `safetensors` crate), the
//     tensors sorted by offset tile the data section exactly: the first
//     begins at 0, each begins where the previous ends, the last ends at the
//     end of the file. This rules out overlaps, gaps and trailing bytes.
// Every error is a Status naming the file: FormatError for bad contents,
// NotFound for a missing file, IOError when the system refuses a read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "arrowquant/dtype.h"
#include "arrowquant/status.h"

namespace arrowquant {

inline constexpr uint64_t kMaxSafeTensorsHeaderSize = 100'000'000;
inline constexpr int kMaxJsonDepth = 16;
inline constexpr size_t kMaxRank = 64;

struct SafeTensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  int64_t numel = 0;
  uint64_t begin = 0;  // offsets relative to the start of the data section
  uint64_t end = 0;
  uint64_t nbytes() const { return end - begin; }
};

struct SafeTensorsHeader {
  // Sorted by data offset (then name, for empty tensors sharing an offset).
  std::vector<SafeTensorInfo> tensors;
  // "__metadata__" entries in the order of the file.
  std::vector<std::pair<std::string, std::string>> metadata;
  uint64_t header_size = 0;  // N (set by the whole-file parsers; 0 otherwise)
  uint64_t data_start = 0;   // 8 + N (likewise)
};

// The SafeTensors spelling ("F16", "BF16", ...) of a dtype code; FormatError
// naming the supported codes for anything else.
Result<DType> ParseSafeTensorsDType(std::string_view code);
std::string_view SafeTensorsDTypeCode(DType dtype);

// Parses and validates the JSON header against a data section of `data_size`
// bytes. `file_label` names the file in error messages.
Result<SafeTensorsHeader> ParseSafeTensorsHeader(std::string_view header_json, uint64_t data_size,
                                                 const std::string& file_label);

// Checks the 8-byte length prefix against the file size; returns N.
Result<uint64_t> CheckSafeTensorsHeaderLength(const uint8_t prefix[8], uint64_t file_size,
                                              const std::string& file_label);

// Parses a whole SafeTensors file held in memory (tests and fuzzing).
Result<SafeTensorsHeader> ParseSafeTensorsBuffer(std::string_view file_bytes,
                                                 const std::string& file_label);

struct SafeTensorsOpenOptions {
  // After each ReadRange, tell the kernel the range will not be needed again
  // (posix_fadvise DONTNEED). pread copies into our buffers, so page cache
  // pages never count in our RSS anyway; this only keeps a one-pass read of a
  // huge model from evicting everything else from the cache. Off by default
  // because it makes a second run over the same model read from disk again.
  bool drop_cache_after_read = false;
};

// An open SafeTensors file. The header is read and validated by Open; the file
// descriptor stays open until Close() or destruction. ReadRange may be called
// from several threads at once (pread has no shared file position).
class SafeTensorsFile {
 public:
  static Result<std::unique_ptr<SafeTensorsFile>> Open(const std::string& path,
                                                       SafeTensorsOpenOptions options = {});
  ~SafeTensorsFile();
  SafeTensorsFile(const SafeTensorsFile&) = delete;
  SafeTensorsFile& operator=(const SafeTensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const SafeTensorsHeader& header() const { return header_; }
  const std::vector<SafeTensorInfo>& tensors() const { return header_.tensors; }
  uint64_t file_size() const { return file_size_; }
  uint64_t data_start() const { return header_.data_start; }

  // Index of the tensor called `name`, or NotFound.
  Result<size_t> FindTensor(std::string_view name) const;

  // Copies bytes [byte_offset, byte_offset + byte_count) of tensor
  // `tensor_index` into `out`. Short reads are continued, EINTR retried; a
  // file that ends early (truncated after Open) is a FormatError.
  Status ReadRange(size_t tensor_index, uint64_t byte_offset, uint64_t byte_count, void* out) const;

  // Closes the descriptor; later reads fail with Invalid. Idempotent.
  Status Close();
  bool is_open() const;

 private:
  SafeTensorsFile() = default;

  std::string path_;
  int fd_ = -1;
  uint64_t file_size_ = 0;
  SafeTensorsOpenOptions options_;
  SafeTensorsHeader header_;
  // Readers hold it shared, Close exclusive: a read never races a close.
  mutable std::shared_mutex mutex_;
};

}  // namespace arrowquant
