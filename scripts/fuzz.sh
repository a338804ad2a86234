#!/usr/bin/env bash
# Builds the libFuzzer harnesses (tests/fuzz: clang-14, ASan + UBSan) and runs them.
#
#   scripts/fuzz.sh [--seconds N] [--build DIR] [--regression-only] [HARNESS...]
#
# HARNESS: safetensors, checkpoint, smoe_eval (default: all). Each first runs its regression corpus
# (tests/fuzz/regression/HARNESS, the reproducers of issue 12) and its seeds once, then fuzzes for N
# seconds (default 60) from DIR/fuzz/corpus/HARNESS (kept between runs) and the seeds, which
# fuzz_seeds writes from files the library writes. --regression-only skips the fuzzing.
# DIR (default build-fuzz) is configured here with clang++-14 at -O1 unless it is already a build
# with SMOE_BUILD_FUZZ=ON (scripts/test_sanitizers.sh passes its own). Findings (crash-*, leak-*,
# timeout-*, oom-*) go to DIR/fuzz/findings/HARNESS and make the script exit 1. Run long campaigns
# at low priority: NICE=19 scripts/fuzz.sh --seconds 3600.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
seconds=60
build="$repo/build-fuzz"
regression_only=0
harnesses=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --seconds) seconds="${2:?--seconds needs a value}"; shift 2 ;;
    --build) build="${2:?--build needs a value}"; shift 2 ;;
    --regression-only) regression_only=1; shift ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    *) harnesses+=("$1"); shift ;;
  esac
done
((${#harnesses[@]})) || harnesses=(safetensors checkpoint smoe_eval)
nice_level="${NICE:-0}"

if ! grep -qs '^SMOE_BUILD_FUZZ:BOOL=ON' "$build/CMakeCache.txt"; then
  flags="-O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
  CXX="${CXX:-clang++-14}" cmake -S "$repo" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=$flags" "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=address,undefined" \
    -DSMOE_BUILD_FUZZ=ON -DSMOE_BUILD_TESTS=OFF -DSMOE_BUILD_BENCH=OFF -DSMOE_WERROR=ON >/dev/null
fi
targets=(fuzz_seeds)
for h in "${harnesses[@]}"; do targets+=("fuzz_$h"); done
nice -n "$nice_level" cmake --build "$build" --target "${targets[@]}" -j"$(nproc)" >/dev/null
bin="$build/tests/fuzz"
"$bin/fuzz_seeds" "$build/fuzz/seeds" >/dev/null

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}" UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1}"
status=0
for h in "${harnesses[@]}"; do
  findings="$build/fuzz/findings/$h"
  corpus="$build/fuzz/corpus/$h"
  mkdir -p "$findings" "$corpus"
  log="$build/fuzz/$h.log"
  # Each regression and seed input once (-runs=0 only executes the given corpora).
  if ! nice -n "$nice_level" "$bin/fuzz_$h" -runs=0 -rss_limit_mb=2048 -artifact_prefix="$findings/" \
      "$repo/tests/fuzz/regression/$h" "$build/fuzz/seeds/$h" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "fuzz.sh: $h: the regression corpus or a seed fails (log: $log)" >&2
    status=1
    continue
  fi
  echo "fuzz.sh: $h: regression corpus and seeds pass ($(ls "$repo/tests/fuzz/regression/$h" | wc -l) reproducers)"
  ((regression_only)) && continue
  dict=()
  [[ -f "$repo/tests/fuzz/$h.dict" ]] && dict=(-dict="$repo/tests/fuzz/$h.dict")
  if ! nice -n "$nice_level" "$bin/fuzz_$h" -max_total_time="$seconds" -max_len=16384 -timeout=20 \
      -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$findings/" "${dict[@]}" \
      "$corpus" "$build/fuzz/seeds/$h" >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz.sh: $h: FINDING (inputs in $findings, log: $log)" >&2
    status=1
    continue
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1)
  echo "fuzz.sh: $h: ${runs:-?} executions in $seconds s, $cov, corpus $(ls "$corpus" | wc -l) inputs, no finding"
done
exit "$status"
