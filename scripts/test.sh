#!/usr/bin/env bash
# The whole test suite: dependencies, build (warnings are errors), ctest.
# Tests build at -O2 with assertions and the NaN/Inf validation mode on (NDEBUG unset).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE=-O2 >/dev/null
cmake --build build -j"$(nproc)"
ctest --test-dir build --output-on-failure -j"$(nproc)"
