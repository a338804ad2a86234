"""smoe_eval on hostile SPECs (issue 12's reproducers): each must exit with status 1, write no OUT,
and print one short line naming the problem; none may crash, hang or allocate what IN cannot back.

    python3 tests/smoe_eval_hostile.py path/to/smoe_eval
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "oracle"))
import safetensors_lite  # noqa: E402

BASE = {"d_model": 4, "n_experts": 3, "expert_size": 2, "k": 2, "router": "softmax_topk", "activation": "relu",
        "dtype": "float64"}


def inputs():
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((5, 4)), "router.weight": rng.standard_normal((3, 4)),
            "experts.w1": rng.standard_normal((3, 4, 2)), "experts.w2": rng.standard_normal((3, 2, 4))}


def spliced(key, raw):
    """BASE as JSON text with `key` set to the raw JSON text `raw` (which json.dumps could not write)."""
    spec = {**BASE, key: "@@"}
    return json.dumps(spec).replace('"@@"', raw)


def main(smoe_eval):
    deep = "[" * 100000 + "]" * 100000
    cases = [
        ("deep d_model", spliced("d_model", deep), ["nest deeper than 8"]),
        ("deep activation", spliced("activation", deep), ["nest deeper than 8"]),
        ("1e400", spliced("d_model", "1e400"), ["not valid JSON at byte", "number overflow"]),
        ("-1e400 coef", spliced("coef", '{"z": -1e400}'), ["not valid JSON at byte", "number overflow"]),
        ("NUL", json.dumps(BASE)[:-1] + ', "a\u0000": 1}', ["NUL"]),
        ("n_experts 2^62", json.dumps({**BASE, "n_experts": 2**62}), ['n_experts (4611686018427387904)',
                                                                      "experts.w1", "IN's data buffer"]),
        ("d_model = n_experts = 2^32", json.dumps({**BASE, "n_experts": 2**32, "d_model": 2**32}),
         ["n_experts (4294967296) × d_model (4294967296)", "experts.w1"]),
        ("expert_size 2^40", json.dumps({**BASE, "expert_size": 2**40}), ["expert_size (1099511627776)"]),
        ("shared_experts 2^63-1", json.dumps({**BASE, "layers": 1, "shared_experts": 2**63 - 1}),
         ["shared_experts (9223372036854775807)", "shared experts"]),
        ("layers 2^62", json.dumps({**BASE, "layers": 2**62}), ["layers (4611686018427387904)"]),
        ("160k {}", spliced("coef", "[" + ",".join(["{}"] * 160000) + "]"),
         ['"coef" must be an object, got an array of 160000 elements']),
        ("2 MB SPEC", json.dumps({**BASE, "pad": "x" * (2 << 20)}), ["larger than 1048576 bytes"]),
        ("long unknown key", json.dumps({**BASE, "k" * 100000: 1}), ["unknown key", "(100000 bytes)"]),
        ("duplicate key", json.dumps(BASE)[:-1] + ', "k": 1}', ['"k"', "more than once"]),
    ]
    failures = []
    with tempfile.TemporaryDirectory() as work:
        in_path = os.path.join(work, "in.safetensors")
        safetensors_lite.save(in_path, inputs())
        out_path = os.path.join(work, "out.safetensors")
        spec_path = os.path.join(work, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(BASE, f)
        good = subprocess.run([smoe_eval, spec_path, in_path, out_path], capture_output=True, text=True)
        if good.returncode != 0:
            failures.append(f"the valid SPEC fails: {good.stderr.strip()}")
        for name, text, needles in cases:
            with open(spec_path, "w", encoding="utf-8") as f:
                f.write(text)
            if os.path.exists(out_path):
                os.remove(out_path)
            start = time.monotonic()
            proc = subprocess.run([smoe_eval, spec_path, in_path, out_path], capture_output=True, text=True,
                                  timeout=60)
            seconds = time.monotonic() - start
            message = proc.stderr.strip()
            problem = None
            if proc.returncode != 1:
                problem = f"exit {proc.returncode} (expected 1)"
            elif os.path.exists(out_path):
                problem = "OUT was written"
            elif "unexpected failure" in message:
                problem = "not a smoe::error"
            elif len(message) > 600:
                problem = f"message of {len(message)} bytes (unbounded value printed?)"
            elif seconds > 20:
                problem = f"took {seconds:.1f} s"
            else:
                missing = [n for n in needles if n not in message]
                if missing:
                    problem = f"message lacks {missing}"
            print(f"  {'BAD' if problem else 'ok '} {name:28s} {seconds:5.2f} s  {message[:200]}")
            if problem:
                failures.append(f"{name}: {problem}; stderr: {message[:600]}")
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
