# shellcheck shell=bash
# Shell helpers shared by the scripts that run examples/train_lm (run_training_comparison.sh,
# run_experiments.sh). Source it; it defines functions only.

# build_train_lm REPO BUILD_DIR JOBS: builds train_lm (and param_report) in BUILD_DIR with native
# code for the machine that runs it and sets TRAIN_LM to the binary, unless TRAIN_LM is already set.
# NDEBUG turns the NaN/Inf input scans off. GCC 12 reports false maybe-uninitialized warnings inside
# Eigen's AVX-512 kernels at -O3 (as in bench/).
build_train_lm() {
  local repo="$1" build="$2" jobs="$3"
  [[ -n "${TRAIN_LM:-}" ]] && return 0
  echo "== building train_lm in $build"
  cmake -S "$repo" -B "$build" -DCMAKE_BUILD_TYPE=Release \
        "-DCMAKE_CXX_FLAGS_RELEASE=-O3 -march=native -DNDEBUG -Wno-maybe-uninitialized" \
        -DSMOE_BUILD_TESTS=OFF -DSMOE_BUILD_BENCH=OFF >/dev/null
  cmake --build "$build" --target train_lm -j"$jobs" >/dev/null
  TRAIN_LM="$build/examples/train_lm"
}

# final_field NAME FILE: the value of NAME=... on the last "final:" line train_lm printed to FILE.
final_field() {
  sed -n 's/^final: .*\<'"$1"'=\([^ ]*\).*/\1/p' "$2" | tail -n 1
}

# csv_last NAME FILE: the value of column NAME in the last row of a train_lm --log CSV.
csv_last() {
  awk -F, -v name="$1" 'NR == 1 { for (i = 1; i <= NF; ++i) if ($i == name) c = i; next } { v = $c } END { print v }' "$2"
}
