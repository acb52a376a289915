// libFuzzer target for the SafeTensors header parser. Each input is used two
// ways: as a whole file held in memory (length prefix, JSON, data), and as a
// bare JSON header after the 8-byte prefix, checked against a data-section
// size taken from the input's last 8 bytes (so sizes are arbitrary, including
// ones far beyond the input). Any crash, sanitizer report, leak, timeout or
// oversized allocation is a bug; errors are expected.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "arrowquant/safetensors.h"

namespace {

// Invariants that every accepted header must satisfy.
void CheckAccepted(const arrowquant::SafeTensorsHeader& h, uint64_t data_size) {
  uint64_t expected = 0;
  for (const auto& t : h.tensors) {
    if (t.begin != expected || t.end < t.begin || t.end > data_size) __builtin_trap();
    if (t.nbytes() != static_cast<uint64_t>(t.numel) * arrowquant::DTypeSize(t.dtype)) {
      __builtin_trap();
    }
    expected = t.end;
  }
  if (expected != data_size) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string label = "fuzz.safetensors";
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);

  auto whole = arrowquant::ParseSafeTensorsBuffer(bytes, label);
  if (whole.ok()) {
    CheckAccepted(*whole, size - whole->data_start);
  } else if (whole.status().message().find(label) == std::string::npos) {
    __builtin_trap();  // every error must name the file
  }

  if (size >= 8) {
    uint64_t data_size = 0;
    if (size >= 16) std::memcpy(&data_size, data + size - 8, 8);
    // Half the time keep the size small so that offsets can match.
    if (data_size & 1) data_size = (data_size >> 1) % 4096;
    auto header = arrowquant::ParseSafeTensorsHeader(bytes.substr(8), data_size, label);
    if (header.ok()) {
      CheckAccepted(*header, data_size);
    } else if (header.status().message().find(label) == std::string::npos) {
      __builtin_trap();
    }
  }
  return 0;
}
