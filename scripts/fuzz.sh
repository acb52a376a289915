#!/usr/bin/env bash
# Bounded libFuzzer run of the SafeTensors header parser (ASan + UBSan).
#   scripts/fuzz.sh [SECONDS]   (default 60)
# Needs clang with the libFuzzer runtime: apt-get install -y clang libclang-rt-14-dev
# The whole core is built with coverage instrumentation (fuzzer-no-link) so
# that libFuzzer sees the parser, not only the harness. Builds into
# build/fuzz; new inputs go to build/fuzz/corpus (the checked-in seeds in
# cpp/fuzz/corpus/safetensors are read, never modified); crashes are written
# to build/fuzz/artifacts and make the script fail.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN="${1:-60}"
CC_BIN="${CC:-clang}"
CXX_BIN="${CXX:-clang++}"
command -v "$CXX_BIN" >/dev/null || { echo "fuzz.sh: $CXX_BIN not found (apt-get install -y clang libclang-rt-14-dev)" >&2; exit 2; }

cmake -S . -B build/fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_COMPILER="$CC_BIN" -DCMAKE_CXX_COMPILER="$CXX_BIN" \
  -DCMAKE_CXX_FLAGS="-fsanitize=fuzzer-no-link" \
  -DARROWQUANT_FUZZ=ON -DARROWQUANT_SANITIZE=ON \
  -DARROWQUANT_BUILD_PYTHON=OFF -DARROWQUANT_BUILD_TESTS=OFF > /dev/null
cmake --build build/fuzz -j "${JOBS:-2}" --target safetensors_header_fuzz

mkdir -p build/fuzz/corpus build/fuzz/artifacts
# -rss_limit_mb / -malloc_limit_mb: an allocation beyond the bound is a bug too.
./build/fuzz/safetensors_header_fuzz \
  -max_total_time="$SECONDS_TO_RUN" -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=256 \
  -max_len=65536 -print_final_stats=1 \
  -artifact_prefix=build/fuzz/artifacts/ \
  build/fuzz/corpus cpp/fuzz/corpus/safetensors
