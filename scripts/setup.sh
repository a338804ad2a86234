#!/usr/bin/env bash
# Fresh machine → dependencies installed, smoe built, the quick-start example run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE=-O2 >/dev/null
cmake --build build --target quickstart smoe_eval -j"$(nproc)"
./build/examples/quickstart
