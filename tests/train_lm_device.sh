#!/usr/bin/env bash
# train_lm --device cuda against --device cpu (a few seconds): every FFN kind trains on the device
# with the CPU run's losses (train and validation within 1e-4 relative, with expert dropout,
# gradient accumulation and clipping), two device runs are identical, --stop-at/--save then
# --resume on the device reproduces the uninterrupted device run exactly, a device checkpoint
# resumes on the CPU, and the expert-usage statistics come from the device.
#
#   tests/train_lm_device.sh path/to/train_lm WORK_DIR      (train_lm built with the CUDA backend)
set -euo pipefail

bin="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
here="$(cd "$(dirname "$0")" && pwd)"
work="$2"
rm -rf "$work"
mkdir -p "$work"
cd "$work"
export OMP_WAIT_POLICY=PASSIVE

fail() {
  echo "train_lm_device: FAIL: $*" >&2
  exit 1
}
step() { echo "train_lm_device: $*"; }

awk -f "$here/train_lm_text.awk" >text.txt

tiny=(--data text.txt --d-model 16 --layers 2 --heads 2 --context 16 --batch 4 --experts 4 --expert-size 8 --k 2
      --lr 1e-2 --eval-every 3 --eval-tokens 256 --final-eval-tokens 1024 --print-every 100 --threads 1
      --steps 6 --accum 2 --clip 0.5 --expert-dropout 0.1 --pkm-keys 6 --active 8)

col() { awk -F, -v name="$1" 'NR == 1 { for (i = 1; i <= NF; ++i) if ($i == name) c = i; next } { print $c }' "$2"; }
# same_losses A.csv B.csv WHAT: train and validation losses within 1e-4 relative, row by row.
same_losses() {
  for c in train_loss val_loss; do
    paste -d' ' <(col $c "$1") <(col $c "$2") | awk -v what="$3 $c" '
      { if (($1 == "") != ($2 == "")) { print what ": row " NR " has a value on one side only"; exit 1 }
        if ($1 == "") next
        d = $1 - $2; if (d < 0) d = -d; s = $1 < 0 ? -$1 : $1
        if (d > 1e-4 * s) { printf "%s: row %d: %s vs %s\n", what, NR, $1, $2; exit 1 } }' || fail "$3 differs"
  done
}

step "every FFN kind: the device run has the CPU run's losses"
for kind in dense topk sigma-moe switch s-base samoe pkm; do
  "$bin" "${tiny[@]}" --ffn "$kind" --log "cpu_$kind.csv" >/dev/null || fail "--ffn $kind on the CPU exited with $?"
  "$bin" "${tiny[@]}" --ffn "$kind" --device cuda --log "dev_$kind.csv" --stats "stats_$kind.csv" >"dev_$kind.out" ||
    fail "--ffn $kind --device cuda exited with $?"
  [[ $(($(wc -l <"dev_$kind.csv") - 1)) -eq 6 ]] || fail "--ffn $kind --device cuda: expected 6 log rows"
  same_losses "cpu_$kind.csv" "dev_$kind.csv" "--ffn $kind cpu vs cuda"
done
grep -q "layer 1: " dev_sigma-moe.out || fail "no expert-usage summary from the device"
[[ $(($(wc -l <stats_sigma-moe.csv) - 1)) -ge 2 ]] || fail "no expert-usage rows from the device"

step "two device runs are identical; --stop-at, --save and --resume on the device reproduce the run"
for kind in sigma-moe samoe pkm; do
  "$bin" "${tiny[@]}" --ffn "$kind" --device cuda --log "again_$kind.csv" >/dev/null || fail "second device run of $kind"
  cmp -s <(cut -d, -f1-10 "dev_$kind.csv") <(cut -d, -f1-10 "again_$kind.csv") || fail "--ffn $kind: two device runs differ"
  "$bin" "${tiny[@]}" --ffn "$kind" --device cuda --stop-at 3 --save "$kind.ckpt" --log "res_$kind.csv" >/dev/null ||
    fail "--ffn $kind --device cuda --stop-at failed"
  "$bin" --data text.txt --resume "$kind.ckpt" --device cuda --log "res_$kind.csv" >/dev/null || fail "--ffn $kind: device resume failed"
  cmp -s <(cut -d, -f1-10 "dev_$kind.csv") <(cut -d, -f1-10 "res_$kind.csv") || fail "--ffn $kind: the resumed device run differs"
done

step "a device checkpoint resumes on the CPU"
"$bin" "${tiny[@]}" --ffn sigma-moe --device cuda --stop-at 3 --save cross.ckpt --log cross.csv >/dev/null
"$bin" --data text.txt --resume cross.ckpt --log cross.csv >/dev/null || fail "CPU resume of a device checkpoint failed"
same_losses dev_sigma-moe.csv cross.csv "device checkpoint resumed on the CPU"

step "--timing is refused on the device"
if "$bin" "${tiny[@]}" --device cuda --timing >/dev/null 2>err.txt; then fail "--device cuda --timing succeeded"; fi
grep -q -- "--timing" err.txt || fail "the --timing error does not name the flag: $(cat err.txt)"

step "ok"
