#!/usr/bin/env bash
# The test suite under AddressSanitizer and UndefinedBehaviorSanitizer (any report fails the run).
set -euo pipefail
cd "$(dirname "$0")/.."
# -O0: instrumented -O1 compiles 2.2x slower here, and the build, not the tests, is what takes the
# time (the instrumented tests run in about 1.5 minutes at -O0).
# -Wno-maybe-uninitialized: GCC 12 false positive in <regex> (pulled in by Catch2) under sanitizers.
flags="-O0 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all -Wno-maybe-uninitialized"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="$flags" \
      -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" -DSMOE_BUILD_BENCH=OFF -DSMOE_HEADER_CHECK=OFF -DSMOE_ENABLE_CUDA=OFF >/dev/null
cmake --build build-asan -j"$(nproc)"
# The oracle test runs smoe_eval through Python: the sanitizer runtime is linked into smoe_eval only.
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir build-asan --output-on-failure -j"$(nproc)"
