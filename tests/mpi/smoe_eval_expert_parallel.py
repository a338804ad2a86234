"""smoe_eval with "expert_parallel": true under mpirun -np P equals the single-process smoe_eval of
the same SPEC without the flag (issue 13 item 7): rank 0's OUT holds the same tensors, floats within
1e-12 (float64) / 1e-5 (float32) of the largest magnitude of each tensor, integers exactly.

    python3 tests/mpi/smoe_eval_expert_parallel.py SMOE_EVAL RANKS [MPIEXEC ARGS...]

With RANKS = 1 it also runs the flag without mpirun (MPI as a singleton), and checks that a router
that is not token-choice is refused with a clear message.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "oracle"))
import safetensors_lite  # noqa: E402

E = 12  # a multiple of 1, 2, 3 and 4 ranks
COEF = {"switch": 0.3, "z": 0.05, "entropy": 0.2, "importance": 0.1}
CASES = [  # (name, SPEC, tokens): every token-choice router, k = 1 and k > 1, uneven T, T < P
    ("softmax_k2_train_f64", {"router": "softmax_topk", "k": 2, "activation": "gelu", "mode": "train",
                              "dtype": "float64", "coef": COEF}, 7),
    ("softmax_k1_renorm_bias_f32", {"router": "softmax_topk", "k": 1, "activation": "swiglu", "bias": True,
                                    "dtype": "float32", "coef": {"switch": 0.5, "z": 0.01}}, 2),
    ("sigmoid_k3_f64", {"router": "sigmoid_topk", "k": 3, "activation": "relu", "dtype": "float64", "mode": "train",
                        "coef": {"switch": 0.2, "z": 0.1, "importance": 0.3}}, 5),
    ("noisy_k2_eval_f64", {"router": "noisy_topk", "k": 2, "activation": "gelu", "dtype": "float64", "seed": 7,
                           "coef": {"switch": 0.1, "importance": 0.2}}, 9),
    ("hash_k1_f64", {"router": "hash", "k": 1, "activation": "swiglu", "dtype": "float64", "seed": 3,
                     "coef": {"importance": 0.4}}, 6),
    ("group_topk_k2_f32", {"router": "group_topk", "k": 2, "n_groups": 4, "topk_groups": 2, "route_scale": 1.5,
                           "activation": "relu", "bias": True, "dtype": "float32",
                           "coef": {"switch": 0.2, "z": 0.02}}, 11),
    ("softmax_k4_one_token_f64", {"router": "softmax_topk", "k": 4, "activation": "relu", "dtype": "float64",
                                  "coef": COEF}, 1),
    # Capacity per expert over the global batch: drops at both choices, the same ones as one process.
    ("softmax_k2_capacity_f64", {"router": "softmax_topk", "k": 2, "activation": "gelu", "dtype": "float64",
                                 "capacity_factor": 0.5, "mode": "train", "coef": COEF}, 23),
    ("sigmoid_k3_capacity_f32", {"router": "sigmoid_topk", "k": 3, "activation": "relu", "dtype": "float32",
                                 "capacity_factor": 1.0, "coef": {"switch": 0.2, "entropy": 0.1}}, 17),
]
D, G = 6, 5


def inputs(spec, tokens, rng):
    dt = np.float64 if spec["dtype"] == "float64" else np.float32
    halves = 2 if spec["activation"] == "swiglu" else 1
    t = {"x": rng.standard_normal((tokens, D)), "dy": rng.standard_normal((tokens, D)),
         "router.weight": rng.standard_normal((E, D)),
         "experts.w1": 0.5 * rng.standard_normal((E, D, halves * G)),
         "experts.w2": 0.5 * rng.standard_normal((E, G, D))}
    if spec.get("bias"):
        t["experts.b1"] = 0.1 * rng.standard_normal((E, halves * G))
        t["experts.b2"] = 0.1 * rng.standard_normal((E, D))
    if spec["router"] == "noisy_topk":
        t["router.noise_weight"] = rng.standard_normal((E, D))
    if spec["router"] == "group_topk":
        t["router.bias"] = 0.1 * rng.standard_normal(E)
    t = {k: np.asarray(v, dtype=dt) for k, v in t.items()}
    if spec["router"] == "hash":  # routes by token id: no router weight
        del t["router.weight"]
        t["ids"] = rng.integers(0, 1000, tokens).astype(np.int64)
    return t


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout + r.stderr


def compare(name, got, ref, tol):
    failures = []
    if set(got) != set(ref):
        failures.append(f"{name}: tensors differ: {sorted(set(got) ^ set(ref))}")
    for key in sorted(set(got) & set(ref)):
        a, b = got[key], ref[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            failures.append(f"{name}: {key}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}")
        elif np.issubdtype(b.dtype, np.integer):
            if not np.array_equal(a, b):
                failures.append(f"{name}: {key}: integers differ")
        else:
            scale = max(float(np.max(np.abs(b.astype(np.float64)), initial=0.0)), 1e-300)
            err = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
            if err > tol * scale:
                failures.append(f"{name}: {key}: max |diff| {err:.3e} > {tol} x {scale:.3e}")
    return failures


def main():
    smoe_eval, ranks, mpiexec = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    rng = np.random.default_rng(13 + ranks)
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra, tokens in CASES:
            spec = {"d_model": D, "n_experts": E, "expert_size": G, **extra}
            in_path = os.path.join(tmp, name + ".in.safetensors")
            safetensors_lite.save(in_path, inputs(spec, tokens, rng))
            paths = {}
            for flag in (False, True):
                spec_path = os.path.join(tmp, f"{name}.{flag}.json")
                with open(spec_path, "w") as f:
                    json.dump({**spec, "expert_parallel": True} if flag else spec, f)
                paths[flag] = (spec_path, os.path.join(tmp, f"{name}.{flag}.out.safetensors"))
            rc, log = run([smoe_eval, paths[False][0], in_path, paths[False][1]])
            if rc != 0:
                failures.append(f"{name}: single process failed: {log}")
                continue
            ref = safetensors_lite.load(paths[False][1])[0]
            tol = 1e-12 if spec["dtype"] == "float64" else 1e-5
            launches = [mpiexec + [smoe_eval]] + ([[smoe_eval]] if ranks == 1 else [])
            for launch in launches:
                out = paths[True][1]
                if os.path.exists(out):
                    os.remove(out)
                rc, log = run(launch + [paths[True][0], in_path, out])
                if rc != 0:
                    failures.append(f"{name}: {' '.join(launch[-1:])} expert-parallel failed: {log}")
                    continue
                failures += compare(f"{name} (P = {ranks}{'' if launch is launches[0] else ', no mpirun'})",
                                    safetensors_lite.load(out)[0], ref, tol)
            print(f"{name}: T = {tokens}, P = {ranks}: checked", flush=True)
        # A router whose assignment needs the whole batch is refused, on every rank, with a reason.
        spec_path = os.path.join(tmp, "sbase.json")
        with open(spec_path, "w") as f:
            json.dump({"d_model": D, "n_experts": E, "expert_size": G, "k": 1, "router": "sbase",
                       "activation": "relu", "dtype": "float64", "expert_parallel": True}, f)
        in_path = os.path.join(tmp, "softmax_k2_train_f64.in.safetensors")
        rc, log = run(mpiexec + [smoe_eval, spec_path, in_path, os.path.join(tmp, "sbase.out")])
        if rc == 0 or "token-choice router" not in log:
            failures.append(f"sbase with expert_parallel: expected a clear error, got rc {rc}: {log}")
    for f in failures:
        print("FAIL", f)
    print(f"{len(CASES)} SPECs with P = {ranks}: {'FAILED' if failures else 'passed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
