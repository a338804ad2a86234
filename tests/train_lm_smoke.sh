#!/usr/bin/env bash
# End-to-end smoke test of examples/train_lm (a few seconds): a tiny model on a small generated
# text. Checks --help lists every required flag, bad flags and values fail with a message, the CSV
# log has its header and one row per step with validation where evaluated, the loss decreases,
# --stop-at/--save then --resume reproduces the uninterrupted run's losses exactly (on another
# thread count), --sample generates text, the expert-usage CSV, every FFN kind (and the variants
# --softmax-renorm, --samoe-space output) trains and resumes exactly, the kinds added for
# docs/experiments.md learn, and
# --minutes stops on the clock.
#
#   tests/train_lm_smoke.sh path/to/train_lm WORK_DIR
set -euo pipefail

bin="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
here="$(cd "$(dirname "$0")" && pwd)"
work="$2"
rm -rf "$work"
mkdir -p "$work"
cd "$work"
export OMP_WAIT_POLICY=PASSIVE  # the 2-thread run may share the cores with other tests

fail() {
  echo "train_lm_smoke: FAIL: $*" >&2
  exit 1
}
step() { echo "train_lm_smoke: $*"; }

awk -f "$here/train_lm_text.awk" >text.txt
[[ $(wc -c <text.txt) -gt 20000 ]] || fail "the generated text is too short"

tiny=(--data text.txt --d-model 16 --layers 2 --heads 2 --context 16 --batch 4 --experts 4 --expert-size 8 --k 2
      --lr 1e-2 --eval-every 10 --eval-tokens 256 --final-eval-tokens 1024 --print-every 100 --threads 1)

step "--help lists every flag"
"$bin" --help >help.txt || fail "--help exited with $?"
for f in data ffn d-model layers heads context batch steps lr seed threads log save resume sample minutes \
         experts expert-size k warmup weight-decay clip eval-every val-fraction accum stats timing \
         temperature top-k prompt stop-at device; do
  grep -q -- "--$f\b" help.txt || fail "--help does not list --$f"
done
for kind in dense topk sigma-moe switch s-base samoe pkm softmax-moe tied pr-moe shared-experts; do
  grep -q -- "$kind" help.txt || fail "--help does not name the FFN kind $kind"
done

step "bad flags and values fail"
expect_error() {  # expect_error TEXT ARGS...: non-zero exit and TEXT in the message
  local text="$1"
  shift
  if "$bin" "$@" >out.txt 2>err.txt; then fail "'$*' succeeded"; fi
  grep -q -- "$text" err.txt || fail "'$*': the error does not mention '$text': $(cat err.txt)"
}
expect_error "unknown flag '--bogus'" "${tiny[@]}" --bogus
expect_error "--batch" "${tiny[@]}" --batch abc
expect_error "--batch" "${tiny[@]}" --batch 0
expect_error "--ffn must be one of" "${tiny[@]}" --ffn nope
expect_error "--lr" "${tiny[@]}" --lr -1
expect_error "--steps needs a value" "${tiny[@]}" --steps
expect_error "--data FILE is required" --steps 3
expect_error "cannot open" --data no-such-file.txt
expect_error "--heads" "${tiny[@]}" --heads 3
expect_error "--k" "${tiny[@]}" --k 5
expect_error "runs on the CPU only" "${tiny[@]}" --ffn tied --device cuda
expect_error "runs on the CPU only" "${tiny[@]}" --ffn samoe --samoe-space output --device cuda
expect_error "--samoe-space must be one of" "${tiny[@]}" --samoe-space nope

step "train 40 steps"
"$bin" "${tiny[@]}" --steps 40 --log a.csv --stats s.csv --timing --threads 2 >a.out || fail "training exited with $?"
header=$(head -n 1 a.csv)
for col in step train_loss val_loss; do
  [[ ",$header," == *",$col,"* ]] || fail "a.csv header '$header' has no column $col"
done
col() { awk -F, -v name="$1" 'NR == 1 { for (i = 1; i <= NF; ++i) if ($i == name) c = i; next } { print $c }' "$2"; }
[[ $(($(wc -l <a.csv) - 1)) -eq 40 ]] || fail "a.csv should have 40 rows, has $(($(wc -l <a.csv) - 1))"
[[ "$(col step a.csv | tr '\n' ' ')" == "$(seq 1 40 | tr '\n' ' ')" ]] || fail "a.csv steps are not 1..40"
[[ "$(col val_loss a.csv | awk 'NF { n++ } END { print n }')" -eq 4 ]] || fail "a.csv should have val_loss at steps 10, 20, 30, 40"
[[ -n "$(col val_loss a.csv | sed -n 40p)" ]] || fail "no validation at the last step"
col train_loss a.csv | awk '{ v[NR] = $1 } END {
  for (i = 1; i <= 5; ++i) { a += v[i]; b += v[NR - 5 + i] }
  if (!(b / 5 < a / 5 - 0.5)) { printf "loss did not decrease: first 5 %.3f, last 5 %.3f\n", a / 5, b / 5; exit 1 }
}' || fail "the loss does not decrease"
grep -q "^final: .*val_bpb=" a.out || fail "no final line with val_bpb"
grep -q "attention_backward" a.out || fail "--timing printed no timing table"
grep -q "experts_forward" a.out || fail "--timing printed no MoE stages"
grep -q "layer 1: " a.out || fail "no expert-usage summary per layer"
[[ "$(head -n 1 s.csv)" == step,layer,assignments,*,expert_0,expert_1,expert_2,expert_3 ]] || fail "s.csv header: $(head -n 1 s.csv)"
[[ $(($(wc -l <s.csv) - 1)) -eq 8 ]] || fail "s.csv should have 2 layers x 4 rows"
[[ -f s.gp ]] || fail "no gnuplot script s.gp"
if command -v gnuplot >/dev/null 2>&1; then [[ -s s.png ]] || fail "gnuplot is installed but s.png is missing"; fi

step "deterministic: the same flags give the same losses"
"$bin" "${tiny[@]}" --steps 40 --log a2.csv >/dev/null || fail "second training exited with $?"
cmp <(cut -d, -f1-8 a.csv) <(cut -d, -f1-8 a2.csv) || fail "two runs with the same seed differ"
"$bin" "${tiny[@]}" --steps 40 --seed 2 --log a3.csv >/dev/null || fail "seed 2 exited with $?"
if cmp -s <(col train_loss a.csv) <(col train_loss a3.csv); then fail "--seed 2 gives the same losses as seed 1"; fi

step "--stop-at and --save, then --resume, reproduces the uninterrupted run"
"$bin" "${tiny[@]}" --steps 40 --stop-at 20 --save ck.safetensors --log b.csv >b1.out || fail "--stop-at exited with $?"
[[ -f ck.safetensors ]] || fail "no checkpoint"
[[ $(($(wc -l <b.csv) - 1)) -eq 20 ]] || fail "b.csv should have 20 rows after --stop-at 20"
# The model and training flags come from the checkpoint; results do not depend on the thread count
# (a.csv was trained on 2 threads, b.csv on 1).
"$bin" --data text.txt --resume ck.safetensors --log b.csv --threads 1 >b2.out || fail "--resume exited with $?"
grep -q "resumed 'ck.safetensors' at step 20" b2.out || fail "the resumed run did not start at step 20"
cmp <(cut -d, -f1-10 a.csv) <(cut -d, -f1-10 b.csv) || fail "the resumed run's losses differ from the uninterrupted run's"
expect_error "differs from the checkpoint" --data text.txt --resume ck.safetensors --d-model 32
expect_error "not the file the checkpoint" --data help.txt --resume ck.safetensors

step "--sample"
"$bin" --resume ck.safetensors --sample 60 --prompt "The " >sample.txt 2>sample.err || fail "--sample exited with $?"
[[ $(wc -c <sample.txt) -ge 64 ]] || fail "the sample is shorter than the prompt + 60 bytes"
[[ "$(head -c 4 sample.txt)" == "The " ]] || fail "the sample does not start with the prompt"
"$bin" --resume ck.safetensors --sample 60 --prompt "The " >sample2.txt 2>/dev/null
cmp -s sample.txt sample2.txt || fail "sampling with the same seed is not reproducible"
"$bin" --resume ck.safetensors --sample 20 --temperature 0 --top-k 5 >/dev/null 2>&1 || fail "greedy sampling failed"
expect_error "--sample: no checkpoint" --resume missing.safetensors --sample 10

step "every FFN kind trains, with gradient accumulation, and resumes exactly"
# A variant is KIND or KIND:FLAG (a switch that selects a variant of the kind, persisted in the checkpoint).
for variant in dense topk sigma-moe switch s-base samoe pkm softmax-moe softmax-moe:--softmax-renorm \
               samoe:--samoe-space=output tied pr-moe shared-experts; do
  kind="${variant//[:=]/_}"
  kind_args=("${tiny[@]}" --ffn "${variant%%:*}" --pkm-keys 6 --members 2 --expert-dropout 0.1 --steps 6 --accum 2
             --eval-every 3)
  [[ "$variant" == *:* ]] && { flag="${variant#*:}"; kind_args+=(${flag/=/ }); }
  "$bin" "${kind_args[@]}" --log "k_$kind.csv" >"k_$kind.out" || fail "--ffn $kind exited with $?"
  [[ $(($(wc -l <"k_$kind.csv") - 1)) -eq 6 ]] || fail "--ffn $kind: expected 6 log rows"
  "$bin" "${kind_args[@]}" --stop-at 3 --save "k_$kind.ckpt" --log "r_$kind.csv" >/dev/null || fail "--ffn $kind --stop-at failed"
  "$bin" --data text.txt --resume "k_$kind.ckpt" --log "r_$kind.csv" >/dev/null || fail "--ffn $kind --resume failed"
  cmp -s <(cut -d, -f1-10 "k_$kind.csv") <(cut -d, -f1-10 "r_$kind.csv") || fail "--ffn $kind: the resumed run differs"
done
grep -q "softmax over the K" k_softmax-moe_--softmax-renorm.out || fail "--softmax-renorm is not in the header"
grep -q "output space" k_samoe_--samoe-space_output.out || fail "--samoe-space output is not in the header"

step "the kinds added for docs/experiments.md learn: finite losses that decrease over 40 steps"
for variant in softmax-moe softmax-moe:--softmax-renorm samoe:--samoe-space=output tied pr-moe shared-experts; do
  kind="${variant//[:=]/_}"
  args=("${tiny[@]}" --ffn "${variant%%:*}" --expert-dropout 0.1 --steps 40 --log "l_$kind.csv")
  [[ "$variant" == *:* ]] && { flag="${variant#*:}"; args+=(${flag/=/ }); }
  "$bin" "${args[@]}" >"l_$kind.out" || fail "--ffn $variant exited with $?"
  col train_loss "l_$kind.csv" | awk '{ v[NR] = $1 } END {
    for (i = 1; i <= NR; ++i) if (!(v[i] + 0 == v[i] + 0 && v[i] < 1e30)) { print "non-finite loss " v[i]; exit 1 }
    for (i = 1; i <= 5; ++i) { a += v[i]; b += v[NR - 5 + i] }
    if (!(b / 5 < a / 5 - 0.3)) { printf "loss did not decrease: first 5 %.3f, last 5 %.3f\n", a / 5, b / 5; exit 1 }
  }' || fail "--ffn $variant does not learn"
done
grep -q "parameters of the sigma-moe configuration" k_dense.out || fail "dense does not print the sigma-moe parameter count"

step "--minutes stops on the clock"
"$bin" "${tiny[@]}" --minutes 0.01 --eval-every 100000 >m.out || fail "--minutes exited with $?"
grep -q "^final: .*val_bpb=" m.out || fail "--minutes run has no final validation"

step "ok"
