"""Checks smoe_eval against an independent PyTorch implementation of the same MoE layer.

    torch_oracle.py SMOE_EVAL [--keep DIR]

For each case it writes SPEC.json and IN.safetensors, runs SMOE_EVAL, and compares every output
and gradient with moe_reference.py (float64 autograd on the same, dtype-rounded inputs; the
routers beyond softmax/sigmoid top-k come from ref_<router>.py):

    err(a, b) = max|a - b| / max(1, max|b|)  per tensor,  must be <= 1e-10 (float64), 1e-4 (float32)

Integer outputs (expert_counts, routing.tokens_per_expert, routing.experts) must match exactly.
Every router runs in float64 and float32, in train and eval mode where its routing differs, with
and without a capacity limit, with the losses that apply to it; a case that claims capacity drops
or a train-only routing is checked to have them. Random inputs are redrawn while a routing
decision is closer to its kink than a per-dtype margin (a top-k boundary of the scores the router
selects on, the argmax of the switch loss, the optimality gap of a balanced assignment, a selected
ReLU pre-activation or PKM ReLU gate), so the two sides cannot legitimately pick different pieces
of a piecewise function; the tie cases use exactly representable inputs instead and check the tie
rules. Bad specs and inputs must exit with status 1 and a message naming the culprit. Exit code 77
(a ctest skip) when torch is not importable.

The multi-layer mode ("layers": stacks over expert pools) is compared with ref_stack.py the same
way (every output, every layer's routing, every gradient; the kinks of every layer, the top-r member
selection included, are kept away from), and two identities are checked through the tool alone: a
one-layer per_layer stack is x plus the single-layer mode's output, and a tied stack is the SaMoE
stack of the same set as its one member, bitwise but for the pool's gradient.
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
import ref_base  # noqa: E402
import ref_expert_choice  # noqa: E402
import ref_noisy_topk  # noqa: E402
import ref_pkm  # noqa: E402
import ref_sbase  # noqa: E402
import ref_stack  # noqa: E402
import safetensors_lite  # noqa: E402

TOLERANCE = {"float64": 1e-10, "float32": 1e-4}
MARGIN = {"float64": 1e-7, "float32": 1e-3}
NUMPY = {"float64": np.float64, "float32": np.float32}
INTEGER_OUTPUTS = {"expert_counts": np.int64, "routing.tokens_per_expert": np.int64, "routing.experts": np.int32}


def make_inputs(spec, tokens, seed, with_dy=True, router_std=1.0, dyadic_ties=False, tied_tokens=False,
                selection_bias=False):
    """Random IN tensors for spec, rounded to the spec dtype, redrawn until no kink is close.

    dyadic_ties: multiples of 1/4 with duplicated router rows (pkm: duplicated sub-key rows), so
    scores tie exactly on both sides; tied_tokens also duplicates rows of x (ties between tokens,
    for expert choice). selection_bias: draw router.bias (group_topk)."""
    dtype = spec.get("dtype", "float32")
    for attempt in range(200):
        rng = np.random.default_rng(seed + 7919 * attempt)
        t = draw(spec, tokens, rng, with_dy, router_std, dyadic_ties, tied_tokens, selection_bias)
        t = {k: v if k == "ids" else v.astype(NUMPY[dtype]) for k, v in t.items()}
        if dyadic_ties or far_from_kinks(spec, t, MARGIN[dtype]):
            return t
    raise RuntimeError(f"no input draw for {spec} stays away from the kinks")


def dyadic(rng, low, high, size):
    return rng.integers(low, high, size=size) / 4.0


def draw(spec, tokens, rng, with_dy, router_std, dyadic_ties, tied_tokens, selection_bias):
    router, d = spec["router"], spec["d_model"]
    if router == "pkm":
        N, H, half = spec["pkm_keys"], spec.get("pkm_heads", moe_reference.PKM_DEFAULT_HEADS), d // 2
        if dyadic_ties:
            x = dyadic(rng, -4, 5, (tokens, d))
            keys = [dyadic(rng, -2, 3, (H, N, half)) for _ in range(2)]
            for k in keys:
                k[:, 1::2] = k[:, 0::2][:, : N // 2]
        else:
            x = rng.normal(size=(tokens, d))
            keys = [rng.normal(scale=router_std / np.sqrt(half), size=(H, N, half)) for _ in range(2)]
        t = {"x": x, "router.keys_a": keys[0], "router.keys_b": keys[1],
             "experts.values": rng.normal(size=(N * N, d))}
        if with_dy:
            t["dy"] = rng.normal(size=(tokens, d))
        return t
    E, G = spec["n_experts"], spec["expert_size"]
    H = 2 * G if spec["activation"] == "swiglu" else G
    if dyadic_ties:
        # Multiples of 1/4 make every logit exact on both sides; duplicated router rows then
        # give exact ties, which must go to the smaller expert index.
        x = dyadic(rng, -4, 5, (tokens, d))
        W = dyadic(rng, -2, 3, (E, d))
        W[1::2] = W[0::2][: E // 2]
        if tied_tokens:
            x[1::2] = x[0::2][: tokens // 2]
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
    if router == "noisy_topk":
        t["router.noise_weight"] = rng.normal(scale=1 / np.sqrt(d), size=(E, d))
    if router == "hash":
        del t["router.weight"]
        t["ids"] = rng.integers(-50, 400, size=tokens).astype(np.int64)  # repeats: same id, same expert
    if selection_bias:
        t["router.bias"] = rng.normal(scale=0.2, size=E)
    return t


def gap(scores, k):
    """Smallest distance between the k-th and (k+1)-th largest entry along the last axis (inf if
    there is no (k+1)-th)."""
    if scores.size == 0 or k >= scores.shape[-1]:
        return np.inf
    ordered = -np.sort(-scores, axis=-1)
    return float(np.min(ordered[..., k - 1] - ordered[..., k]))


def selection_gaps(spec, t):
    """Distances of each routing decision from the nearest input where it would change (float64
    numpy inputs): top-k boundaries of the scores the router selects on, the switch loss's argmax,
    the balanced assignment's optimality gap, the ReLU gate of a product key memory."""
    router, mode, K = spec["router"], spec.get("mode", "eval"), spec.get("k", 1)
    x = t["x"]
    T = x.shape[0]
    gaps = []
    if "router.weight" in t:
        s = x @ t["router.weight"].T
        E = s.shape[1]
        if E > 1:
            gaps.append(gap(s, 1))  # switch-loss argmax (and greedy BASE / top-1 selection)
    if router in ("softmax_topk", "sigmoid_topk"):
        gaps.append(gap(s, K))
    elif router == "noisy_topk":
        H = s
        if mode == "train":
            u = x @ t["router.noise_weight"].T
            eps = ref_noisy_topk.noise(spec.get("seed", 0), 0, T, E).numpy()
            H = s + eps * np.logaddexp(u, 0.0)
        gaps.append(gap(H, K))
        if spec.get("load_coef", 0.0) > 0 and K + 1 < E:
            gaps.append(gap(H, K + 1))  # which entry is the load loss's threshold
    elif router == "sbase":
        iters = spec.get("sinkhorn_iters", 3)
        if mode == "train" and iters > 0 and T > 1:  # one token: every balanced score is log(1/E), raw logits decide
            gaps.append(gap(ref_sbase.sinkhorn(torch.tensor(s), iters).numpy(), K))
        else:
            gaps.append(gap(s, K))
    elif router == "base":
        if mode == "train" and E > 1 and T > 0:
            gaps.append(ref_base.assignment_margin(s.tolist()))
    elif router == "expert_choice":
        cf = spec.get("capacity_factor", 2.0)
        S = torch.softmax(torch.tensor(s), dim=1).numpy()
        gaps.append(gap(S.T, ref_expert_choice.capacity(T, E, cf)))  # each expert's C-th token
    elif router == "group_topk":
        groups, keep = spec.get("n_groups", 1), spec.get("topk_groups", 1)
        size = E // groups
        q = 1 / (1 + np.exp(-s)) + t.get("router.bias", np.zeros(E))[None, :]
        if keep < groups and T > 0:
            qg = -np.sort(-q.reshape(T, groups, size), axis=2)
            score = qg[:, :, 0] if size == 1 else qg[:, :, 0] + qg[:, :, 1]
            gaps.append(gap(score, keep))
            kept = np.argsort(-score, axis=1, kind="stable")[:, :keep]
            allowed = np.zeros((T, groups), dtype=bool)
            allowed[np.arange(T)[:, None], kept] = True
            q = np.where(np.repeat(allowed, size, axis=1), q, -1e300)
        if K < keep * size:
            gaps.append(gap(q, K))
    elif router == "pkm":
        N, H = spec["pkm_keys"], spec.get("pkm_heads", moe_reference.PKM_DEFAULT_HEADS)
        tt = {k: torch.tensor(v) for k, v in t.items() if k.startswith("router.")}
        scores = ref_pkm.product_scores(tt, torch.tensor(x), H, N).numpy()
        gaps.append(gap(scores, K))
        if spec.get("activation", "relu") == "relu" and T > 0:
            top = -np.sort(-scores, axis=-1)[..., :K]
            gaps.append(float(np.min(np.abs(top))))  # the gate's ReLU kink
    return gaps


def far_from_kinks(spec, t, margin):
    t = {k: v if k == "ids" else v.astype(np.float64) for k, v in t.items()}
    x = t["x"]
    if x.shape[0] == 0:
        return True
    if any(g < margin for g in selection_gaps(spec, t)):
        return False
    if spec["router"] != "pkm" and spec["activation"] == "relu":
        with torch.no_grad():
            ids = moe_reference.route(spec, {k: torch.tensor(v) for k, v in t.items()})[0].numpy()
        T, K = ids.shape
        pre = np.einsum("td,edh->eth", x, t["experts.w1"])
        if spec.get("bias", False):
            pre = pre + t["experts.b1"][:, None, :]
        selected = pre[np.maximum(ids, 0), np.arange(T)[:, None]][ids >= 0]
        if selected.size and np.min(np.abs(selected)) < margin * max(1.0, np.max(np.abs(selected))):
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
    # Passive OpenMP waiting: the runs are tiny, and spinning threads on a busy machine (ctest -j, CI)
    # make them many times slower; the results do not depend on it (fixed work blocks).
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "passive")}
    proc = subprocess.run([smoe_eval, spec_path, in_path, out_path], capture_output=True, text=True, env=env)
    return proc, out_path


def with_tensors(t, **changes):
    """A copy of the tensors t with some replaced (None removes one); "__" in a name stands for "."."""
    t = {**t}
    for k, v in changes.items():
        k = k.replace("__", ".")
        if v is None:
            del t[k]
        else:
            t[k] = v
    return t


def check_error_case(name, proc, out_path, needles, failures):
    """An error case passes when smoe_eval exits 1 without writing OUT and its message names every needle."""
    message = proc.stderr.strip()
    problem = None
    if os.path.exists(out_path):
        problem = "OUT was written despite the error"
    elif proc.returncode != 1:
        problem = f"exit {proc.returncode} (expected 1)"
    else:
        missing = [n for n in needles if n not in message]
        if missing:
            problem = f"message lacks {missing}"
    if problem:
        failures.append(f"error case {name}: {problem}; stderr: {message}")
    print(f"  {'BAD' if problem else 'ok '} {name:34s} {message}")


def coverage_failures(case, inputs, want):
    """A case that claims to exercise capacity drops or a train-only routing must do so, or it
    could not fail where that path is wrong."""
    name, spec = case["name"], case["spec"]
    failures = []
    if "drops" in case and bool((want["routing.experts"] < 0).any()) != case["drops"]:
        failures.append(f"{name}: the reference {'drops no' if case['drops'] else 'drops an'} assignment; "
                        f"the case does not test what it claims")
    if case.get("train_differs"):
        t = {k: torch.tensor(v if k == "ids" else v.astype(np.float64)) for k, v in inputs.items()}
        with torch.no_grad():
            train = moe_reference.route(spec, t)[0]
            evaluation = moe_reference.route({**spec, "mode": "eval"}, t)[0]
        if torch.equal(train, evaluation):
            failures.append(f"{name}: the train routing equals the eval routing; the case does not test train mode")
    return failures


def integer_dtype(key):
    """The dtype of an integer output (a single-layer name, or one prefixed "layers.{l}."), else None."""
    for suffix, dtype in INTEGER_OUTPUTS.items():
        if key == suffix or key.endswith("." + suffix):
            return dtype
    return None


def compare_outputs(name, dtype, got, metadata, want, note=""):
    """(failures, errors): OUT `got` against the reference `want`, name by name."""
    failures, errors = [], {}
    if set(got) != set(want):
        failures.append(f"{name}: OUT names {sorted(got)}, expected {sorted(want)} (differing: "
                        f"{sorted(set(got) ^ set(want))})")
    if metadata.get("producer") != "smoe_eval":
        failures.append(f"{name}: OUT metadata {metadata}, expected producer smoe_eval")
    for key in sorted(set(got) & set(want)):
        a, b = got[key], want[key]
        integer = integer_dtype(key)
        expected_dtype = integer or NUMPY[dtype]
        if a.dtype != expected_dtype or a.shape != b.shape:
            failures.append(f"{name}: {key} is {a.dtype}{list(a.shape)}, expected "
                            f"{np.dtype(expected_dtype)}{list(b.shape)}")
            continue
        if integer:
            if not np.array_equal(a, b):
                failures.append(f"{name}: {key} {a.tolist()}, expected {b.tolist()}")
            continue
        errors[key] = relative_error(a, b)
        if not errors[key] <= TOLERANCE[dtype]:
            i = np.unravel_index(np.argmax(np.abs(a.astype(np.float64) - b)), b.shape) if b.ndim else ()
            failures.append(f"{name}: {key} err {errors[key]:.3e} > {TOLERANCE[dtype]:.0e}; worst at {list(i)}: "
                            f"smoe {float(a[i])!r}, torch {float(b[i])!r}{note}")
    return failures, errors


def check_case(smoe_eval, workdir, case):
    name, spec = case["name"], case["spec"]
    dtype = spec.get("dtype", "float32")
    inputs = make_inputs(spec, case["tokens"], case["seed"], with_dy=case.get("dy", True),
                         router_std=case.get("router_std", 1.0), dyadic_ties=case.get("ties", False),
                         tied_tokens=case.get("tied_tokens", False), selection_bias=case.get("selection_bias", False))
    proc, out_path = run_eval(smoe_eval, workdir, name, spec, inputs)
    if proc.returncode != 0:
        return [f"{name}: smoe_eval exited {proc.returncode}: {proc.stderr.strip()}"], {}
    got, metadata = safetensors_lite.load(out_path)
    want, losses = moe_reference.evaluate(spec, {k: v if k == "ids" else v.astype(np.float64) for k, v in inputs.items()})
    failures = coverage_failures(case, inputs, want)
    compare_failures, errors = compare_outputs(name, dtype, got, metadata, want, f" (losses {losses})")
    failures += compare_failures
    return failures, errors


def cases():
    def spec(router, activation, E, K, d=8, G=6, renormalize=None, bias=False, coef=True, dtype="float64", seed=0,
             router_seed=None, **options):
        """A spec; K = None leaves "k" out (expert_choice), router_seed is the SPEC "seed" (seed
        picks the loss coefficients), options are added as they are."""
        s = {"d_model": d, "n_experts": E, "expert_size": G, "k": K, "router": router, "activation": activation,
             "bias": bias, "dtype": dtype}
        if K is None:
            del s["k"]
        if renormalize is not None:
            s["renormalize"] = renormalize
        if coef:
            rng = np.random.default_rng(1000 + seed)
            s["coef"] = {name: float(rng.uniform(0.05, 0.8)) for name in ("switch", "z", "entropy", "importance")}
            if router == "hash":  # no logits: only the gate-based loss applies
                s["coef"] = {"importance": s["coef"]["importance"]}
        if router_seed is not None:
            s["seed"] = router_seed
        s.update(options)
        return s

    def pkm(activation, N, K, heads=None, d=8, dtype="float64", seed=0, **options):
        s = {"d_model": d, "pkm_keys": N, "k": K, "router": "pkm", "activation": activation, "dtype": dtype,
             "coef": {"importance": float(np.random.default_rng(1000 + seed).uniform(0.05, 0.8))}}
        if heads is not None:
            s["pkm_heads"] = heads
        s.update(options)
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
    ] + new_router_cases(spec, pkm)


def new_router_cases(spec, pkm):
    """Every router of smoe_eval beyond softmax/sigmoid, in float64 and float32, train and eval
    where they differ, with and without a capacity limit, with every loss that applies."""
    f32 = "float32"
    return [
        # MoE's CapacityPolicy on the top-k routers (position priority).
        dict(name="capacity_softmax_renorm_k2", spec=spec("softmax_topk", "relu", 4, 2, renormalize=True, seed=30,
                                                          capacity_factor=0.75), tokens=16, seed=30, drops=True),
        dict(name="capacity_sigmoid_gelu_bias", spec=spec("sigmoid_topk", "gelu", 6, 3, bias=True, seed=31,
                                                          capacity_factor=0.5), tokens=20, seed=31, drops=True),
        dict(name="capacity_no_drop_softmax", spec=spec("softmax_topk", "swiglu", 4, 2, seed=32, capacity_factor=4.0),
             tokens=12, seed=32, drops=False),
        dict(name="float32_capacity_softmax", spec=spec("softmax_topk", "gelu", 8, 2, dtype=f32, seed=33,
                                                        capacity_factor=1.0), tokens=32, seed=33, drops=True),
        dict(name="train_mode_sigmoid_relu", spec=spec("sigmoid_topk", "relu", 5, 2, seed=34, mode="train"),
             tokens=10, seed=34),
        # noisy top-k: noise in train only; the router-owned load loss.
        dict(name="noisy_eval_relu_load", spec=spec("noisy_topk", "relu", 6, 2, seed=40, load_coef=0.3), tokens=20,
             seed=40),
        dict(name="noisy_train_gelu_bias_load", spec=spec("noisy_topk", "gelu", 6, 2, bias=True, seed=41, mode="train",
                                                          load_coef=0.5), tokens=24, seed=41, train_differs=True),
        dict(name="noisy_train_swiglu_k1_seed", spec=spec("noisy_topk", "swiglu", 4, 1, seed=42, mode="train",
                                                          load_coef=0.2, router_seed=123456789), tokens=16, seed=42, train_differs=True),
        dict(name="noisy_train_K_eq_E", spec=spec("noisy_topk", "relu", 3, 3, seed=43, mode="train", load_coef=0.4),
             tokens=9, seed=43),
        dict(name="noisy_train_no_load", spec=spec("noisy_topk", "gelu", 5, 2, seed=44, mode="train"), tokens=12,
             seed=44, train_differs=True),
        dict(name="noisy_train_capacity", spec=spec("noisy_topk", "relu", 4, 2, seed=45, mode="train", load_coef=0.3,
                                                    capacity_factor=0.75), tokens=16, seed=45, drops=True, train_differs=True),
        dict(name="noisy_T0_train", spec=spec("noisy_topk", "relu", 4, 2, seed=46, mode="train", load_coef=0.3),
             tokens=0, seed=46),
        dict(name="ties_noisy_eval_k2", spec=spec("noisy_topk", "gelu", 6, 2, seed=47), tokens=12, seed=47, ties=True),
        dict(name="float32_noisy_train_load", spec=spec("noisy_topk", "gelu", 6, 2, bias=True, dtype=f32, seed=48,
                                                        mode="train", load_coef=0.3), tokens=24, seed=48, train_differs=True),
        # S-BASE: Sinkhorn-balanced selection in train, raw top-k in eval; sigmoid gates.
        dict(name="sbase_train_relu", spec=spec("sbase", "relu", 6, 2, seed=50, mode="train"), tokens=24, seed=50, train_differs=True),
        dict(name="sbase_eval_gelu_bias", spec=spec("sbase", "gelu", 6, 2, bias=True, seed=51), tokens=20, seed=51),
        dict(name="sbase_train_iters10_swiglu_k3", spec=spec("sbase", "swiglu", 8, 3, seed=52, mode="train",
                                                             sinkhorn_iters=10), tokens=16, seed=52, train_differs=True),
        dict(name="sbase_train_iters0", spec=spec("sbase", "relu", 4, 1, seed=53, mode="train", sinkhorn_iters=0),
             tokens=10, seed=53),
        dict(name="sbase_train_T1", spec=spec("sbase", "gelu", 4, 2, seed=54, mode="train"), tokens=1, seed=54),
        dict(name="sbase_train_capacity", spec=spec("sbase", "relu", 4, 2, seed=55, mode="train", capacity_factor=0.75),
             tokens=16, seed=55, drops=True, train_differs=True),
        dict(name="ties_sbase_train", spec=spec("sbase", "gelu", 6, 2, seed=56, mode="train"), tokens=12, seed=56,
             ties=True),
        dict(name="float32_sbase_train", spec=spec("sbase", "swiglu", 6, 2, bias=True, dtype=f32, seed=57, mode="train",
                                                   sinkhorn_iters=5), tokens=24, seed=57, train_differs=True),
        # BASE: exact balanced assignment in train, greedy argmax in eval.
        dict(name="base_train_relu_uneven", spec=spec("base", "relu", 4, 1, seed=60, mode="train"), tokens=10, seed=60, train_differs=True),
        dict(name="base_train_gelu_bias_no_k", spec=spec("base", "gelu", 3, None, bias=True, seed=61, mode="train"), tokens=9, seed=61, train_differs=True),
        dict(name="base_eval_swiglu", spec=spec("base", "swiglu", 4, 1, seed=62), tokens=12, seed=62),
        dict(name="base_train_T_below_E", spec=spec("base", "relu", 5, 1, seed=63, mode="train"), tokens=3, seed=63),
        dict(name="base_train_T0", spec=spec("base", "gelu", 3, 1, seed=64, mode="train"), tokens=0, seed=64),
        dict(name="float32_base_train", spec=spec("base", "gelu", 4, 1, bias=True, dtype=f32, seed=65, mode="train"),
             tokens=12, seed=65, train_differs=True),
        # Expert choice: the experts pick their tokens; its own capacity factor (default 2).
        dict(name="ec_default_relu", spec=spec("expert_choice", "relu", 4, None, seed=70), tokens=13, seed=70),
        dict(name="ec_cf1.5_gelu_bias_train", spec=spec("expert_choice", "gelu", 6, None, bias=True, seed=71,
                                                        mode="train", capacity_factor=1.5), tokens=20, seed=71),
        dict(name="ec_cf8_all_tokens_swiglu", spec=spec("expert_choice", "swiglu", 4, None, seed=72,
                                                        capacity_factor=8.0), tokens=6, seed=72),
        dict(name="ec_T1", spec=spec("expert_choice", "relu", 3, None, seed=73), tokens=1, seed=73),
        dict(name="ec_T0", spec=spec("expert_choice", "gelu", 3, None, seed=74), tokens=0, seed=74),
        dict(name="ties_ec_tokens", spec=spec("expert_choice", "gelu", 4, None, seed=75, capacity_factor=1.0),
             tokens=12, seed=75, ties=True, tied_tokens=True),
        dict(name="float32_ec_cf1", spec=spec("expert_choice", "gelu", 6, None, bias=True, dtype=f32, seed=76,
                                              capacity_factor=1.0), tokens=30, seed=76),
        # Hash: a fixed Philox table from token id to expert; no logits, only the importance loss.
        dict(name="hash_relu", spec=spec("hash", "relu", 5, 1, seed=80, router_seed=3), tokens=20, seed=80),
        dict(name="hash_gelu_bias_no_k_big_seed", spec=spec("hash", "gelu", 4, None, bias=True, seed=81,
                                                            router_seed=2 ** 63 + 5), tokens=16, seed=81),
        dict(name="hash_capacity_train", spec=spec("hash", "relu", 4, 1, seed=82, mode="train", capacity_factor=0.6),
             tokens=20, seed=82, drops=True),
        dict(name="hash_T0", spec=spec("hash", "swiglu", 3, 1, seed=83), tokens=0, seed=83),
        dict(name="float32_hash_swiglu", spec=spec("hash", "swiglu", 6, 1, bias=True, dtype=f32, seed=84), tokens=24,
             seed=84),
        # Group-limited sigmoid top-k with the selection bias.
        dict(name="group_relu_bias_scale", spec=spec("group_topk", "relu", 8, 2, seed=90, n_groups=4, topk_groups=2,
                                                     route_scale=2.5), tokens=20, seed=90, selection_bias=True),
        dict(name="group_gelu_k3", spec=spec("group_topk", "gelu", 6, 3, bias=True, seed=91, n_groups=3,
                                             topk_groups=2), tokens=16, seed=91),
        dict(name="group_one_group_defaults", spec=spec("group_topk", "swiglu", 4, 2, seed=92), tokens=12, seed=92,
             selection_bias=True),
        dict(name="group_size1_groups", spec=spec("group_topk", "relu", 4, 2, seed=93, n_groups=4, topk_groups=2,
                                                  mode="train"), tokens=12, seed=93),
        dict(name="group_capacity", spec=spec("group_topk", "gelu", 8, 2, seed=94, n_groups=2, topk_groups=1,
                                              capacity_factor=0.75), tokens=16, seed=94, selection_bias=True, drops=True),
        dict(name="ties_group", spec=spec("group_topk", "gelu", 8, 2, seed=95, n_groups=4, topk_groups=2), tokens=12,
             seed=95, ties=True),
        dict(name="float32_group_bias", spec=spec("group_topk", "gelu", 8, 3, bias=True, dtype=f32, seed=96,
                                                  n_groups=4, topk_groups=2, route_scale=1.5), tokens=24, seed=96,
             selection_bias=True),
        # Product-key memory with value experts; K per head.
        dict(name="pkm_relu_h2", spec=pkm("relu", 4, 3, heads=2, seed=100), tokens=12, seed=100),
        dict(name="pkm_softmax_h1_n_experts", spec=pkm("softmax", 5, 2, heads=1, seed=101, n_experts=25), tokens=10,
             seed=101),
        dict(name="pkm_across_heads_default_heads", spec=pkm("softmax_across_heads", 3, 3, seed=102, d=6), tokens=8,
             seed=102),
        dict(name="pkm_default_gate_train", spec={k: v for k, v in pkm("relu", 4, 2, heads=2, seed=103,
                                                                       mode="train").items() if k != "activation"},
             tokens=10, seed=103),
        dict(name="pkm_capacity", spec=pkm("relu", 4, 3, heads=2, seed=104, capacity_factor=0.5), tokens=12, seed=104, drops=True),
        dict(name="pkm_T0", spec=pkm("softmax", 3, 2, heads=2, seed=105), tokens=0, seed=105),
        dict(name="ties_pkm_softmax", spec=pkm("softmax", 4, 3, heads=2, seed=106), tokens=10, seed=106, ties=True),
        dict(name="float32_pkm_relu", spec=pkm("relu", 6, 4, heads=3, d=10, dtype=f32, seed=107), tokens=24,
             seed=107),
        # More tokens than one work block (128 tokens; Sinkhorn's blocks of 128 rows).
        dict(name="wide_sbase_train_T300", spec=spec("sbase", "gelu", 8, 2, d=12, seed=110, mode="train"), tokens=300,
             seed=110, train_differs=True),
        dict(name="wide_noisy_train_T200_load", spec=spec("noisy_topk", "relu", 8, 2, d=12, seed=111, mode="train",
                                                          load_coef=0.2, capacity_factor=1.0), tokens=200, seed=111,
             drops=True, train_differs=True),
        dict(name="wide_ec_T260", spec=spec("expert_choice", "gelu", 8, None, d=12, seed=112), tokens=260, seed=112),
        dict(name="wide_group_T200", spec=spec("group_topk", "relu", 8, 3, d=12, seed=113, n_groups=4, topk_groups=2),
             tokens=200, seed=113, selection_bias=True),
        dict(name="wide_pkm_T150", spec=pkm("relu", 6, 3, heads=4, d=12, seed=114), tokens=150, seed=114),
        dict(name="float32_pkm_softmax_capacity", spec=pkm("softmax", 4, 2, heads=2, dtype=f32, seed=108,
                                                           capacity_factor=0.75), tokens=16, seed=108, drops=True),
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
    # One valid spec and input per new router (T = 5, E = 4 unless the router fixes E).
    spec_of = {
        router: {**base, "router": router, "n_experts": 4, **extra}
        for router, extra in [("noisy_topk", {}), ("sbase", {}), ("base", {"k": 1}), ("expert_choice", {}),
                              ("hash", {"k": 1}), ("group_topk", {"n_groups": 2, "topk_groups": 1})]
    }
    del spec_of["expert_choice"]["k"]
    spec_of["pkm"] = {"d_model": 4, "pkm_keys": 3, "pkm_heads": 2, "k": 2, "router": "pkm", "dtype": "float64"}
    inputs_of = {router: make_inputs(spec, 5, 98) for router, spec in spec_of.items()}
    inputs_of["group_topk"]["router.bias"] = np.zeros(4)
    for router in spec_of:  # the valid ones run
        proc, _ = run_eval(smoe_eval, workdir, "valid_" + router, spec_of[router], inputs_of[router])
        if proc.returncode != 0:
            raise RuntimeError(f"the valid {router} case of check_errors fails: {proc.stderr.strip()}")

    def case(router, **changes):
        """(spec, inputs) of `router` with spec keys changed (None removes a key)."""
        spec = {**spec_of[router], **changes}
        return {k: v for k, v in spec.items() if v is not None}, inputs_of[router]

    def tensors(router, **changes):
        """(spec, inputs) of `router` with tensors replaced as with_tensors does."""
        return spec_of[router], with_tensors(inputs_of[router], **changes)

    ids = inputs_of["hash"]["ids"]
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
        ("unknown_key", {**base, "capacity": 1.25}, good, ["unknown key", "capacity"]),
        ("unknown_coef", {**base, "coef": {"switch": 0.1, "balance": 1}}, good, ["balance"]),
        ("missing_key", {k: v for k, v in base.items() if k != "expert_size"}, good, ["expert_size"]),
        ("renormalize_sigmoid", {**base, "router": "sigmoid_topk", "renormalize": True}, good, ["renormalize"]),
        ("non_finite_x", base, replaced(good, "x", nan_x), ["'x'", "not finite"]),
        ("truncated_in", base, truncated, ["'dy'", "run past the data buffer"]),
        # Options shared by several routers.
        ("bad_mode", {**base, "mode": "training"}, good, ["\"mode\"", "\"train\"", "training"]),
        ("mode_not_string", {**base, "mode": 1}, good, ["\"mode\"", "string"]),
        ("capacity_negative", {**base, "capacity_factor": -0.5}, good, ["capacity_factor", ">= 0", "-0.5"]),
        ("capacity_not_number", {**base, "capacity_factor": "1.25"}, good, ["capacity_factor", "finite number"]),
        ("capacity_base", *case("base", capacity_factor=1.0), ["capacity_factor", "does not apply", "\"base\""]),
        ("renormalize_noisy", *case("noisy_topk", renormalize=True), ["renormalize", "noisy_topk"]),
        # Keys of one router given to another.
        ("sinkhorn_for_softmax", {**base, "sinkhorn_iters": 3}, good,
         ["sinkhorn_iters", "does not apply", "softmax_topk", "sbase"]),
        ("seed_for_sigmoid", {**base, "router": "sigmoid_topk", "seed": 1}, good, ["seed", "does not apply", "sigmoid_topk"]),
        ("load_coef_for_softmax", {**base, "load_coef": 0.1}, good, ["load_coef", "does not apply"]),
        ("n_groups_for_sbase", *case("sbase", n_groups=2), ["n_groups", "does not apply", "sbase"]),
        ("pkm_keys_for_softmax", {**base, "pkm_keys": 3}, good, ["pkm_keys", "does not apply"]),
        ("expert_size_for_pkm", *case("pkm", expert_size=4), ["expert_size", "does not apply", "pkm"]),
        ("bias_for_pkm", *case("pkm", bias=True), ["bias", "pkm"]),
        ("ids_for_softmax", base, {**good, "ids": np.arange(5, dtype=np.int64)}, ["unexpected tensor 'ids'"]),
        ("router_bias_for_softmax", base, {**good, "router.bias": np.zeros(3)}, ["unexpected tensor 'router.bias'"]),
        ("noise_weight_for_sigmoid", {**base, "router": "sigmoid_topk"}, {**good, "router.noise_weight": np.zeros((3, 4))},
         ["unexpected tensor 'router.noise_weight'"]),
        # noisy_topk
        ("noisy_missing_noise_weight", *tensors("noisy_topk", router__noise_weight=None),
         ["router.noise_weight", "missing"]),
        ("noisy_noise_weight_shape", *tensors("noisy_topk", router__noise_weight=np.zeros((4, 3))),
         ["router.noise_weight", "[4, 4]", "[4, 3]"]),
        ("noisy_seed_negative", *case("noisy_topk", seed=-1), ["seed", "-1"]),
        ("noisy_seed_float", *case("noisy_topk", seed=1.5), ["seed", "1.5"]),
        ("noisy_load_coef_negative", *case("noisy_topk", load_coef=-0.1), ["load_coef", ">= 0"]),
        # sbase, base
        ("sbase_iters_negative", *case("sbase", sinkhorn_iters=-1), ["sinkhorn_iters", ">= 0", "-1"]),
        ("sbase_iters_float", *case("sbase", sinkhorn_iters=2.5), ["sinkhorn_iters", "integer"]),
        ("base_k2", *case("base", k=2), ["\"k\" must be 1", "base"]),
        # expert_choice
        ("ec_k", *case("expert_choice", k=2), ["\"k\" does not apply", "expert_choice", "capacity_factor"]),
        ("ec_capacity_zero", *case("expert_choice", capacity_factor=0), ["capacity_factor", "> 0"]),
        ("ec_router_bias", *tensors("expert_choice", router__bias=np.zeros(4)), ["unexpected tensor 'router.bias'"]),
        # hash
        ("hash_missing_ids", *tensors("hash", ids=None), ["missing tensor 'ids'", "I64", "[5]"]),
        ("hash_ids_int32", *tensors("hash", ids=ids.astype(np.int32)), ["'ids'", "I64", "I32"]),
        ("hash_ids_float", *tensors("hash", ids=ids.astype(np.float64)), ["'ids'", "I64", "F64"]),
        ("hash_ids_too_many", *tensors("hash", ids=np.arange(6, dtype=np.int64)), ["'ids'", "[5]", "[6]"]),
        ("hash_ids_2d", *tensors("hash", ids=ids.reshape(5, 1)), ["'ids'", "[5]", "[5, 1]"]),
        ("hash_router_weight", *tensors("hash", router__weight=np.zeros((4, 4))), ["unexpected tensor 'router.weight'"]),
        ("hash_k2", *case("hash", k=2), ["\"k\" must be 1", "hash"]),
        ("hash_coef_switch", *case("hash", coef={"switch": 0.1}), ["switch", "logits", "hash"]),
        # group_topk
        ("group_bias_shape", *tensors("group_topk", router__bias=np.zeros(5)), ["router.bias", "[4]", "[5]"]),
        ("group_bias_dtype", *tensors("group_topk", router__bias=np.zeros(4, dtype=np.float32)),
         ["router.bias", "F64", "F32"]),
        ("group_groups_not_dividing", *case("group_topk", n_groups=3), ["n_groups must divide experts = 4", "got 3"]),
        ("group_topk_groups_above", *case("group_topk", topk_groups=3), ["topk_groups must be in [1, n_groups = 2]"]),
        ("group_k_unreachable", *case("group_topk", k=3), ["k must be in [1, topk_groups", "got 3"]),
        ("group_route_scale_zero", *case("group_topk", route_scale=0), ["route_scale", "> 0"]),
        ("group_n_groups_zero", *case("group_topk", n_groups=0), ["n_groups", ">= 1", "got 0"]),
        # pkm
        ("pkm_missing_keys", *case("pkm", pkm_keys=None), ["missing", "pkm_keys"]),
        ("pkm_keys_zero", *case("pkm", pkm_keys=0), ["pkm_keys", "got 0"]),
        ("pkm_heads_zero", *case("pkm", pkm_heads=0), ["pkm_heads", "got 0"]),
        ("pkm_odd_d_model", *case("pkm", d_model=5), ["d_model must be even", "got 5"]),
        ("pkm_n_experts_mismatch", *case("pkm", n_experts=10), ["n_experts", "9", "10"]),
        ("pkm_k_above_keys", *case("pkm", k=4), ["k must be in [1, n_keys = 3]", "got 4"]),
        ("pkm_bad_activation", *case("pkm", activation="gelu"), ["activation", "softmax_across_heads", "gelu"]),
        ("pkm_coef_z", *case("pkm", coef={"z": 0.1}), ["\"z\"", "logits", "pkm"]),
        ("pkm_keys_shape", *tensors("pkm", router__keys_a=np.zeros((2, 3, 3))), ["router.keys_a", "[2, 3, 2]", "[2, 3, 3]"]),
        ("pkm_missing_values", *tensors("pkm", experts__values=None), ["experts.values", "missing"]),
        ("pkm_ffn_weight", *tensors("pkm", experts__w1=np.zeros((9, 4, 2))), ["unexpected tensor 'experts.w1'"]),
    ]
    failures = []
    for name, spec, inputs, needles in bad:
        proc, out_path = run_eval(smoe_eval, workdir, "error_" + name, spec, inputs)
        check_error_case(name, proc, out_path, needles, failures)
    proc, out_path = run_eval(smoe_eval, workdir, "error_bad_json", None, good, spec_text='{"d_model": 4,')
    check_error_case("bad_json", proc, out_path, ["not valid JSON"], failures)
    proc, out_path = run_eval(smoe_eval, workdir, "error_duplicate_key", None, good,
                              spec_text=json.dumps(base)[:-1] + ', "k": 1}')
    check_error_case("duplicate_key", proc, out_path, ['"k"', "more than once"], failures)
    return failures


# ---------------------------------------------------------------------------------------------
# Multi-layer mode ("layers"): stacks over expert pools against ref_stack.py.

def stack_scale(name, shape, d):
    """Standard deviation of a random stack parameter."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("weight", "w1", "mix"):
        return 1 / np.sqrt(d)
    if leaf == "w2":
        return 1 / np.sqrt(shape[-2])
    if leaf in ("b1", "b2"):
        return 0.1
    return 1.0  # combine (a_l), mix_bias


def make_stack_inputs(spec, tokens, seed, with_dy=True, member_ties=False):
    """Random IN tensors for a stack spec, rounded to its dtype, redrawn until no kink is close.

    member_ties: every a_l has exact ties (three members at 0.5, one at -0.5), so the top-r
    selection must break them toward the smaller index."""
    dtype = spec.get("dtype", "float32")
    d = spec["d_model"]
    for attempt in range(200):
        rng = np.random.default_rng(seed + 7919 * attempt)
        t = {"x": rng.normal(size=(tokens, d))}
        for name, shape in ref_stack.parameter_shapes(spec).items():
            t[name] = rng.normal(scale=stack_scale(name, shape, d), size=shape)
            if member_ties and name.endswith(".combine"):
                t[name] = np.full(shape, 0.5)
                t[name][rng.integers(shape[0])] = -0.5
        if with_dy:
            t["dy"] = rng.normal(size=(tokens, d))
        t = {k: v.astype(NUMPY[dtype]) for k, v in t.items()}
        gaps = ref_stack.gaps_only(spec, {k: v.astype(np.float64) for k, v in t.items()})
        if all(g >= MARGIN[dtype] for kind, g in gaps if not (member_ties and kind == "members")):
            return t
    raise RuntimeError(f"no input draw for {spec} stays away from the kinks")


def check_stack_case(smoe_eval, workdir, case):
    name, spec = case["name"], case["spec"]
    dtype = spec.get("dtype", "float32")
    inputs = make_stack_inputs(spec, case["tokens"], case["seed"], with_dy=case.get("dy", True),
                               member_ties=case.get("member_ties", False))
    proc, out_path = run_eval(smoe_eval, workdir, name, spec, inputs)
    if proc.returncode != 0:
        return [f"{name}: smoe_eval exited {proc.returncode}: {proc.stderr.strip()}"], {}
    got, metadata = safetensors_lite.load(out_path)
    want, _ = ref_stack.evaluate(spec, {k: v.astype(np.float64) for k, v in inputs.items()})
    failures = []
    if "drops" in case:
        drops = any(bool((v < 0).any()) for k, v in want.items() if k.endswith("routing.experts"))
        if drops != case["drops"]:
            failures.append(f"{name}: the reference {'drops no' if case['drops'] else 'drops an'} assignment; "
                            f"the case does not test what it claims")
    compare_failures, errors = compare_outputs(name, dtype, got, metadata, want)
    return failures + compare_failures, errors


def stack_spec(pool, router, activation, L, E=4, K=2, d=6, G=4, M=None, top=None, tau=None, residual=0,
               mix_bias=None, shared=0, bias=False, dtype="float64", seed=0, coef=True, **options):
    s = {"layers": L, "pool": pool, "d_model": d, "n_experts": E, "expert_size": G, "k": K, "router": router,
         "activation": activation, "bias": bias, "dtype": dtype}
    for key, value in (("pool_members", M), ("pool_top_members", top), ("temperature", tau),
                       ("residual_mix_bias", mix_bias)):
        if value is not None:
            s[key] = value
    if residual:
        s["residual_expert_size"] = residual
    if shared:
        s["shared_experts"] = shared
    if coef:
        rng = np.random.default_rng(2000 + seed)
        s["coef"] = {name: float(rng.uniform(0.05, 0.8)) for name in ("switch", "z", "entropy", "importance")}
    s.update(options)
    return s


def stack_cases():
    """Every pool × routers and activations, residual and shared experts on and off, L ∈ {1, 3},
    M ∈ {1, 2, 4}, top-r members, τ ≠ 1, capacity, T = 0, forward only, member ties, float32."""
    S, f32 = stack_spec, "float32"
    return [
        dict(name="stack_per_layer_L1_softmax_relu", spec=S("per_layer", "softmax_topk", "relu", 1, seed=1), tokens=12,
             seed=201),
        dict(name="stack_per_layer_L3_sigmoid_gelu_bias", spec=S("per_layer", "sigmoid_topk", "gelu", 3, bias=True,
                                                                 seed=2), tokens=12, seed=202),
        dict(name="stack_per_layer_L3_renorm_swiglu_res_shared",
             spec=S("per_layer", "softmax_topk", "swiglu", 3, residual=3, shared=1, seed=3, renormalize=True),
             tokens=10, seed=203),
        dict(name="stack_per_layer_L3_train_default_pool",
             spec={k: v for k, v in S("per_layer", "sigmoid_topk", "relu", 3, seed=4, mode="train").items()
                   if k != "pool"}, tokens=10, seed=204),
        dict(name="stack_tied_L3_softmax_relu_shared2", spec=S("tied", "softmax_topk", "relu", 3, shared=2, seed=5),
             tokens=12, seed=205),
        dict(name="stack_tied_L3_sigmoid_swiglu_bias_res_mixb",
             spec=S("tied", "sigmoid_topk", "swiglu", 3, residual=5, mix_bias=True, bias=True, seed=6), tokens=12,
             seed=206),
        dict(name="stack_tied_L1_gelu_res", spec=S("tied", "softmax_topk", "gelu", 1, residual=2, mix_bias=False,
                                                   seed=7), tokens=9, seed=207),
        dict(name="stack_tied_L3_forward_only", spec=S("tied", "softmax_topk", "gelu", 3, residual=2, shared=1,
                                                       seed=8), tokens=8, seed=208, dy=False),
        dict(name="stack_weight_M1_L3_softmax_gelu", spec=S("samoe_weight", "softmax_topk", "gelu", 3, M=1, seed=9),
             tokens=12, seed=209),
        dict(name="stack_weight_M2_L3_sigmoid_relu_bias_tau",
             spec=S("samoe_weight", "sigmoid_topk", "relu", 3, M=2, tau=0.5, bias=True, seed=10), tokens=12, seed=210),
        dict(name="stack_weight_M4_L3_swiglu_top2_res_shared",
             spec=S("samoe_weight", "softmax_topk", "swiglu", 3, M=4, top=2, residual=3, shared=1, seed=11),
             tokens=10, seed=211),
        dict(name="stack_weight_M4_L1_renorm_gelu_top1",
             spec=S("samoe_weight", "softmax_topk", "gelu", 1, M=4, top=1, seed=12, renormalize=True), tokens=10,
             seed=212),
        dict(name="stack_weight_M2_L3_capacity", spec=S("samoe_weight", "softmax_topk", "gelu", 3, M=2, seed=13,
                                                        capacity_factor=0.5), tokens=12, seed=213, drops=True),
        dict(name="stack_weight_M4_top2_member_ties",
             spec=S("samoe_weight", "sigmoid_topk", "gelu", 3, M=4, top=2, residual=2, seed=14), tokens=8, seed=214,
             member_ties=True),
        dict(name="stack_output_M1_L1_sigmoid_relu", spec=S("samoe_output", "sigmoid_topk", "relu", 1, M=1, seed=15),
             tokens=12, seed=215),
        dict(name="stack_output_M2_L3_swiglu_bias_shared2_tau",
             spec=S("samoe_output", "softmax_topk", "swiglu", 3, M=2, tau=2.0, bias=True, shared=2, seed=16),
             tokens=10, seed=216),
        dict(name="stack_output_M4_L3_sigmoid_gelu_top3_res",
             spec=S("samoe_output", "sigmoid_topk", "gelu", 3, M=4, top=3, residual=4, seed=17), tokens=10, seed=217),
        dict(name="stack_output_M4_L3_relu_all_parts",
             spec=S("samoe_output", "softmax_topk", "relu", 3, M=4, top=0, residual=3, mix_bias=True, shared=1,
                    bias=True, seed=18), tokens=10, seed=218),
        dict(name="stack_output_M4_top1_member_ties", spec=S("samoe_output", "softmax_topk", "swiglu", 3, M=4, top=1,
                                                              shared=1, seed=19), tokens=8, seed=219, member_ties=True),
        dict(name="stack_output_M2_L3_capacity_K1", spec=S("samoe_output", "sigmoid_topk", "gelu", 3, K=1, M=2,
                                                            seed=20, capacity_factor=0.75), tokens=12, seed=220,
             drops=True),
        dict(name="stack_output_M2_L3_T0", spec=S("samoe_output", "softmax_topk", "gelu", 3, M=2, residual=2,
                                                  shared=1, bias=True, seed=21), tokens=0, seed=221),
        dict(name="stack_per_layer_L3_T0_no_coef", spec=S("per_layer", "sigmoid_topk", "swiglu", 3, coef=False,
                                                          seed=22), tokens=0, seed=222),
        dict(name="stack_K_eq_E_tied_L3", spec=S("tied", "sigmoid_topk", "gelu", 3, E=3, K=3, residual=2, seed=23),
             tokens=7, seed=223),
        # More slots than one block (64 slots; materialization blocks of 16384 elements: w1 of one
        # member has 8·24·96 = 18432).
        dict(name="stack_wide_weight_M2_L2_T150",
             spec=S("samoe_weight", "softmax_topk", "gelu", 2, E=8, K=2, d=24, G=96, M=2, residual=16, shared=1,
                    bias=True, seed=24), tokens=150, seed=224),
        dict(name="stack_wide_output_M3_L3_T130",
             spec=S("samoe_output", "sigmoid_topk", "swiglu", 3, E=8, K=2, d=12, G=8, M=3, top=2, residual=6,
                    seed=25), tokens=130, seed=225),
        dict(name="float32_stack_per_layer_swiglu_res_shared",
             spec=S("per_layer", "softmax_topk", "swiglu", 3, residual=3, shared=1, bias=True, dtype=f32, seed=26),
             tokens=16, seed=226),
        dict(name="float32_stack_tied_gelu_bias", spec=S("tied", "sigmoid_topk", "gelu", 3, bias=True, dtype=f32,
                                                          seed=27), tokens=16, seed=227),
        dict(name="float32_stack_weight_M4_top2_relu",
             spec=S("samoe_weight", "sigmoid_topk", "relu", 3, M=4, top=2, tau=0.7, dtype=f32, seed=28), tokens=16,
             seed=228),
        dict(name="float32_stack_output_M2_res_shared_gelu",
             spec=S("samoe_output", "softmax_topk", "gelu", 3, M=2, residual=3, mix_bias=True, shared=2, bias=True,
                    dtype=f32, seed=29), tokens=16, seed=229),
    ]


def check_one_layer_stack(smoe_eval, workdir):
    """Through the tool: "layers": 1 with pool per_layer is x plus the single-layer mode's layer,
    bitwise (y = x + y_single, grad.x = dy + grad.x_single, the same routing and gradients)."""
    spec = stack_spec("per_layer", "sigmoid_topk", "swiglu", 1, bias=True, dtype="float32", seed=31,
                      capacity_factor=0.75)
    inputs = make_stack_inputs(spec, 12, 310)
    single_spec = {k: v for k, v in spec.items() if k not in ("layers", "pool")}
    single_inputs = {k[len("layers.0."):] if k.startswith("layers.0.") else k: v for k, v in inputs.items()}
    outs = []
    for name, sp, t in (("one_layer_stack", spec, inputs), ("one_layer_single", single_spec, single_inputs)):
        proc, out_path = run_eval(smoe_eval, workdir, name, sp, t)
        if proc.returncode != 0:
            return [f"{name}: smoe_eval exited {proc.returncode}: {proc.stderr.strip()}"]
        outs.append(safetensors_lite.load(out_path)[0])
    stack, single = outs
    expected = {"y": inputs["x"] + single["y"], "grad.x": inputs["dy"] + single["grad.x"],
                "aux_loss": single["aux_loss"], "layers.0.aux_loss": single["aux_loss"]}
    for k, v in single.items():
        if k not in expected and k not in ("y", "grad.x", "aux_loss"):
            expected["grad.layers.0." + k[len("grad."):] if k.startswith("grad.") else "layers.0." + k] = v
    failures = []
    if set(stack) != set(expected):
        failures.append(f"one-layer stack: OUT names differ: {sorted(set(stack) ^ set(expected))}")
    for k in sorted(set(stack) & set(expected)):
        if stack[k].dtype != expected[k].dtype or stack[k].tobytes() != expected[k].tobytes():
            failures.append(f"one-layer stack: {k} is not bitwise x + the single layer's")
    if not (single["routing.experts"] < 0).any():
        failures.append("one-layer stack: no capacity drop; the check does not cover the capacity policy")
    print(f"  {'ok ' if not failures else 'BAD'} one-layer per_layer stack = x + single-layer mode (bitwise)")
    return failures


def check_tied_equals_samoe(smoe_eval, workdir):
    """Through the tool: a tied stack equals the SaMoE stack of the same set as its one pool member
    (α = 1), in both spaces. Bitwise: y, grad.x, every layer's outputs and gradients; the pool's
    gradient sums the layers in another order, so it is compared to relative 1e-13; ∂/∂a_l = 0."""
    spec = stack_spec("tied", "softmax_topk", "gelu", 3, residual=3, shared=1, bias=True, seed=30)
    inputs = make_stack_inputs(spec, 12, 300)
    proc, out_path = run_eval(smoe_eval, workdir, "tied_vs_samoe_tied", spec, inputs)
    if proc.returncode != 0:
        return [f"tied_vs_samoe: smoe_eval exited {proc.returncode}: {proc.stderr.strip()}"]
    tied, _ = safetensors_lite.load(out_path)
    failures = []
    for pool in ref_stack.SAMOE:
        samoe_spec = {**spec, "pool": pool, "pool_members": 1}
        t = {}
        for k, v in inputs.items():
            t[("pool." + k[len("experts."):]) if k.startswith("experts.") else k] = v[None] if k.startswith("experts.") else v
        for l in range(3):
            t[f"layers.{l}.combine"] = np.array([0.75 - l])
        proc, out_path = run_eval(smoe_eval, workdir, f"tied_vs_samoe_{pool}", samoe_spec, t)
        if proc.returncode != 0:
            failures.append(f"tied_vs_samoe {pool}: smoe_eval exited {proc.returncode}: {proc.stderr.strip()}")
            continue
        got, _ = safetensors_lite.load(out_path)
        names = set()
        for key, a in tied.items():
            if key.startswith("grad.experts."):
                other = "grad.pool." + key[len("grad.experts."):]
                names.add(other)
                if other not in got or got[other].shape != (1, *a.shape) or relative_error(got[other][0], a) > 1e-13:
                    failures.append(f"tied_vs_samoe {pool}: {other} differs from {key}")
            else:
                names.add(key)
                if key not in got or got[key].dtype != a.dtype or got[key].tobytes() != a.tobytes():
                    failures.append(f"tied_vs_samoe {pool}: {key} is not bitwise the tied stack's")
        for l in range(3):
            alpha, grad = f"layers.{l}.combine_coefficients", f"grad.layers.{l}.combine"
            names |= {alpha, grad}
            if alpha not in got or got[alpha].tolist() != [1.0]:
                failures.append(f"tied_vs_samoe {pool}: {alpha} is {got.get(alpha)}, expected [1.0]")
            if grad not in got or got[grad].tolist() != [0.0]:
                failures.append(f"tied_vs_samoe {pool}: {grad} is {got.get(grad)}, expected [0.0] exactly")
        if set(got) != names:
            failures.append(f"tied_vs_samoe {pool}: OUT names {sorted(set(got) ^ names)} differ")
        print(f"  {'ok ' if not failures else 'BAD'} tied stack = {pool} stack with one member")
    return failures


def check_stack_errors(smoe_eval, workdir):
    """Bad multi-layer specs and inputs: exit status 1, a message naming the culprit, no OUT."""
    plain = {"layers": 2, "d_model": 4, "n_experts": 3, "expert_size": 2, "k": 2, "router": "softmax_topk",
             "activation": "relu", "dtype": "float64"}  # pool per_layer by default
    tied = {**plain, "pool": "tied"}
    base = {**plain, "pool": "samoe_weight", "pool_members": 2, "residual_expert_size": 2, "shared_experts": 1}
    inputs = {name: make_stack_inputs(spec, 5, 97) for name, spec in (("plain", plain), ("tied", tied), ("base", base))}
    for name, spec in (("plain", plain), ("tied", tied), ("base", base)):
        proc, _ = run_eval(smoe_eval, workdir, "valid_stack_" + name, spec, inputs[name])
        if proc.returncode != 0:
            raise RuntimeError(f"the valid {name} stack of check_stack_errors fails: {proc.stderr.strip()}")
    good, plain_in, tied_in = inputs["base"], inputs["plain"], inputs["tied"]
    single = {"d_model": 4, "n_experts": 3, "expert_size": 2, "k": 2, "router": "softmax_topk", "activation": "relu",
              "dtype": "float64"}
    single_in = make_inputs(single, 5, 99)

    def without_key(spec, key):
        return {k: v for k, v in spec.items() if k != key}

    nan_pool = good["pool.w1"].copy()
    nan_pool[1, 0, 2, 1] = np.nan
    bad = [
        ("stack_router_noisy", {**base, "router": "noisy_topk"}, good,
         ["\"router\"", "\"softmax_topk\"", "\"sigmoid_topk\"", "multi-layer", "noisy_topk"]),
        ("stack_layers_zero", {**base, "layers": 0}, good, ["\"layers\"", ">= 1", "got 0"]),
        ("stack_layers_float", {**base, "layers": 1.5}, good, ["\"layers\"", "integer"]),
        ("stack_bad_pool", {**base, "pool": "global"}, good, ["\"pool\"", "\"samoe_output\"", "global"]),
        ("stack_members_for_tied", {**tied, "pool_members": 2}, tied_in,
         ["pool_members", "does not apply", "\"tied\"", "samoe_weight"]),
        ("stack_temperature_for_per_layer", {**plain, "temperature": 2.0}, plain_in,
         ["temperature", "does not apply", "\"per_layer\""]),
        ("stack_top_members_for_tied", {**tied, "pool_top_members": 1}, tied_in, ["pool_top_members", "does not apply"]),
        ("stack_missing_members", without_key(base, "pool_members"), good, ["missing required key", "pool_members"]),
        ("stack_members_zero", {**base, "pool_members": 0}, good, ["pool_members", ">= 1", "got 0"]),
        ("stack_temperature_zero", {**base, "temperature": 0}, good, ["temperature", "> 0"]),
        ("stack_temperature_string", {**base, "temperature": "1"}, good, ["temperature", "finite number"]),
        ("stack_top_members_above", {**base, "pool_top_members": 3}, good,
         ["pool_top_members", "[0, pool_members = 2]", "got 3"]),
        ("stack_top_members_negative", {**base, "pool_top_members": -1}, good, ["pool_top_members", ">= 0", "-1"]),
        ("stack_mix_bias_without_residual", {**plain, "residual_mix_bias": False}, plain_in,
         ["residual_mix_bias", "residual_expert_size"]),
        ("stack_residual_negative", {**base, "residual_expert_size": -1}, good, ["residual_expert_size", ">= 0", "-1"]),
        ("stack_shared_float", {**base, "shared_experts": 1.5}, good, ["shared_experts", "integer"]),
        ("stack_seed", {**base, "seed": 1}, good, ["\"seed\"", "does not apply to the multi-layer mode"]),
        ("stack_n_groups", {**base, "n_groups": 1}, good, ["\"n_groups\"", "does not apply to the multi-layer mode"]),
        ("stack_unknown_key", {**base, "pool_size": 2}, good, ["unknown key", "pool_size", "multi-layer"]),
        ("stack_unknown_coef", {**base, "coef": {"balance": 1}}, good, ["unknown key", "balance"]),
        ("stack_renormalize_sigmoid", {**base, "router": "sigmoid_topk", "renormalize": True}, good,
         ["renormalize", "sigmoid_topk"]),
        ("stack_k_above_experts", {**base, "k": 4}, good, ["k must be in [1, experts = 3]", "got 4"]),
        ("stack_capacity_negative", {**base, "capacity_factor": -1}, good, ["capacity_factor", ">= 0"]),
        ("stack_bad_activation", {**base, "activation": "tanh"}, good, ["activation", "tanh"]),
        ("stack_missing_expert_size", without_key(base, "expert_size"), good, ["expert_size", "missing"]),
        ("pool_without_layers", {**single, "pool": "tied"}, single_in, ["\"pool\"", "needs the multi-layer mode"]),
        ("shared_without_layers", {**single, "shared_experts": 1}, single_in,
         ["\"shared_experts\"", "needs the multi-layer mode", "layers"]),
        ("stack_missing_router_layer1", base, with_tensors(good, layers__1__router__weight=None),
         ["layers.1.router.weight", "missing"]),
        ("stack_missing_combine", base, with_tensors(good, layers__0__combine=None), ["layers.0.combine", "missing"]),
        ("stack_missing_shared", base, with_tensors(good, layers__1__shared__w2=None), ["layers.1.shared.w2", "missing"]),
        ("stack_missing_mix_bias", {**base, "residual_mix_bias": True}, good, ["layers.0.residual.mix_bias", "missing"]),
        ("stack_missing_bias", {**base, "bias": True}, good, ["pool.b1", "missing"]),
        ("stack_pool_shape", base, with_tensors(good, pool__w1=np.zeros((1, 3, 4, 2))),
         ["pool.w1", "[2, 3, 4, 2]", "[1, 3, 4, 2]"]),
        ("stack_combine_shape", base, with_tensors(good, layers__0__combine=np.zeros(3)), ["layers.0.combine", "[2]", "[3]"]),
        ("stack_mix_shape", base, with_tensors(good, layers__1__residual__mix=np.zeros((4, 2))),
         ["layers.1.residual.mix", "[2, 4]", "[4, 2]"]),
        ("stack_shared_shape", base, with_tensors(good, layers__0__shared__w1=np.zeros((2, 4, 2))),
         ["layers.0.shared.w1", "[1, 4, 2]", "[2, 4, 2]"]),
        ("stack_unexpected_layer", base, with_tensors(good, layers__2__router__weight=np.zeros((3, 4))),
         ["unexpected tensor 'layers.2.router.weight'"]),
        ("stack_single_layer_name", base, with_tensors(good, router__weight=np.zeros((3, 4))),
         ["unexpected tensor 'router.weight'"]),
        ("stack_tied_name_for_samoe", base, with_tensors(good, experts__w1=np.zeros((3, 4, 2))),
         ["unexpected tensor 'experts.w1'"]),
        ("stack_layer_experts_for_tied", tied, with_tensors(tied_in, layers__0__experts__w1=np.zeros((3, 4, 2))),
         ["unexpected tensor 'layers.0.experts.w1'"]),
        ("stack_residual_without_key", plain, with_tensors(plain_in, layers__0__residual__mix=np.zeros((2, 4))),
         ["unexpected tensor 'layers.0.residual.mix'"]),
        ("stack_combine_for_per_layer", plain, with_tensors(plain_in, layers__0__combine=np.zeros(2)),
         ["unexpected tensor 'layers.0.combine'"]),
        ("stack_wrong_dtype", base, with_tensors(good, pool__w2=good["pool.w2"].astype(np.float32)),
         ["pool.w2", "F64", "F32"]),
        ("stack_wrong_x_width", base, with_tensors(good, x=np.zeros((5, 3))), ["'x'", "[5, 3]"]),
        ("stack_wrong_dy_shape", base, with_tensors(good, dy=np.zeros((4, 4))), ["'dy'", "[4, 4]"]),
        ("stack_non_finite", base, with_tensors(good, pool__w1=nan_pool), ["pool.w1", "not finite"]),
    ]
    failures = []
    for name, spec, t, needles in bad:
        proc, out_path = run_eval(smoe_eval, workdir, "error_" + name, spec, t)
        check_error_case(name, proc, out_path, needles, failures)
    return failures


def cuda_cases(all_cases):
    """Every case (single layers of every router, and stacks) again with "backend": "cuda"."""
    out = []
    for case in all_cases:
        out.append({**case, "name": case["name"] + "_cuda", "spec": {**case["spec"], "backend": "cuda"}})
    if not out:
        raise SystemExit("no case for the cuda backend")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("smoe_eval")
    parser.add_argument("--keep", help="write the case files here and keep them")
    parser.add_argument("--backend", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: every case the CUDA backend supports, with \"backend\": \"cuda\" "
                             "(the error cases stay with the cpu run)")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep or tmp
        os.makedirs(workdir, exist_ok=True)
        failures = []
        print(f"err = max|smoe - torch| / max(1, max|torch|) per tensor; tolerance {TOLERANCE}")
        all_cases = cases() + stack_cases()
        if args.backend == "cuda":
            all_cases = cuda_cases(all_cases)
        for case in all_cases:
            check = check_stack_case if "layers" in case["spec"] else check_case
            case_failures, errors = check(args.smoe_eval, workdir, case)
            failures += case_failures
            dtype = case["spec"].get("dtype", "float32")
            worst = max(errors.items(), key=lambda kv: kv[1]) if errors else ("-", 0.0)
            status = "ok " if not case_failures else "BAD"
            detail = "" if "layers" in case["spec"] else " ".join(f"{k}={v:.1e}" for k, v in errors.items())
            print(f"{status} {case['name']:34s} {dtype:7s} T={case['tokens']:<3d} max err {worst[1]:.2e} "
                  f"({worst[0]})  " + (detail or f"{len(errors)} tensors"))
        if args.backend == "cpu":
            print("error cases:")
            failures += check_errors(args.smoe_eval, workdir)
            print("multi-layer mode:")
            failures += check_one_layer_stack(args.smoe_eval, workdir)
            failures += check_tied_equals_samoe(args.smoe_eval, workdir)
            failures += check_stack_errors(args.smoe_eval, workdir)
    if failures:
        print(f"\n{len(failures)} FAILURES:")
        for f in failures:
            print("  " + f)
        return 1
    print("\nall smoe_eval outputs match the torch oracle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
