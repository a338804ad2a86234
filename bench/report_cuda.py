#!/usr/bin/env python3
"""Table of bench_cuda_moe against the PyTorch anchors of the same run (scripts/gpu_check.sh).

    python3 bench/report_cuda.py BENCH.json [ANCHORS.json]

speedup = anchor time / smoe time (> 1: smoe is faster); of floor = roofline floor / smoe time.
At the sigma-MoE shapes a second table: the layer against its parameter-equal dense MLP (cuBLAS,
Dense_* of the same run; > 1: the MoE layer is faster). Without an anchors file (the emulated
build) only smoe's times are listed.
"""
import json
import os
import sys


def smoe_times(path):
    out = {}
    for b in json.load(open(path))["benchmarks"]:
        if b.get("error_occurred"):
            continue
        parts = b["name"].split("/")  # MoE_Fwd/<shape>/manual_time
        unit = {"ms": 1.0, "us": 1e-3, "ns": 1e-6, "s": 1e3}[b.get("time_unit", "ms")]
        out[(parts[0], parts[1])] = (b["real_time"] * unit, b.get("TFLOP/s"))
    return out


def main():
    ours = smoe_times(sys.argv[1])
    anchors = {}
    if len(sys.argv) > 2 and os.path.exists(sys.argv[2]):
        anchors = {r["name"]: r for r in json.load(open(sys.argv[2]))}
    shapes = sorted({s for _, s in ours}, key=lambda s: list(k[1] for k in ours).index(s))
    print("| shape | pass | smoe ms | TFLOP/s | torch._grouped_mm ms | speedup | floor ms | of floor |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        a = anchors.get(shape, {})
        for bench, key in (("MoE_Fwd", "fwd"), ("MoE_FwdBwd", "fwdbwd")):
            if (bench, shape) not in ours:
                continue
            ms, tflops = ours[(bench, shape)]
            ref = a.get(f"grouped_mm_{key}_ms")
            floor = a.get(f"floor_{key}_ms")
            cells = [shape, key, f"{ms:.3f}", f"{tflops:.1f}" if tflops else "-",
                     f"{ref:.3f}" if ref else "-", f"{ref / ms:.2f}x" if ref else "-",
                     f"{floor:.3f}" if floor else "-", f"{100 * floor / ms:.0f}%" if floor else "-"]
            print("| " + " | ".join(cells) + " |")
        if a.get("dense_param_equal_fwd_ms"):
            print(f"| {shape} | dense param-equal fwd (torch) | {a['dense_param_equal_fwd_ms']:.3f} | | | | | |")
    dense = [(shape, key, bench) for shape in shapes for bench, key in (("Fwd", "fwd"), ("FwdBwd", "fwdbwd"))
             if ("Dense_" + bench, shape) in ours and ("MoE_" + bench, shape) in ours]
    if dense:
        print()
        print("| shape | pass | MoE ms | dense MLP (cuBLAS) ms | dense / MoE |")
        print("|---|---|---|---|---|")
        for shape, key, bench in dense:
            moe, dns = ours[("MoE_" + bench, shape)][0], ours[("Dense_" + bench, shape)][0]
            print(f"| {shape} | {key} | {moe:.3f} | {dns:.3f} | {dns / moe:.2f}x |")


if __name__ == "__main__":
    main()
