#!/usr/bin/env bash
# The test suite under AddressSanitizer and UndefinedBehaviorSanitizer (any report fails the run),
# built with clang-14 (the project's second compiler, warnings are errors), then the libFuzzer
# harnesses of tests/fuzz from the same build: their regression corpora run in ctest, and each
# harness fuzzes for FUZZ_SECONDS (default 60) with scripts/fuzz.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
# -O0: instrumented -O1 compiles 2.2x slower here, and the build, not the tests, is what takes the
# time (the instrumented tests run in about 1.5 minutes at -O0).
flags="-O0 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all"
# SMOE_ENABLE_TORCH=OFF: libtorch 1.13's headers do not compile with clang in C++20 (CMakeLists.txt
# says why), and libtorch is not built with the sanitizers anyway; test_dlpack still runs here.
# MPI off (-DSMOE_WITH_MPI=OFF): LeakSanitizer reports Open MPI's own allocations that live until
# exit (MPI_Init's), which smoe cannot free, and the ranks started by mpirun would each need the
# ASan runtime; the expert-parallel layer's host code is plain C++ run by the normal build's tests.
CXX=clang++-14 cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="$flags" \
      -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" -DSMOE_BUILD_BENCH=OFF -DSMOE_HEADER_CHECK=OFF \
      -DSMOE_WERROR=ON -DSMOE_BUILD_FUZZ=ON -DSMOE_ENABLE_CUDA=OFF -DSMOE_ENABLE_TORCH=OFF -DSMOE_WITH_MPI=OFF >/dev/null
cmake --build build-asan -j"$(nproc)"
# The oracle test runs smoe_eval through Python: the sanitizer runtime is linked into smoe_eval only.
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir build-asan --output-on-failure -j"$(nproc)"
bash scripts/fuzz.sh --build build-asan --seconds "${FUZZ_SECONDS:-60}"
