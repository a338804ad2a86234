#!/usr/bin/env bash
# Trains the sigma-MoE byte-level language model and the dense baseline with the same total
# parameters (examples/train_lm: d = 128, 4 layers, 4 heads, context 128, batch 16) for the same
# training wall time each, one after the other, and prints a markdown table of the final
# validation bits per byte (the whole held-out split), steps, tokens/s and parameters.
#
#   scripts/run_training_comparison.sh [--minutes X] [--threads N] [--data FILE] [--results DIR]
#                                      [-- EXTRA train_lm FLAGS]
#
# Defaults: 10 minutes each, 2 threads, data/brown/brown.txt (fetched by scripts/fetch_brown.sh when
# missing), results in build-compare/results (git-ignored): per model its CSV log (NAME.csv), the
# expert usage of the sigma-MoE model (sigma-moe.stats.csv, and a PNG when gnuplot is installed),
# the console output (NAME.out) and the final checkpoint (NAME.safetensors); the table also goes
# to table.md. train_lm is built in build-compare (-O3 -march=native -DNDEBUG) unless TRAIN_LM names
# a binary.
# Run it on an otherwise idle machine: the comparison is at equal wall time, so anything else
# running changes the steps each model gets.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/train_lm_lib.sh
source "$repo/scripts/train_lm_lib.sh"
minutes=10
threads=2
data="$repo/data/brown/brown.txt"
build="${BUILD_DIR:-$repo/build-compare}"
results=""
extra=()

die() {
  echo "run_training_comparison.sh: error: $*" >&2
  exit 1
}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --minutes) minutes="${2:?--minutes needs a value}"; shift 2 ;;
    --threads) threads="${2:?--threads needs a value}"; shift 2 ;;
    --data) data="${2:?--data needs a value}"; shift 2 ;;
    --results) results="${2:?--results needs a value}"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
results="${results:-$build/results}"

build_train_lm "$repo" "$build" "$threads"
[[ -x "$TRAIN_LM" ]] || die "no train_lm binary at '$TRAIN_LM'"
if [[ ! -f "$data" ]]; then
  [[ "$data" == "$repo/data/brown/brown.txt" ]] || die "no data file '$data'"
  "$repo/scripts/fetch_brown.sh"
fi
mkdir -p "$results"

# One command family: only --ffn (and the logs) differ. The dense d_ff is chosen by train_lm so
# that the total parameters equal the sigma-MoE model's (E = 16, G = 64, K = 4).
common=(--data "$data" --d-model 128 --layers 4 --heads 4 --context 128 --batch 16 --minutes "$minutes"
        --threads "$threads" --seed 1)
for ffn in sigma-moe dense; do
  args=("${common[@]}" --ffn "$ffn" --log "$results/$ffn.csv" --save "$results/$ffn.safetensors")
  [[ "$ffn" == sigma-moe ]] && args+=(--stats "$results/$ffn.stats.csv")
  echo "== $TRAIN_LM ${args[*]} ${extra[*]}"
  "$TRAIN_LM" "${args[@]}" "${extra[@]}" | tee "$results/$ffn.out"
done

table="$results/table.md"
{
  echo "| FFN | parameters | active per token | training time | steps | tokens/s | final val bits/byte |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for ffn in sigma-moe dense; do
    out="$results/$ffn.out"
    printf '| %s | %s | %s | %s s | %s | %s | %s |\n' "$ffn" "$(final_field parameters "$out")" "$(final_field active_per_token "$out")" \
      "$(final_field train_s "$out")" "$(final_field steps "$out")" "$(final_field tokens_per_s "$out")" "$(final_field val_bpb "$out")"
  done
} >"$table"
echo
echo "== $table ($minutes minutes each, $threads threads, $(basename "$data"))"
cat "$table"
