#!/usr/bin/env bash
# Installs smoe to a temporary prefix and builds a consumer with find_package(smoe), then the same
# consumer with add_subdirectory.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cmake -S . -B "$work/smoe-build" -DSMOE_BUILD_TESTS=OFF -DSMOE_BUILD_BENCH=OFF -DSMOE_BUILD_EXAMPLES=OFF \
      -DCMAKE_INSTALL_PREFIX="$work/prefix" >/dev/null
cmake --install "$work/smoe-build" >/dev/null
cmake -S tests/consumer -B "$work/find-package" -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/find-package" -j"$(nproc)"
"$work/find-package/consumer"
cmake -S tests/consumer -B "$work/subdir" -DSMOE_CONSUMER_SUBDIR="$PWD" >/dev/null
cmake --build "$work/subdir" -j"$(nproc)"
"$work/subdir/consumer"
echo "consumer builds: find_package and add_subdirectory passed"
