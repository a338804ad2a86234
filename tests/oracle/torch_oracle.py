"""Checks smoe_eval against an independent PyTorch implementation of the same MoE layer.

    torch_oracle.py SMOE_EVAL [--keep DIR]

For each case it writes SPEC.json and IN.safetensors, runs SMOE_EVAL, and compares every output
and gradient with moe_reference.py (float64 autograd on the same, dtype-rounded inputs):

    err(a, b) = max|a - b| / max(1, max|b|)  per tensor,  must be <= 1e-10 (float64), 1e-4 (float32)

expert_counts must match exactly. Random inputs are redrawn while a top-k boundary, the argmax of
the switch loss, or a selected ReLU pre-activation is closer to its kink than a per-dtype margin, so
the two sides cannot legitimately pick different pieces of a piecewise function. Exit code 77 (a
ctest skip) when torch is not importable.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

try:
    import numpy as np
    import torch
except ImportError as e:  # pragma: no cover - depends on the machine
    print(f"SKIP: torch/numpy not importable with {sys.executable}: {e}")
    sys.exit(77)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_reference  # noqa: E402
import safetensors_lite  # noqa: E402

TOLERANCE = {"float64": 1e-10, "float32": 1e-4}
MARGIN = {"float64": 1e-7, "float32": 1e-3}
NUMPY = {"float64": np.float64, "float32": np.float32}


def make_inputs(spec, tokens, seed, with_dy=True, router_std=1.0, dyadic_ties=False):
    """Random IN tensors for spec, rounded to the spec dtype, redrawn until no kink is close."""
    dtype = spec.get("dtype", "float32")
    d, E, G = spec["d_model"], spec["n_experts"], spec["expert_size"]
    H = 2 * G if spec["activation"] == "swiglu" else G
    for attempt in range(200):
        rng = np.random.default_rng(seed + 7919 * attempt)
        if dyadic_ties:
            # Multiples of 1/4 make every logit exact on both sides; duplicated router rows then
            # give exact ties, which must go to the smaller expert index.
            x = rng.integers(-4, 5, size=(tokens, d)) / 4.0
            W = rng.integers(-2, 3, size=(E, d)) / 4.0
            W[1::2] = W[0::2][: E // 2]
        else:
            x = rng.normal(size=(tokens, d))
            W = rng.normal(scale=router_std / np.sqrt(d), size=(E, d))
        t = {
            "x": x,
            "router.weight": W,
            "experts.w1": rng.normal(scale=1 / np.sqrt(d), size=(E, d, H)),
            "experts.w2": rng.normal(scale=1 / np.sqrt(G), size=(E, G, d)),
        }
        if spec.get("bias", False):
            t["experts.b1"] = rng.normal(scale=0.1, size=(E, H))
            t["experts.b2"] = rng.normal(scale=0.1, size=(E, d))
        if with_dy:
            t["dy"] = rng.normal(size=(tokens, d))
        t = {k: v.astype(NUMPY[dtype]) for k, v in t.items()}
        if dyadic_ties or far_from_kinks(spec, t, MARGIN[dtype]):
            return t
    raise RuntimeError(f"no input draw for {spec} stays away from the kinks")


def far_from_kinks(spec, t, margin):
    x, W = t["x"].astype(np.float64), t["router.weight"].astype(np.float64)
    K, E = spec["k"], spec["n_experts"]
    if x.shape[0] == 0:
        return True
    s = x @ W.T
    ordered = -np.sort(-s, axis=1)
    if E > 1 and np.min(ordered[:, 0] - ordered[:, 1]) < margin:  # switch-loss argmax
        return False
    if K < E and np.min(ordered[:, K - 1] - ordered[:, K]) < margin:  # top-k boundary
        return False
    if spec["activation"] == "relu":
        ids = np.argsort(-s, axis=1, kind="stable")[:, :K]
        pre = np.einsum("td,edh->eth", x, t["experts.w1"].astype(np.float64))
        if spec.get("bias", False):
            pre = pre + t["experts.b1"].astype(np.float64)[:, None, :]
        selected = pre[ids, np.arange(x.shape[0])[:, None]]
        if np.min(np.abs(selected)) < margin * max(1.0, np.max(np.abs(selected))):
            return False
    return True


def relative_error(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if b.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def run_eval(smoe_eval, workdir, name, spec, inputs, spec_text=None):
    spec_path = os.path.join(workdir, f"{name}.spec.json")
    in_path = os.path.join(workdir, f"{name}.in.safetensors")
    out_path = os.path.join(workdir, f"{name}.out.safetensors")
    with open(spec_path, "w") as f:
        f.write(spec_text if spec_text is not None else json.dumps(spec, indent=1))
    if isinstance(inputs, bytes):
        with open(in_path, "wb") as f:
            f.write(inputs)
    else:
        safetensors_lite.save(in_path, inputs)
    if os.path.exists(out_path):
        os.remove(out_path)
    proc = subprocess.run([smoe_eval, spec_path, in_path, out_path], capture_output=True, text=True)
    return proc, out_path


def check_case(smoe_eval, workdir, case):
    name, spec = case["name"], case["spec"]
    dtype = spec.get("dtype", "float32")
    inputs = make_inputs(spec, case["tokens"], case["seed"], with_dy=case.get("dy", True),
                         router_std=case.get("router_std", 1.0), dyadic_ties=case.get("ties", False))
    proc, out_path = run_eval(smoe_eval, workdir, name, spec, inputs)
    if proc.returncode != 0:
        return [f"{name}: smoe_eval exited {proc.returncode}: {proc.stderr.strip()}"], {}
    got, metadata = safetensors_lite.load(out_path)
    want, losses = moe_reference.evaluate(spec, {k: v.astype(np.float64) for k, v in inputs.items()})
    failures, errors = [], {}
    if set(got) != set(want):
        failures.append(f"{name}: OUT names {sorted(got)}, expected {sorted(want)}")
    if metadata.get("producer") != "smoe_eval":
        failures.append(f"{name}: OUT metadata {metadata}, expected producer smoe_eval")
    for key in sorted(set(got) & set(want)):
        a, b = got[key], want[key]
        expected_dtype = np.int64 if key == "expert_counts" else NUMPY[dtype]
        if a.dtype != expected_dtype or a.shape != b.shape:
            failures.append(f"{name}: {key} is {a.dtype}{list(a.shape)}, expected "
                            f"{np.dtype(expected_dtype)}{list(b.shape)}")
            continue
        if key == "expert_counts":
            if not np.array_equal(a, b):
                failures.append(f"{name}: expert_counts {a.tolist()}, expected {b.tolist()}")
            continue
        errors[key] = relative_error(a, b)
        if not errors[key] <= TOLERANCE[dtype]:
            i = np.unravel_index(np.argmax(np.abs(a.astype(np.float64) - b)), b.shape) if b.ndim else ()
            failures.append(f"{name}: {key} err {errors[key]:.3e} > {TOLERANCE[dtype]:.0e}; worst at {list(i)}: "
                            f"smoe {float(a[i])!r}, torch {float(b[i])!r} (losses {losses})")
    return failures, errors


def cases():
    def spec(router, activation, E, K, d=8, G=6, renormalize=None, bias=False, coef=True, dtype="float64", seed=0):
        s = {"d_model": d, "n_experts": E, "expert_size": G, "k": K, "router": router, "activation": activation,
             "bias": bias, "dtype": dtype}
        if renormalize is not None:
            s["renormalize"] = renormalize
        if coef:
            rng = np.random.default_rng(1000 + seed)
            s["coef"] = {name: float(rng.uniform(0.05, 0.8)) for name in ("switch", "z", "entropy", "importance")}
        return s

    return [
        dict(name="softmax_relu_k2", spec=spec("softmax_topk", "relu", 4, 2, renormalize=False, seed=1), tokens=16, seed=1),
        dict(name="softmax_renorm_gelu_bias", spec=spec("softmax_topk", "gelu", 6, 2, renormalize=True, bias=True, seed=2),
             tokens=20, seed=2),
        dict(name="softmax_swiglu_bias_k3", spec=spec("softmax_topk", "swiglu", 8, 3, bias=True, seed=3), tokens=12, seed=3),
        dict(name="sigmoid_swiglu_bias_k3", spec=spec("sigmoid_topk", "swiglu", 8, 3, bias=True, seed=4), tokens=12, seed=4),
        dict(name="sigmoid_relu_T1_k1", spec=spec("sigmoid_topk", "relu", 5, 1, seed=5), tokens=1, seed=5),
        dict(name="sigmoid_gelu_k2", spec=spec("sigmoid_topk", "gelu", 6, 2, d=5, G=3, seed=6), tokens=24, seed=6),
        dict(name="softmax_renorm_k1_swiglu", spec=spec("softmax_topk", "swiglu", 4, 1, renormalize=True, seed=7),
             tokens=10, seed=7),
        dict(name="softmax_T1_renorm_relu_bias", spec=spec("softmax_topk", "relu", 3, 2, renormalize=True, bias=True,
                                                           seed=8), tokens=1, seed=8),
        dict(name="softmax_K_eq_E_gelu_bias", spec=spec("softmax_topk", "gelu", 4, 4, bias=True, seed=9), tokens=9, seed=9),
        dict(name="softmax_renorm_K_eq_E_relu", spec=spec("softmax_topk", "relu", 3, 3, renormalize=True, seed=10),
             tokens=7, seed=10),
        dict(name="sigmoid_K_eq_E_swiglu", spec=spec("sigmoid_topk", "swiglu", 3, 3, bias=True, seed=11), tokens=6, seed=11),
        dict(name="softmax_T0_swiglu_bias", spec=spec("softmax_topk", "swiglu", 4, 2, bias=True, seed=12), tokens=0, seed=12),
        dict(name="sigmoid_T0_relu", spec=spec("sigmoid_topk", "relu", 4, 1, seed=13), tokens=0, seed=13),
        dict(name="forward_only_softmax_gelu", spec=spec("softmax_topk", "gelu", 5, 2, seed=14), tokens=8, seed=14, dy=False),
        dict(name="no_coef_sigmoid_relu", spec=spec("sigmoid_topk", "relu", 4, 2, coef=False, seed=15), tokens=11, seed=15),
        dict(name="ties_softmax_k1_relu", spec=spec("softmax_topk", "relu", 4, 1, seed=16), tokens=12, seed=16, ties=True),
        dict(name="ties_softmax_renorm_k2_gelu", spec=spec("softmax_topk", "gelu", 6, 2, renormalize=True, seed=17),
             tokens=12, seed=17, ties=True),
        dict(name="ties_sigmoid_k3_swiglu", spec=spec("sigmoid_topk", "swiglu", 6, 3, bias=True, seed=18), tokens=12,
             seed=18, ties=True),
        dict(name="wide_softmax_swiglu_d33_E16_k4", spec=spec("softmax_topk", "swiglu", 16, 4, d=33, G=20, bias=True,
                                                             seed=19), tokens=64, seed=19),
        dict(name="sharp_router_sigmoid_gelu", spec=spec("sigmoid_topk", "gelu", 8, 2, bias=True, seed=20), tokens=32,
             seed=20, router_std=4.0),
        dict(name="sharp_router_softmax_relu", spec=spec("softmax_topk", "relu", 8, 2, seed=21), tokens=32, seed=21,
             router_std=4.0),
        dict(name="float32_sigmoid_gelu_bias", spec=spec("sigmoid_topk", "gelu", 6, 2, bias=True, dtype="float32", seed=22),
             tokens=32, seed=22),
        dict(name="float32_softmax_renorm_swiglu", spec=spec("softmax_topk", "swiglu", 8, 2, renormalize=True, bias=True,
                                                            dtype="float32", seed=23), tokens=40, seed=23),
        dict(name="float32_default_dtype_relu",
             spec={"d_model": 8, "n_experts": 4, "expert_size": 6, "k": 2, "router": "softmax_topk",
                   "activation": "relu"}, tokens=16, seed=24),
    ]


def check_errors(smoe_eval, workdir):
    """Bad inputs: exit status 1 and a message that names the culprit."""
    base = {"d_model": 4, "n_experts": 3, "expert_size": 2, "k": 2, "router": "softmax_topk", "activation": "relu",
            "dtype": "float64"}
    good = make_inputs(base, 5, 99)
    biased = make_inputs({**base, "bias": True}, 5, 99)

    def without(t, name):
        return {k: v for k, v in t.items() if k != name}

    def replaced(t, name, value):
        return {**t, name: value}

    nan_x = good["x"].copy()
    nan_x[2, 1] = np.nan
    truncated = safetensors_lite.dumps(good)[:-3]
    bad = [
        ("missing_tensor", base, without(good, "experts.w2"), ["experts.w2", "missing"]),
        ("missing_x", base, without(good, "x"), ["'x'", "missing"]),
        ("wrong_shape", base, replaced(good, "router.weight", good["router.weight"].T.copy()),
         ["router.weight", "[3, 4]", "[4, 3]"]),
        ("wrong_x_width", base, replaced(good, "x", np.zeros((5, 3))), ["'x'", "[5, 3]"]),
        ("wrong_dy_shape", base, replaced(good, "dy", np.zeros((4, 4))), ["'dy'", "[4, 4]"]),
        ("wrong_dtype", base, replaced(good, "x", good["x"].astype(np.float32)), ["'x'", "F64", "F32"]),
        ("wrong_dtype_float32_spec", {**base, "dtype": "float32"}, good, ["F32", "F64"]),
        ("unexpected_tensor", base, biased, ["experts.b1"]),
        ("missing_bias", {**base, "bias": True}, good, ["experts.b1"]),
        ("bad_router", {**base, "router": "softmax_top2"}, good, ["router", "softmax_top2"]),
        ("bad_activation", {**base, "activation": "tanh"}, good, ["activation", "tanh"]),
        ("bad_dtype", {**base, "dtype": "float16"}, good, ["dtype", "float16"]),
        ("k_above_experts", {**base, "k": 4}, good, ["k must be in [1, experts = 3]", "got 4"]),
        ("zero_d_model", {**base, "d_model": 0}, good, ["d_model", "got 0"]),
        ("non_integer_k", {**base, "k": 1.5}, good, ["\"k\"", "integer"]),
        ("unknown_key", {**base, "capacity_factor": 1.25}, good, ["capacity_factor"]),
        ("unknown_coef", {**base, "coef": {"switch": 0.1, "balance": 1}}, good, ["balance"]),
        ("missing_key", {k: v for k, v in base.items() if k != "expert_size"}, good, ["expert_size"]),
        ("renormalize_sigmoid", {**base, "router": "sigmoid_topk", "renormalize": True}, good, ["renormalize"]),
        ("non_finite_x", base, replaced(good, "x", nan_x), ["'x'", "not finite"]),
        ("truncated_in", base, truncated, ["'dy'", "run past the data buffer"]),
    ]
    failures = []

    def report(name, proc, needles):
        message = proc.stderr.strip()
        problem = None
        if proc.returncode != 1:
            problem = f"exit {proc.returncode} (expected 1)"
        else:
            missing = [n for n in needles if n not in message]
            if missing:
                problem = f"message lacks {missing}"
        if problem:
            failures.append(f"error case {name}: {problem}; stderr: {message}")
        print(f"  {'BAD' if problem else 'ok '} {name:26s} {message}")

    for name, spec, inputs, needles in bad:
        proc, out_path = run_eval(smoe_eval, workdir, "error_" + name, spec, inputs)
        if os.path.exists(out_path):
            failures.append(f"error case {name}: OUT was written despite the error")
        report(name, proc, needles)
    proc, _ = run_eval(smoe_eval, workdir, "error_bad_json", None, good, spec_text='{"d_model": 4,')
    report("bad_json", proc, ["not valid JSON"])
    proc, _ = run_eval(smoe_eval, workdir, "error_duplicate_key", None, good,
                       spec_text=json.dumps(base)[:-1] + ', "k": 1}')
    report("duplicate_key", proc, ['"k"', "more than once"])
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("smoe_eval")
    parser.add_argument("--keep", help="write the case files here and keep them")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep or tmp
        os.makedirs(workdir, exist_ok=True)
        failures = []
        print(f"err = max|smoe - torch| / max(1, max|torch|) per tensor; tolerance {TOLERANCE}")
        for case in cases():
            case_failures, errors = check_case(args.smoe_eval, workdir, case)
            failures += case_failures
            dtype = case["spec"].get("dtype", "float32")
            worst = max(errors.items(), key=lambda kv: kv[1]) if errors else ("-", 0.0)
            status = "ok " if not case_failures else "BAD"
            print(f"{status} {case['name']:34s} {dtype:7s} T={case['tokens']:<3d} max err {worst[1]:.2e} "
                  f"({worst[0]})  " + " ".join(f"{k}={v:.1e}" for k, v in errors.items()))
        print("error cases:")
        failures += check_errors(args.smoe_eval, workdir)
    if failures:
        print(f"\n{len(failures)} FAILURES:")
        for f in failures:
            print("  " + f)
        return 1
    print("\nall smoe_eval outputs match the torch oracle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
