#!/usr/bin/env bash
# Bounded libFuzzer run of the SafeTensors header parser under ASan + UBSan.
#   scripts/fuzz.sh [SECONDS]   (default 60)
# Needs clang with the libFuzzer runtime (Debian bookworm:
# apt-get install -y clang libclang-rt-14-dev).
#
# The target and the sources it exercises (safetensors.cc, dtype.cc,
# status.cc) are compiled directly with coverage instrumentation, into
# build/fuzz. (The CMake route, -DARROWQUANT_FUZZ=ON, builds the whole engine
# with clang; that needs every kernel file to compile with clang 14.)
# New inputs go to build/fuzz/corpus (the checked-in seeds in
# cpp/fuzz/corpus/safetensors are read, never modified); crashes are written
# to build/fuzz/artifacts and make the script fail.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN="${1:-60}"
CXX_BIN="${CXX:-clang++}"
command -v "$CXX_BIN" >/dev/null || {
  echo "fuzz.sh: $CXX_BIN not found (apt-get install -y clang libclang-rt-14-dev)" >&2
  exit 2
}

mkdir -p build/fuzz/corpus build/fuzz/artifacts
BIN=build/fuzz/safetensors_header_fuzz
SOURCES=(cpp/fuzz/safetensors_header_fuzz.cc cpp/src/safetensors.cc cpp/src/dtype.cc cpp/src/status.cc)
if [ ! -x "$BIN" ] || [ -n "$(find "${SOURCES[@]}" cpp/include -newer "$BIN" -print -quit)" ]; then
  echo "fuzz.sh: building $BIN"
  "$CXX_BIN" -std=c++20 -O1 -g -fno-omit-frame-pointer -ffp-contract=off -Wall -Wextra \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    -Icpp/include -Icpp/src "${SOURCES[@]}" -o "$BIN"
fi

# -rss_limit_mb / -malloc_limit_mb: an allocation beyond the bound is a bug too.
"./$BIN" \
  -max_total_time="$SECONDS_TO_RUN" -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=256 \
  -max_len=65536 -print_final_stats=1 \
  -artifact_prefix=build/fuzz/artifacts/ \
  build/fuzz/corpus cpp/fuzz/corpus/safetensors
