#!/usr/bin/env bash
# Bounded libFuzzer runs of the file parsers (SafeTensors header, GGUF reader)
# under AddressSanitizer + UndefinedBehaviorSanitizer.
#   scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 60)
# Needs clang with the libFuzzer runtime (Debian bookworm:
# apt-get install -y clang libclang-rt-14-dev). The engine is built with
# coverage instrumentation into build/fuzz (CMake option ARROWQUANT_FUZZ).
# New inputs go to build/fuzz/corpus/<target> (the checked-in seeds in
# cpp/fuzz/corpus are read, never modified); a crash is written to
# build/fuzz/artifacts and makes the script fail.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN="${1:-60}"
CXX_BIN="${CXX:-clang++}"
command -v "$CXX_BIN" >/dev/null || {
  echo "fuzz.sh: $CXX_BIN not found (apt-get install -y clang libclang-rt-14-dev)" >&2
  exit 2
}
CMAKE="${CMAKE:-cmake}"
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
"$CMAKE" -S . -B build/fuzz "${GEN[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER="$CXX_BIN" -DARROWQUANT_FUZZ=ON -DARROWQUANT_BUILD_PYTHON=OFF \
  -DARROWQUANT_BUILD_TESTS=OFF > /dev/null
"$CMAKE" --build build/fuzz -j 2 --target safetensors_header_fuzz gguf_reader_fuzz

mkdir -p build/fuzz/artifacts
for target in safetensors_header:safetensors gguf_reader:gguf; do
  name="${target%%:*}_fuzz"
  seeds="cpp/fuzz/corpus/${target##*:}"
  mkdir -p "build/fuzz/corpus/$name"
  echo "fuzz.sh: $name for ${SECONDS_TO_RUN}s"
  # -rss_limit_mb / -malloc_limit_mb: an allocation beyond the bound is a bug too.
  "build/fuzz/$name" \
    -max_total_time="$SECONDS_TO_RUN" -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=256 \
    -max_len=65536 -print_final_stats=1 -artifact_prefix=build/fuzz/artifacts/ \
    "build/fuzz/corpus/$name" "$seeds" 2>&1 | grep -E "^#[0-9]+[[:space:]]+(DONE|INITED)|ERROR|SUMMARY" || true
  if compgen -G "build/fuzz/artifacts/crash-*" > /dev/null || compgen -G "build/fuzz/artifacts/oom-*" > /dev/null; then
    echo "fuzz.sh: $name found a failing input in build/fuzz/artifacts" >&2
    exit 1
  fi
done
