#!/usr/bin/env bash
# Builds bench_moe_vs_dense in a Release tree of its own (build-bench/, out of the way of the
# default build), runs it (5 repetitions, randomly interleaved so that slow drifts of a shared
# machine hit the dense and the MoE rows alike; aggregates only) and prints the markdown table.
#   bash bench/run_moe_vs_dense.sh [extra Google Benchmark flags]
# Environment: BUILD_DIR (default build-bench), OMP_NUM_THREADS (default: all cores), JOBS.
# The raw JSON is kept in $BUILD_DIR/moe_vs_dense.json.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${BUILD_DIR:-$root/build-bench}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"

cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DSMOE_BUILD_BENCH=ON -DSMOE_BUILD_TESTS=OFF \
  -DSMOE_BUILD_EXAMPLES=OFF -DSMOE_BENCH_NATIVE=ON >/dev/null
cmake --build "$build" --target bench_moe_vs_dense -j "${JOBS:-$(nproc)}" >/dev/null

echo "# $(date -u +%FT%TZ)  OMP_NUM_THREADS=$OMP_NUM_THREADS  $(c++ --version | head -n1)" >&2
"$build/bench/bench_moe_vs_dense" --benchmark_format=json --benchmark_repetitions=5 \
  --benchmark_enable_random_interleaving=true --benchmark_report_aggregates_only=true \
  --benchmark_min_time=0.3 "$@" | tee "$build/moe_vs_dense.json" | python3 "$root/bench/report.py"
