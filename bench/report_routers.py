#!/usr/bin/env python3
"""Turns bench_routers' Google Benchmark JSON into a markdown table (standard library only).

    ./bench_routers --benchmark_format=json ... | python3 bench/report_routers.py [--stat median]

Benchmark names are Layer_FwdBwd/<method> (the whole MoE layer, forward + backward in Mode::train)
and Router_FwdBwd/<method> (the layer's router alone, forward + backward); the label describes the
method and the counter "row" gives the order. One table row per method: ms per step of the layer,
tokens/s, the ratio to the reference method (softmax top-2) of the same run, the router's ms and
ratio, the router's share of the layer time (router ms / layer ms, two separate measurements), and
the routing statistics of the layer's last step (assignments per token, load CV, dropped
assignments, tokens without an expert). "slots / token" is the router's k(), the width of its
routing rows: K, 1 for Switch/BASE/hash, E for expert choice (padded with -1), heads·K for PKM.
"""
import argparse
import json
import re
import sys

NAME = re.compile(r"^(?P<part>Layer|Router)_FwdBwd/(?P<method>[^/]+)")
TO_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
REFERENCE = "softmax_top2"


def pick(values, stat):
    values = sorted(values)
    if stat == "min":
        return values[0]
    if stat == "mean":
        return sum(values) / len(values)
    n = len(values)
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def load(stream, stat):
    data = json.load(stream)
    rows = {}  # (part, method) -> {"ms": [...], "aggregated": bool, counters..., "label": str}
    for b in data.get("benchmarks", []):
        m = NAME.match(b.get("run_name", b["name"]))
        if not m:
            continue
        entry = rows.setdefault((m["part"], m["method"]), {"ms": [], "aggregated": False})
        if b.get("error_occurred"):
            entry["error"] = b.get("error_message", "error")
            continue
        aggregate = b.get("aggregate_name")
        if b.get("run_type") == "aggregate" and aggregate != stat:
            continue
        ms = b["real_time"] * TO_MS[b.get("time_unit", "ns")]
        if b.get("run_type") == "aggregate":
            entry["ms"], entry["aggregated"] = [ms], True
        elif not entry["aggregated"]:
            entry["ms"].append(ms)
        for c in ("row", "tokens", "K", "E", "threads", "A_per_token", "load_cv", "dropped_frac", "experts_used",
                  "no_expert_frac"):
            if c in b:
                entry[c] = b[c]
        if b.get("label"):
            entry["label"] = b["label"]
    for entry in rows.values():
        entry["time"] = pick(entry["ms"], stat) if entry["ms"] else None
    return data.get("context", {}), rows


def fmt(x, spec=".2f"):
    return "–" if x is None else format(x, spec)


def percent(x, spec):
    return "–" if x is None else format(100 * x, spec) + " %"


def ratio(a, b):
    return a / b if a is not None and b else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="?", help="benchmark JSON file (default: stdin)")
    parser.add_argument("--stat", default="median", choices=["median", "mean", "min"],
                        help="which aggregate of the repetitions to report (default: median)")
    parser.add_argument("--reference", default=REFERENCE, help=f"method the ratios refer to (default: {REFERENCE})")
    args = parser.parse_args()
    if args.json:
        with open(args.json) as f:
            context, rows = load(f, args.stat)
    else:
        context, rows = load(sys.stdin, args.stat)
    methods = sorted({method for (_, method) in rows},
                     key=lambda m: min(rows[(p, m)].get("row", 1e9) for p in ("Layer", "Router") if (p, m) in rows))
    if not methods:
        sys.exit("report_routers.py: no Layer_FwdBwd/<method> or Router_FwdBwd/<method> benchmarks in the input")

    def time(part, method):
        return rows.get((part, method), {}).get("time")

    ref_layer, ref_router = time("Layer", args.reference), time("Router", args.reference)
    any_row = next(iter(rows.values()))
    tokens = any_row.get("tokens")
    print(f"Wall time per forward+backward step (Mode::train), {args.stat} of the repetitions; "
          f"T = {tokens:.0f} tokens, threads = {any_row.get('threads', 0):.0f}, host {context.get('host_name', '?')}, "
          f"{context.get('num_cpus', '?')} CPUs, {context.get('date', '')}. Ratios: time / the time of "
          f"`{args.reference}` in the same run (> 1 = slower).\n")
    head = ["method", "routing", "slots / token", "assignments / token", "layer ms", "tokens/s",
            f"layer / {args.reference}", "router ms", f"router / {args.reference}", "router share", "load CV",
            "dropped", "tokens without expert"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|")
    errors = []
    for method in methods:
        layer, router = rows.get(("Layer", method), {}), rows.get(("Router", method), {})
        for part, entry in (("Layer", layer), ("Router", router)):
            if "error" in entry:
                errors.append(f"{part}_FwdBwd/{method}: {entry['error']}")
        lt, rt = layer.get("time"), router.get("time")
        tps = tokens / (lt / 1e3) if lt and tokens else None
        share = ratio(rt, lt)
        cells = [f"`{method}`", layer.get("label", router.get("label", "")),
                 fmt(layer.get("K", router.get("K")), ".0f"), fmt(layer.get("A_per_token"), ".3g"), fmt(lt),
                 fmt(tps, ",.0f"), fmt(ratio(lt, ref_layer)), fmt(rt), fmt(ratio(rt, ref_router)),
                 percent(share, ".0f"), fmt(layer.get("load_cv")), percent(layer.get("dropped_frac"), ".2f"),
                 percent(layer.get("no_expert_frac"), ".1f")]
        print("| " + " | ".join(cells) + " |")
    if errors:
        print("\nErrors:\n")
        for e in errors:
            print(f"- {e}")


if __name__ == "__main__":
    main()
