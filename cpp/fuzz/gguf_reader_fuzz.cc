// libFuzzer target for the GGUF header reader: any byte string must parse or
// fail with a Status, never crash, read out of bounds or allocate without bound.
// Build (coverage instrumentation on the engine too, so the fuzzer sees gguf.cc):
//   cmake -S . -B build/fuzz -G Ninja -DARROWQUANT_FUZZ=ON -DARROWQUANT_BUILD_PYTHON=OFF \
//     -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_CXX_FLAGS="-fsanitize=fuzzer-no-link,address,undefined"
//   cmake --build build/fuzz -j2 --target gguf_reader_fuzz
// Run:
//   ./gguf_reader_fuzz cpp/fuzz/corpus/gguf -max_total_time=60
#include <cstddef>
#include <cstdint>

#include "arrowquant/gguf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace arrowquant::gguf;
  arrowquant::Result<File> full = Parse(data, size);
  if (full.ok()) {
    // Invariants the writer and `inspect` rely on.
    const File& f = *full;
    if (f.data_offset > size || f.data_offset % f.alignment != 0) __builtin_trap();
    for (const TensorInfo& t : f.tensors) {
      if (t.offset + t.nbytes > size - f.data_offset) __builtin_trap();
      if (t.dims.empty() || t.dims.size() > static_cast<size_t>(kMaxDims)) __builtin_trap();
    }
  }
  // The header-only mode with a claimed larger file must hold up too.
  (void)Parse(data, size, /*header_only=*/true, static_cast<uint64_t>(size) * 2);
  return 0;
}
