#!/usr/bin/env bash
# The one prepared GPU run (docs/cuda.md, docs/performance.md). Three ways to call it:
#
#   bash scripts/gpu_check.sh --prepare    here, on a development machine: copies what the GPU
#                                          machine lacks into .gpu_deps/ (git-ignored): the Debian
#                                          packages of Eigen, Catch2 and Google Benchmark, and the
#                                          anchor script from ../shared/anchors/.
#   bash scripts/gpu_check.sh              on the GPU machine (with .gpu_deps carried): nvcc Release
#                                          build for sm_90, the CUDA tests, compute-sanitizer memcheck
#                                          and racecheck on a subset (where installed), the benchmark
#                                          and the PyTorch anchors in the same invocation; report in
#                                          $OUT (or gpu_check_out/). Under 8 minutes on an H100/H200.
#   bash scripts/gpu_check.sh --emulated   the same steps on the host-emulated device build (no GPU):
#                                          tests, benchmark on smoke shapes, report without anchors.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-gpu}
out=${OUT:-$PWD/gpu_check_out}
deps=$PWD/.gpu_deps
jobs=$(nproc)

if [ "$mode" = "--prepare" ]; then
  rm -rf "$deps" && mkdir -p "$deps/debs" "$deps/anchors"
  (cd "$deps/debs" && apt-get download libeigen3-dev catch2 libbenchmark-dev libbenchmark1debian >/dev/null)
  cp ../shared/anchors/*.py "$deps/anchors/"
  du -sh "$deps"
  exit 0
fi

mkdir -p "$out"
log() { echo "== $*" | tee -a "$out/report.md"; }
: >"$out/report.md"
start=$(date +%s)

if [ "$mode" = "--emulated" ]; then
  build=build-gpu-check-emulated
  cmake -S . -B $build -DCMAKE_BUILD_TYPE=Release -DSMOE_ENABLE_CUDA=OFF -DSMOE_CUDA_EMULATION=ON \
        -DSMOE_BUILD_EXAMPLES=OFF -DSMOE_HEADER_CHECK=OFF >/dev/null
  cmake --build $build --target test_cuda_emulated bench_cuda_moe_emulated -j"$jobs"
  test_bin=$build/tests/cuda/test_cuda_emulated
  bench_bin=$build/bench/bench_cuda_moe_emulated
else
  # The GPU machine is bare and disposable: unpack the carried packages into /.
  for f in "$deps"/debs/*.deb; do dpkg -x "$f" /; done
  nvidia-smi | tee "$out/nvidia-smi.txt" | head -15
  build=build-gpu-check
  gen=""
  command -v ninja >/dev/null && gen="-G Ninja"
  cmake -S . -B $build $gen -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 -DSMOE_ENABLE_CUDA=ON \
        -DSMOE_CUDA_EMULATION=OFF -DSMOE_BUILD_EXAMPLES=OFF -DSMOE_HEADER_CHECK=OFF >/dev/null
  cmake --build $build --target test_cuda_nvcc bench_cuda_moe -j"$jobs" 2>&1 | tail -3
  test_bin=$build/tests/cuda/nvcc/test_cuda_nvcc
  bench_bin=$build/bench/cuda/bench_cuda_moe
fi
log "build done after $(($(date +%s) - start)) s"

log "tests"
"$test_bin" 2>&1 | tail -25 | tee -a "$out/report.md"

if [ "$mode" != "--emulated" ] && command -v compute-sanitizer >/dev/null; then
  log "compute-sanitizer memcheck, racecheck"
  compute-sanitizer --tool memcheck --error-exitcode 1 "$test_bin" "[dispatch],[gpu]" 2>&1 | tail -5 | tee -a "$out/report.md"
  compute-sanitizer --tool racecheck --error-exitcode 1 "$test_bin" "[gpu]" 2>&1 | tail -5 | tee -a "$out/report.md"
else
  log "compute-sanitizer: not run (not installed here, or the emulated build)"
fi

log "benchmark (after $(($(date +%s) - start)) s)"
"$bench_bin" --benchmark_out="$out/bench.json" --benchmark_out_format=json 2>&1 | tail -20 | tee -a "$out/report.md"

anchors="$out/anchors.json"
if [ "$mode" != "--emulated" ] && [ -f "$deps/anchors/torch_moe_baselines.py" ]; then
  log "PyTorch anchors (same machine, same invocation)"
  python3 "$deps/anchors/torch_moe_baselines.py" --json "$anchors" 2>&1 | tail -15 | tee -a "$out/report.md"
fi
python3 bench/report_cuda.py "$out/bench.json" "$anchors" | tee -a "$out/report.md"
log "gpu_check done in $(($(date +%s) - start)) s"
