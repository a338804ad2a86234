#!/usr/bin/env bash
# Runs the small-scale experiments of docs/experiments.md (issue 16): named train_lm
# configurations, one per table row and seed, and rebuilds the table and the plots from their logs.
#
#   scripts/run_experiments.sh --list                    the rows: name, group, seeds, flags
#   scripts/run_experiments.sh [--seeds 1,2,3] NAME...   run these rows (or groups, or "all")
#   scripts/run_experiments.sh --report                  only rebuild the table and the plots
#
# Every run trains d = 128, 4 layers (unless the row says otherwise), 4 heads, context 128, batch 16
# for the same fixed --steps (the same tokens per group) with the same schedule (lr 3e-3, the best of
# the lr-sweep group in every family; warm-up, cosine to lr/10), threads 1, and ends with a
# validation on the whole held-out split of the Brown corpus.
# Runs go seed by seed: all the named rows with seed 1, then seed 2, ... (--seeds overrides the
# rows' own seeds: 1,2,3 for the headline groups and the closest ablations, 1 elsewhere).
#
# Resumable: a run whose CSV ends with the last step and its validation is finished and skipped; a
# run that was killed resumes from its checkpoint (train_lm --resume) and continues the same
# trajectory. Per run NAME.sSEED: docs/results/experiments/NAME.sSEED.csv (the train_lm --log) and
# NAME.sSEED.txt (train_lm's header and final lines: parameters, FLOPs); the checkpoint and the
# console output under $EXPERIMENTS_WORK (default build-experiments/, git-ignored).
#
# Environment: TRAIN_LM (a binary; default: built in build-experiments/build), STEPS (default
# 1500), THREADS (default 1), DATA (default data/brown/brown.txt, fetched when missing).
# Run it at low priority on a shared machine: nice -n 19 scripts/run_experiments.sh ...
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/train_lm_lib.sh
source "$repo/scripts/train_lm_lib.sh"
results="${EXPERIMENTS_RESULTS:-$repo/docs/results/experiments}"
work="${EXPERIMENTS_WORK:-$repo/build-experiments}"
doc="${EXPERIMENTS_DOC:-$repo/docs/experiments.md}"
steps="${STEPS:-1500}"
threads="${THREADS:-1}"
data="${DATA:-$repo/data/brown/brown.txt}"

die() {
  echo "run_experiments.sh: error: $*" >&2
  exit 1
}

# The rows: NAME|GROUP|SEEDS|DESCRIPTION|FLAGS. Sizes at d = 128: E·G = 1024 hidden units per MoE
# layer, K·G = 256 per token; dense d_ff = 1032 has the sigma-MoE layer's parameters.
rows=(
  "sigma-moe|sigma-headline|1,2,3|sigma-MoE: sigmoid top-4 of 16 experts (G 64), entropy reg 0.001, expert dropout 0.05|--ffn sigma-moe --expert-dropout 0.05"
  "dense|sigma-headline|1,2,3|dense ReLU MLP, d_ff 1032 (parameter-equal)|--ffn dense"
  "switch|sigma-headline|1,2,3|Switch: softmax top-1 of 4 experts (G 256), balance loss 0.01|--ffn switch"
  "s-base|sigma-headline|1,2,3|S-BASE: Sinkhorn top-4 of 16 experts (G 64)|--ffn s-base"
  "softmax-renorm|sigma-gates|1,2,3|softmax after top-4 (renormalized), entropy reg, expert dropout 0.05|--ffn softmax-moe --softmax-renorm --expert-dropout 0.05"
  "softmax-norenorm|sigma-gates|1,2,3|softmax before top-4 (no renormalization), entropy reg, expert dropout 0.05|--ffn softmax-moe --expert-dropout 0.05"
  "topk-mlp|sigma-gates|1|Top-K-activation MLP: dense d_ff 1032 keeping the 256 largest units|--ffn topk"
  "pkm|sigma-gates|1|product-key memory, 45² values, 4 heads, 32 per head|--ffn pkm"
  "sigma-no-entropy|sigma-ablations|1,2,3|sigma-MoE without the entropy regularization|--ffn sigma-moe --expert-dropout 0.05 --entropy-coef 0"
  "sigma-no-dropout|sigma-ablations|1|sigma-MoE without expert dropout|--ffn sigma-moe --expert-dropout 0"
  "sigma-k1|sigma-ablations|1|sigma-MoE K 1, G 256, E 4 (K·G 256)|--ffn sigma-moe --expert-dropout 0.05 --k 1 --expert-size 256 --experts 4"
  "sigma-k2|sigma-ablations|1|sigma-MoE K 2, G 128, E 8 (K·G 256)|--ffn sigma-moe --expert-dropout 0.05 --k 2 --expert-size 128 --experts 8"
  "sigma-k8|sigma-ablations|1|sigma-MoE K 8, G 32, E 32 (K·G 256)|--ffn sigma-moe --expert-dropout 0.05 --k 8 --expert-size 32 --experts 32"
  "samoe-per-layer|samoe-headline|1,2,3|per-layer experts: sigma-MoE routing, 16 experts (G 64) in each of the 4 layers|--ffn sigma-moe"
  "per-layer-e8|samoe-headline|1,2,3|per-layer experts with samoe-m2's parameters: 8 experts (G 64) in each layer, top-4|--ffn sigma-moe --experts 8"
  "samoe-m2|samoe-headline|1,2,3|SaMoE weight space, pool of M 2 shared by the 4 layers|--ffn samoe --members 2"
  "tied|samoe-headline|1,2,3|WideNet: one expert set tied across the 4 layers, per-layer routers|--ffn tied"
  "samoe-m1|samoe-pool|1,2,3|SaMoE weight space, M 1|--ffn samoe --members 1"
  "samoe-m4|samoe-pool|1,2,3|SaMoE weight space, M 4 (as many members as layers)|--ffn samoe --members 4"
  "samoe-m2-output|samoe-pool|1|SaMoE output space, M 2|--ffn samoe --members 2 --samoe-space output"
  "pr-moe|samoe-pool|1|PR-MoE residual: top-3 of 16 experts (G 64) + a residual MLP of 64 units|--ffn pr-moe"
  "shared-experts|samoe-pool|1|shared experts: top-3 of 16 experts (G 64) + 1 shared expert of 64 units|--ffn shared-experts"
  "samoe-l6-per-layer|samoe-pool|1|6 layers, per-layer experts|--ffn sigma-moe --layers 6"
  "samoe-l6-m2|samoe-pool|1|6 layers, SaMoE weight space M 2|--ffn samoe --members 2 --layers 6"
  "samoe-l6-m1|samoe-pool|1|6 layers, SaMoE weight space M 1|--ffn samoe --members 1 --layers 6"
  "scale-sigma-e8|sigma-scaling|1|timing: sigma-MoE E 8 (K·G 256 fixed), 300 steps|--ffn sigma-moe --experts 8 --steps 300"
  "scale-sigma-e16|sigma-scaling|1|timing: sigma-MoE E 16, 300 steps|--ffn sigma-moe --experts 16 --steps 300"
  "scale-sigma-e32|sigma-scaling|1|timing: sigma-MoE E 32, 300 steps|--ffn sigma-moe --experts 32 --steps 300"
  "scale-sigma-e64|sigma-scaling|1|timing: sigma-MoE E 64, 300 steps|--ffn sigma-moe --experts 64 --steps 300"
  "scale-dense-e8|sigma-scaling|1|timing: dense with the parameters of E 8 (d_ff 516), 300 steps|--ffn dense --experts 8 --steps 300"
  "scale-dense-e16|sigma-scaling|1|timing: dense with the parameters of E 16 (d_ff 1032), 300 steps|--ffn dense --experts 16 --steps 300"
  "scale-dense-e32|sigma-scaling|1|timing: dense with the parameters of E 32 (d_ff 2064), 300 steps|--ffn dense --experts 32 --steps 300"
  "scale-dense-e64|sigma-scaling|1|timing: dense with the parameters of E 64 (d_ff 4128), 300 steps|--ffn dense --experts 64 --steps 300"
)
# The learning-rate sweep (group lr-sweep): each family (NAME|DESCRIPTION|FLAGS) at three peak
# learning rates for 500 steps; every other row trains at the 3e-3 it picked.
sweep_families=(
  "dense|dense ReLU MLP|--ffn dense"
  "sigma-moe|sigma-MoE|--ffn sigma-moe --expert-dropout 0.05"
  "switch|Switch|--ffn switch"
  "s-base|S-BASE|--ffn s-base"
  "samoe|SaMoE M 2|--ffn samoe --members 2"
  "pkm|product-key memory|--ffn pkm"
)
for family in "${sweep_families[@]}"; do
  IFS='|' read -r family_name family_description family_flags <<<"$family"
  for lr in 1e-3 3e-3 6e-3; do
    rows+=("lr-$family_name-$lr|lr-sweep|1|learning-rate sweep: $family_description, lr $lr, 500 steps|$family_flags --lr $lr --steps 500")
  done
done
groups=(lr-sweep sigma-headline sigma-gates sigma-ablations sigma-scaling samoe-headline samoe-pool)
row_field() {  # row_field NAME INDEX (0 name, 1 group, 2 seeds, 3 description, 4 flags)
  local r
  for r in "${rows[@]}"; do
    IFS='|' read -r -a f <<<"$r"
    [[ "${f[0]}" == "$1" ]] && { echo "${f[$2]}"; return 0; }
  done
  return 1
}
common=(--d-model 128 --heads 4 --context 128 --batch 16 --threads "$threads"
        --eval-every 100 --log-every 10 --print-every 100 --final-eval-tokens 0)

# row_args NAME: a row's train_lm flags: the common ones, the budget, lr 3e-3 and 4 layers unless
# the row sets its own, then the row's.
row_args() {
  local flags words=("${common[@]}")
  flags=" $(row_field "$1" 4)"
  [[ "$flags " == *" --steps "* ]] || words+=(--steps "$steps")
  [[ "$flags " == *" --lr "* ]] || words+=(--lr 3e-3)
  [[ "$flags " == *" --layers "* ]] || words+=(--layers 4)
  echo "${words[*]}$flags"
}

# row_steps NAME: the --steps of row_args (the row's own or the budget).
row_steps() {
  local args
  args="$(row_args "$1") "
  args="${args#* --steps }"
  echo "${args%% *}"
}

# is_finished NAME CSV: the last row is the row's last step and has its validation.
is_finished() {
  [[ -f "$2" ]] && [[ "$(csv_last step "$2")" == "$(row_steps "$1")" ]] && [[ -n "$(csv_last val_bpb "$2")" ]]
}

run_one() {  # run_one NAME SEED
  local name="$1" seed="$2" run="$1.s$2"
  local csv="$results/$run.csv" ckpt="$work/checkpoints/$run.safetensors" out="$work/out/$run.out"
  if is_finished "$name" "$csv"; then
    echo "== $run: finished, skipped"
    return 0
  fi
  # shellcheck disable=SC2207  # the flags are words
  local args=(--data "$data" $(row_args "$name") --seed "$seed" --log "$csv" --save "$ckpt")
  if [[ -f "$ckpt" ]]; then
    echo "== $run: resuming from $ckpt"
    # The run's settings come from the checkpoint; the logging cadence is not persisted.
    args=(--resume "$ckpt" --data "$data" --threads "$threads" --log "$csv" --log-every 10 --print-every 100
          --save "$ckpt")
  fi
  echo "== $run: $TRAIN_LM ${args[*]}"
  "$TRAIN_LM" "${args[@]}" >>"$out" 2>&1 || die "$run failed (exit $?); see $out"
  grep -E '^(train_lm:|parameters:|training:|final:)' "$out" >"$results/$run.txt"
}

# ---- report: the table between the markers of docs/experiments.md, and one pair of plots per group
mean_sd() {  # numbers on stdin -> "mean ± sd (n)" (sample standard deviation; n = 1: no spread)
  awk '{ s += $1; q += $1 * $1; n++ } END {
    if (n == 0) { print ""; exit }
    m = s / n; if (n == 1) { printf "%.4f (1 seed)", m; exit }
    v = (q - n * m * m) / (n - 1); if (v < 0) v = 0
    printf "%.4f ± %.4f (%d seeds)", m, sqrt(v), n }'
}
mean() { awk '{ s += $1; n++ } END { if (n) printf "%.0f", s / n }'; }

report() {
  local table="$work/table.md" group name r seed csv txt
  mkdir -p "$work"
  {
    echo "| group | row | configuration | total params | active params/token | MFLOP/token | tokens | final val bits/byte | wall time (shared machine) | tokens/s (shared machine) |"
    echo "|---|---|---|---:|---:|---:|---:|---|---:|---:|"
    for group in "${groups[@]}"; do
      for r in "${rows[@]}"; do
        IFS='|' read -r -a f <<<"$r"
        [[ "${f[1]}" == "$group" ]] || continue
        name="${f[0]}"
        local bpb=() wall=() tps=() params="" active="" mflop="" tokens=""
        for seed in ${f[2]//,/ }; do
          csv="$results/$name.s$seed.csv" txt="$results/$name.s$seed.txt"
          is_finished "$name" "$csv" || continue
          bpb+=("$(csv_last val_bpb "$csv")")
          wall+=("$(csv_last elapsed_s "$csv")")
          tps+=("$(awk -v t="$(csv_last tokens "$csv")" -v s="$(csv_last elapsed_s "$csv")" 'BEGIN { printf "%.0f", t / s }')")
          tokens="$(csv_last tokens "$csv")"
          if [[ -f "$txt" ]]; then
            params="$(final_field parameters "$txt")" active="$(final_field active_per_token "$txt")"
            mflop="$(sed -n 's/^parameters: .*forward \([0-9.]*\) MFLOP.*/\1/p' "$txt" | tail -n 1)"
          fi
        done
        if [[ ${#bpb[@]} -eq 0 ]]; then
          printf '| %s | %s | %s | | | | | not run yet | | |\n' "$group" "$name" "${f[3]}"
        else
          printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s s | %s |\n' "$group" "$name" "${f[3]}" "$params" "$active" \
            "$mflop" "$tokens" "$(printf '%s\n' "${bpb[@]}" | mean_sd)" "$(printf '%s\n' "${wall[@]}" | mean)" \
            "$(printf '%s\n' "${tps[@]}" | mean)"
        fi
      done
    done
  } >"$table"
  {
    echo '```'
    for r in "${rows[@]}"; do
      IFS='|' read -r -a f <<<"$r"
      echo "# ${f[0]}: seeds ${f[2]}"
      echo "train_lm --data data/brown/brown.txt $(row_args "${f[0]}") --seed SEED" \
           "--log docs/results/experiments/${f[0]}.sSEED.csv --save build-experiments/checkpoints/${f[0]}.sSEED.safetensors"
    done
    echo '```'
  } >"$work/commands.md"
  insert_block table "$table"
  insert_block commands "$work/commands.md"
  command -v gnuplot >/dev/null || echo "gnuplot not installed (scripts/install_deps.sh installs it): SVG plots instead"
  local images="$work/plots.md" ext img
  : >"$images"
  for group in "${groups[@]}"; do
    plot_group "$group"
    for ext in png svg; do
      [[ -f "$results/$group.tokens.$ext" ]] || continue
      for img in tokens time; do
        echo "![$group, validation bits/byte against $img](results/experiments/$group.$img.$ext)" >>"$images"
      done
      break
    done
  done
  insert_block plots "$images"
  echo "== $doc: table and plots rebuilt"
}

# insert_block NAME FILE: replaces the lines between <!-- NAME:begin --> and <!-- NAME:end --> of
# the doc with FILE.
insert_block() {
  awk -v table="$2" -v begin="<!-- $1:begin -->" -v end="<!-- $1:end -->" '
    $0 == begin { print; while ((getline l < table) > 0) print l; skip = 1; next }
    $0 == end { skip = 0 }
    !skip { print }' "$doc" >"$doc.tmp" && mv "$doc.tmp" "$doc"
}

# plot_svg OUT XCOL XLABEL TITLE DAT...: a line chart of column 3 (bits per byte) against column XCOL
# of each DAT file (one line per file, named by the file), as SVG: the fallback without gnuplot.
# The y axis spans the lowest value to 1 bit/byte above it, so the first validations do not
# flatten the end of the curves.
plot_svg() {
  local out="$1" xcol="$2" xlabel="$3" title="$4"
  shift 4
  awk -v xcol="$xcol" -v xlabel="$xlabel" -v title="$title" '
    FNR == 1 { f++; name[f] = FILENAME; sub(/.*\//, "", name[f]); sub(/\.dat$/, "", name[f]) }
    { n[f]++; x[f, n[f]] = $xcol; y[f, n[f]] = $3
      if (!xmax || $xcol > xmax) xmax = $xcol
      if (!ymin || $3 < ymin) ymin = $3 }
    END {
      W = 900; H = 560; L = 70; R = 220; T = 40; B = 60; ymax = ymin + 1
      split("#1f77b4 #d62728 #2ca02c #9467bd #ff7f0e #8c564b #e377c2 #7f7f7f #17becf #bcbd22", color, " ")
      printf "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" font-size=\"12\">\n", W, H
      printf "<rect width=\"%d\" height=\"%d\" fill=\"white\"/>\n<text x=\"%d\" y=\"24\" font-size=\"14\">%s</text>\n", W, H, L, title
      for (i = 0; i <= 5; ++i) {
        gx = L + i * (W - L - R) / 5; gy = T + i * (H - T - B) / 5
        printf "<line x1=\"%g\" y1=\"%d\" x2=\"%g\" y2=\"%d\" stroke=\"#ddd\"/>", gx, T, gx, H - B
        printf "<text x=\"%g\" y=\"%d\" text-anchor=\"middle\">%.3g</text>\n", gx, H - B + 16, xmax * i / 5
        printf "<line x1=\"%d\" y1=\"%g\" x2=\"%d\" y2=\"%g\" stroke=\"#ddd\"/>", L, gy, W - R, gy
        printf "<text x=\"%d\" y=\"%g\" text-anchor=\"end\">%.2f</text>\n", L - 6, gy + 4, ymax - i * (ymax - ymin) / 5
      }
      printf "<text x=\"%g\" y=\"%d\" text-anchor=\"middle\">%s</text>\n", (L + W - R) / 2, H - 20, xlabel
      printf "<text transform=\"translate(18 %g) rotate(-90)\" text-anchor=\"middle\">validation bits per byte</text>\n", (T + H - B) / 2
      for (k = 1; k <= f; ++k) {
        c = color[(k - 1) % 10 + 1]; pts = ""
        for (i = 1; i <= n[k]; ++i) {
          yy = y[k, i] > ymax ? ymax : y[k, i]
          pts = pts sprintf("%.1f,%.1f ", L + x[k, i] / xmax * (W - L - R), T + (ymax - yy) / (ymax - ymin) * (H - T - B))
        }
        printf "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\" points=\"%s\"/>\n", c, pts
        printf "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"%s\" stroke-width=\"3\"/>", W - R + 15, T + 16 * k, W - R + 35, T + 16 * k, c
        printf "<text x=\"%d\" y=\"%d\">%s</text>\n", W - R + 40, T + 16 * k + 4, name[k]
      }
      print "</svg>"
    }' "$@" >"$out"
}

# plot_group GROUP: docs/results/experiments/GROUP.tokens.png and GROUP.time.png (with gnuplot; else
# GROUP.tokens.svg and GROUP.time.svg), the validation bits per byte of every run of the group
# (finished or not) against tokens and against wall time.
plot_group() {
  local group="$1" r name csv dat style plots_tokens="" plots_time="" n=0 row=0 dats=()
  mkdir -p "$work/plot"
  for r in "${rows[@]}"; do
    IFS='|' read -r -a f <<<"$r"
    [[ "${f[1]}" == "$group" ]] || continue
    row=$((row + 1))
    for csv in "$results/${f[0]}".s*.csv; do
      [[ -f "$csv" ]] || continue
      name="$(basename "$csv" .csv)" dat="$work/plot/$name.dat"
      awk -F, 'NR == 1 { for (i = 1; i <= NF; ++i) c[$i] = i; next }
               $c["val_bpb"] != "" { print $c["tokens"], $c["elapsed_s"], $c["val_bpb"] }' "$csv" >"$dat"
      [[ -s "$dat" ]] || continue
      # One colour per row, one point type per seed.
      style="with linespoints lc $row pt $((${name##*.s} + 3)) title '$name'"
      plots_tokens+="${plots_tokens:+, }'$dat' using 1:3 $style"
      plots_time+="${plots_time:+, }'$dat' using 2:3 $style"
      dats+=("$dat")
      n=$((n + 1))
    done
  done
  [[ $n -gt 0 ]] || return 0
  local title="$group: validation bits/byte (Brown, d 128, context 128, batch 16)"
  if ! command -v gnuplot >/dev/null; then
    plot_svg "$results/$group.tokens.svg" 1 "training tokens" "$title" "${dats[@]}"
    plot_svg "$results/$group.time.svg" 2 "training wall time, s (shared machine, 1 thread)" "$title" "${dats[@]}"
    return 0
  fi
  gnuplot <<GP
if (strstrt(GPVAL_TERMINALS, "pngcairo") > 0) { set terminal pngcairo size 900,560 } else { set terminal png size 900,560 }
set grid
set key top right
set ylabel 'validation bits per byte'
set title '$title'
set output '$results/$group.tokens.png'
set xlabel 'training tokens'
set format x '%.1s%c'
plot $plots_tokens
set output '$results/$group.time.png'
set xlabel 'training wall time, s (shared machine, 1 thread)'
set format x '%g'
plot $plots_time
GP
}

# ---- command line (in main, so that editing this file does not disturb a running instance: bash
# reads a script as it goes, and the last line is read before main starts)
main() {
  local seeds_override="" names=() mode=run n r matched selected=() seed name row_seeds
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --list) mode=list; shift ;;
      --report) mode=report; shift ;;
      --seeds) seeds_override="${2:?--seeds needs a value, e.g. 1,2,3}"; shift 2 ;;
      -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
      -*) die "unknown argument '$1' (see --help)" ;;
      *) names+=("$1"); shift ;;
    esac
  done

  if [[ "$mode" == list ]]; then
    for r in "${rows[@]}"; do
      IFS='|' read -r -a f <<<"$r"
      printf '%-20s %-16s seeds %-6s %s\n' "${f[0]}" "${f[1]}" "${f[2]}" "${f[4]}"
    done
    exit 0
  fi
  if [[ "$mode" == report ]]; then
    report
    exit 0
  fi

  [[ ${#names[@]} -gt 0 ]] || die "name the rows to run (see --list), or 'all'"
  selected=()
  for n in "${names[@]}"; do
    matched=0
    for r in "${rows[@]}"; do
      IFS='|' read -r -a f <<<"$r"
      if [[ "$n" == all || "$n" == "${f[0]}" || "$n" == "${f[1]}" ]]; then selected+=("${f[0]}"); matched=1; fi
    done
    [[ $matched -eq 1 ]] || die "no row or group named '$n' (see --list)"
  done

  build_train_lm "$repo" "$work/build" 1
  [[ -x "$TRAIN_LM" ]] || die "no train_lm binary at '$TRAIN_LM'"
  if [[ ! -f "$data" ]]; then
    [[ "$data" == "$repo/data/brown/brown.txt" ]] || die "no data file '$data'"
    "$repo/scripts/fetch_brown.sh"
  fi
  mkdir -p "$results" "$work/checkpoints" "$work/out"

  for seed in 1 2 3 4 5 6 7 8 9; do
    for name in "${selected[@]}"; do
      row_seeds="$(row_field "$name" 2)"
      [[ ",${seeds_override:-$row_seeds}," == *",$seed,"* ]] || continue
      run_one "$name" "$seed"
      report >/dev/null
    done
  done
  report
}

main "$@"; exit $?
