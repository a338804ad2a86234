#!/usr/bin/env bash
# train_lm --expert-parallel under mpiexec against the single-process run (issue: the first 20
# steps' losses within 1e-4): sigma-moe with expert dropout on 2 ranks; switch with a capacity
# factor and a batch the ranks split unevenly on 3; softmax-moe with gradient accumulation on 4;
# a checkpoint written by 2 ranks resumed in one process and by 4 ranks, and one written by one
# process resumed by 2; the validation loss at the end; and the flags it refuses, on every rank.
#
#   tests/mpi/train_lm_expert_parallel.sh path/to/train_lm WORK_DIR MPIEXEC [MPIEXEC FLAGS...]
# (the ranks follow the flags as "-np N"; run by ctest with --oversubscribe --bind-to none)
set -euo pipefail

bin="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
here="$(cd "$(dirname "$0")/.." && pwd)"
work="$2"
shift 2
mpiexec=("$@")
rm -rf "$work"
mkdir -p "$work"
cd "$work"

fail() {
  echo "train_lm_expert_parallel: FAIL: $*" >&2
  exit 1
}
step() { echo "train_lm_expert_parallel: $*"; }
ranks() {  # ranks N ARGS...: train_lm ARGS on N ranks
  local n="$1"
  shift
  "${mpiexec[@]}" -np "$n" "$bin" "$@"
}

awk -f "$here/train_lm_text.awk" >text.txt
run=(--data text.txt --d-model 16 --layers 2 --heads 2 --context 16 --expert-size 8 --lr 1e-2 --steps 20
     --eval-every 10 --eval-tokens 256 --final-eval-tokens 1024 --print-every 100 --threads 1)

# same A.csv B.csv WHAT: 20 rows each, train_loss within 1e-4 at every step, the last val_loss too.
same() {
  awk -F, -v what="$3" '
    FNR == 1 { for (i = 1; i <= NF; ++i) { if ($i == "train_loss") tl = i; if ($i == "val_loss") vl = i }; next }
    NR == FNR { a[FNR] = $tl; av[FNR] = $vl; n = FNR; next }
    { m = FNR; d = $tl - a[FNR]; if (d < 0) d = -d; if (d > worst) worst = d
      if (!(d <= 1e-4)) { printf "%s: step %d train_loss %s vs %s\n", what, FNR - 1, a[FNR], $tl; bad = 1 }
      last_v = $vl; last_a = av[FNR] }
    END {
      if (n != 21 || m != 21) { printf "%s: %d and %d rows, expected 20 each\n", what, n - 1, m - 1; exit 1 }
      dv = last_v - last_a; if (dv < 0) dv = -dv
      if (last_v == "" || !(dv <= 1e-4)) { printf "%s: final val_loss %s vs %s\n", what, last_a, last_v; exit 1 }
      printf "train_lm_expert_parallel: %s: largest train_loss difference %.2g, final val_loss difference %.2g\n",
             what, worst, dv
      exit bad }' "$1" "$2" || fail "$3: the losses differ from the single-process run"
}

step "sigma-moe with expert dropout, 2 ranks"
sigma=("${run[@]}" --ffn sigma-moe --experts 8 --k 2 --batch 4 --expert-dropout 0.1)
"$bin" "${sigma[@]}" --log one.csv >one.out || fail "the single-process run exited with $?"
ranks 2 "${sigma[@]}" --expert-parallel --log two.csv >two.out || fail "the 2-rank run exited with $?"
same one.csv two.csv "sigma-moe, 2 ranks"
grep -q "expert parallel: 2 ranks" two.out || fail "the 2-rank run does not say it is expert-parallel"
[[ $(grep -c "^final:" two.out) -eq 1 ]] || fail "ranks other than 0 print (expected one final line)"

step "switch with capacity factor 1, batch 5 over 3 ranks"
switch=("${run[@]}" --ffn switch --experts 6 --batch 5 --capacity-factor 1)
"$bin" "${switch[@]}" --log one.csv >/dev/null || fail "the single-process switch run exited with $?"
ranks 3 "${switch[@]}" --expert-parallel --log three.csv >/dev/null || fail "the 3-rank run exited with $?"
same one.csv three.csv "switch, 3 ranks"

step "softmax-moe with --accum 2, 4 ranks"
softmax=("${run[@]}" --ffn softmax-moe --experts 8 --k 2 --batch 4 --accum 2)
"$bin" "${softmax[@]}" --log one.csv >/dev/null || fail "the single-process softmax-moe run exited with $?"
ranks 4 "${softmax[@]}" --expert-parallel --log four.csv >/dev/null || fail "the 4-rank run exited with $?"
same one.csv four.csv "softmax-moe, 4 ranks"

step "checkpoints: whole models, resumed with any number of ranks"
"$bin" "${sigma[@]}" --log one.csv >/dev/null
ranks 2 "${sigma[@]}" --expert-parallel --stop-at 10 --save two.ckpt --log resumed.csv >/dev/null ||
  fail "the interrupted 2-rank run exited with $?"
cp two.ckpt two-copy.ckpt
cp resumed.csv resumed4.csv
"$bin" --resume two.ckpt --data text.txt --log resumed.csv >/dev/null || fail "resuming in one process exited with $?"
same one.csv resumed.csv "2 ranks, then 1 process"
ranks 4 --resume two-copy.ckpt --data text.txt --log resumed4.csv --expert-parallel >/dev/null ||
  fail "resuming on 4 ranks exited with $?"
same one.csv resumed4.csv "2 ranks, then 4"
"$bin" "${sigma[@]}" --stop-at 10 --save one.ckpt --log resumed2.csv >/dev/null
cp one.ckpt one-copy.ckpt
ranks 2 --resume one-copy.ckpt --data text.txt --log resumed2.csv --expert-parallel >/dev/null ||
  fail "resuming a one-process checkpoint on 2 ranks exited with $?"
same one.csv resumed2.csv "1 process, then 2 ranks"
ranks 3 --resume one.ckpt --data text.txt --experts 8 --expert-parallel >/dev/null 2>&1 &&
  fail "3 ranks accepted 8 experts"
grep -q "must be a multiple of the 3 ranks" <(ranks 3 --resume one.ckpt --data text.txt --expert-parallel 2>&1) ||
  fail "8 experts on 3 ranks: no clear error"
"$bin" --resume one.ckpt --sample 20 >/dev/null 2>&1 || fail "--sample on the checkpoint exited with $?"

step "refused flags"
expect_error() {  # expect_error N TEXT ARGS...: every one of N ranks exits non-zero naming TEXT
  local n="$1" text="$2"
  shift 2
  if ranks "$n" "$@" >out.txt 2>err.txt; then fail "'$*' on $n ranks succeeded"; fi
  # Counted as occurrences, not lines: the ranks write stderr at once and lines can run together.
  [[ $(grep -o -- "$text" err.txt | wc -l) -eq $n ]] || fail "'$*' on $n ranks: not every rank says '$text': $(cat err.txt)"
}
expect_error 3 "must be a multiple of the 3 ranks" "${run[@]}" --experts 8 --expert-parallel
expect_error 3 "must be >= the 3 ranks" "${run[@]}" --experts 6 --batch 2 --expert-parallel
expect_error 2 "token-choice kinds" "${run[@]}" --ffn s-base --expert-parallel
expect_error 2 "--sample runs in one process" --resume one.ckpt --sample 5 --expert-parallel
step "ok"
