#!/usr/bin/env bash
# Builds bench_routers in a Release tree of its own (build-bench/, out of the way of the default
# build), runs it (5 repetitions, randomly interleaved so that slow drifts of a shared machine hit
# every routing strategy alike; aggregates only) and prints the markdown table.
#   bash bench/run_routers.sh [extra Google Benchmark flags, e.g. --benchmark_filter=sigma]
# Environment: BUILD_DIR (default build-bench), OMP_NUM_THREADS (default: all cores), JOBS.
# The raw JSON is kept in $BUILD_DIR/routers.json (python3 bench/report_routers.py --stat min FILE
# gives the best repetitions instead of the medians).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${BUILD_DIR:-$root/build-bench}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"

cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DSMOE_BUILD_BENCH=ON -DSMOE_BUILD_TESTS=OFF \
  -DSMOE_BUILD_EXAMPLES=OFF -DSMOE_BENCH_NATIVE=ON >/dev/null
cmake --build "$build" --target bench_routers -j "${JOBS:-$(nproc)}" >/dev/null

echo "# $(date -u +%FT%TZ)  OMP_NUM_THREADS=$OMP_NUM_THREADS  $(c++ --version | head -n1)" >&2
"$build/bench/bench_routers" --benchmark_format=json --benchmark_repetitions=5 \
  --benchmark_enable_random_interleaving=true --benchmark_report_aggregates_only=true \
  --benchmark_min_time=0.5 "$@" | tee "$build/routers.json" | python3 "$root/bench/report_routers.py"
