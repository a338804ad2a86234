#!/usr/bin/env python3
"""Turns bench_moe_vs_dense's Google Benchmark JSON into markdown tables (standard library only).

    ./bench_moe_vs_dense --benchmark_format=json ... | python3 bench/report.py [--stat median]

Benchmark names are <Layer>_<Pass>/E:<E>[/...], Layer in {Dense, MoE, TopKMLP, EigenDense}, Pass
in {Fwd, FwdBwd}; the counters K and G give the active hidden width K·G. One table per pass:
E, d_ff, d_ff/(K·G), dense ms, MoE ms, speed-up = dense/MoE, speed-up / (d_ff/(K·G)), and, when
measured, the Top-K-activation MLP's time and the Eigen-GEMM dense baseline with its speed-up. Ends with the check of the target
speed-up >= 0.8·d_ff/(K·G) at the largest E.
"""
import argparse
import json
import re
import sys

NAME = re.compile(r"^(?P<layer>[A-Za-z]+)_(?P<pass>FwdBwd|Fwd)/E:(?P<E>\d+)")
TO_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
PASSES = [("Fwd", "forward (Mode::eval)"), ("FwdBwd", "forward + backward (Mode::train)")]
TARGET = 0.8


def load(stream, stat):
    data = json.load(stream)
    rows = {}  # (layer, pass, E) -> {"ms": [...], "K": , "G": , "d_ff": }
    for b in data.get("benchmarks", []):
        m = NAME.match(b.get("run_name", b["name"]))
        if not m or b.get("error_occurred"):
            continue
        aggregate = b.get("aggregate_name")
        if b.get("run_type") == "aggregate" and aggregate != stat:
            continue
        key = (m["layer"], m["pass"], int(m["E"]))
        entry = rows.setdefault(key, {"ms": [], "aggregated": False})
        ms = b["real_time"] * TO_MS[b.get("time_unit", "ns")]
        if b.get("run_type") == "aggregate":
            entry["ms"], entry["aggregated"] = [ms], True
        elif not entry["aggregated"]:
            entry["ms"].append(ms)
        for c in ("K", "G", "d_ff", "threads"):
            if c in b:
                entry[c] = b[c]
    # Raw repetitions without aggregates: take the requested statistic over them.
    for entry in rows.values():
        values = sorted(entry["ms"])
        if stat == "min":
            entry["time"] = values[0]
        elif stat == "mean":
            entry["time"] = sum(values) / len(values)
        else:
            n = len(values)
            entry["time"] = values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])
    return data.get("context", {}), rows


def fmt(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f}"


def table(rows, pass_name, title):
    es = sorted({e for (layer, p, e) in rows if p == pass_name and layer == "MoE"})
    if not es:
        return [], None
    has_topk = any(("TopKMLP", pass_name, e) in rows for e in es)
    has_eigen = any(("EigenDense", pass_name, e) in rows for e in es)
    head = ["E", "d_ff", "d_ff/(K·G)", f"dense {title} ms", f"MoE {title} ms", "speed-up (dense/MoE)",
            "speed-up / (d_ff/(K·G))"]
    if has_topk:
        head.append(f"Top-K MLP {title} ms")
    if has_eigen:
        head += [f"Eigen dense {title} ms", "speed-up / (d_ff/(K·G)) vs Eigen dense"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    last = None
    for e in es:
        moe = rows[("MoE", pass_name, e)]
        dense = rows.get(("Dense", pass_name, e))
        kg = moe["K"] * moe["G"]
        d_ff = moe.get("d_ff", e * moe["G"])
        ideal = d_ff / kg
        speed = dense["time"] / moe["time"] if dense else None
        ratio = speed / ideal if speed is not None else None
        cells = [str(e), f"{d_ff:.0f}", f"{ideal:g}", fmt(dense["time"] if dense else None), fmt(moe["time"]),
                 fmt(speed), fmt(ratio)]
        if has_topk:
            topk = rows.get(("TopKMLP", pass_name, e))
            cells.append(fmt(topk["time"] if topk else None))
        if has_eigen:
            ed = rows.get(("EigenDense", pass_name, e))
            cells += [fmt(ed["time"] if ed else None), fmt(ed["time"] / moe["time"] / ideal if ed else None)]
        lines.append("| " + " | ".join(cells) + " |")
        last = (e, ideal, speed, ratio)
    return lines, last


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="?", help="benchmark JSON file (default: stdin)")
    parser.add_argument("--stat", default="median", choices=["median", "mean", "min"],
                        help="which aggregate of the repetitions to report (default: median)")
    args = parser.parse_args()
    if args.json:
        with open(args.json) as f:
            context, rows = load(f, args.stat)
    else:
        context, rows = load(sys.stdin, args.stat)
    if not rows:
        sys.exit("report.py: no <Layer>_<Pass>/E:<E> benchmarks in the input")

    any_moe = next(v for (layer, _, _), v in rows.items() if layer == "MoE")
    print(f"Wall time per call, {args.stat} of the repetitions; K·G = {any_moe['K'] * any_moe['G']:.0f}, "
          f"threads = {any_moe.get('threads', 0):.0f}, host {context.get('host_name', '?')}, "
          f"{context.get('num_cpus', '?')} CPUs, {context.get('date', '')}.")
    verdicts = []
    for pass_name, title in PASSES:
        lines, last = table(rows, pass_name, "fwd" if pass_name == "Fwd" else "fwd+bwd")
        if not lines:
            continue
        print(f"\n### {title}\n")
        print("\n".join(lines))
        if last and last[2] is not None:
            e, ideal, speed, ratio = last
            ok = ratio >= TARGET
            verdicts.append(f"{title} at E={e}: speed-up {speed:.2f} vs target {TARGET * ideal:.1f} "
                            f"(= {TARGET}·{ideal:g}): {'met' if ok else 'NOT met'}")
    if verdicts:
        print("\nTarget (speed-up >= 0.8·d_ff/(K·G) at the largest E):\n")
        for v in verdicts:
            print(f"- {v}")


if __name__ == "__main__":
    main()
