#!/usr/bin/env bash
# The whole test suite: dependencies, build (warnings are errors: SMOE_WERROR=ON), ctest; then the
# tests again on the same build with the CPU kernels forced onto their generic (non-AVX-512) path
# (SMOE_CPU_GENERIC=1), the path of users' CPUs without AVX-512.
# Tests build at -O3, CMake's Release level (the level where GCC 12 warns most), with assertions and
# the NaN/Inf validation mode on (NDEBUG unset).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE=-O3 -DSMOE_WERROR=ON >/dev/null
cmake --build build -j"$(nproc)"
ctest --test-dir build --output-on-failure -j"$(nproc)"
# The generic run repeats the tests of the CPU library and its tools; it skips what runs no CPU
# kernel of its own (the snippet and compile-error checks) and the runs of other backends and
# frameworks (the emulated device, MPI ranks, libtorch), whose CPU twins the first run covered.
SMOE_CPU_GENERIC=1 ctest --test-dir build --output-on-failure -j"$(nproc)" \
  -E "snippet|concept_error|cuda|mpi|expert_parallel|test_torch|libtorch|dlpack|train_lm_device"
