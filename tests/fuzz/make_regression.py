"""Writes tests/fuzz/regression/<harness>/<name>: the reproducers of issue 12's defects, in each
harness's input format. scripts/fuzz.sh runs every file once (CI, ctest fuzz_regression_*).

    python3 tests/fuzz/make_regression.py
"""
import json
import os
import struct

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "regression")
DEEP = "[" * 100000 + "]" * 100000


def safetensors(header_text, data=b"", length=None):
    text = header_text.encode("utf-8") if isinstance(header_text, str) else header_text
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def f64_file(tensors):
    """A valid safetensors file of F64 zeros: tensors is [(name, shape)]."""
    header, offset = {}, 0
    for name, shape in tensors:
        n = 8
        for d in shape:
            n *= d
        header[name] = {"dtype": "F64", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    return safetensors(json.dumps(header, separators=(",", ":")), b"\0" * offset)


def entry(shape="[1]", offsets="[0,4]", dtype='"F32"'):
    return '{"a":{"dtype":%s,"shape":%s,"data_offsets":%s}}' % (dtype, shape, offsets)


def main():
    header_cases = {
        "deep_shape": safetensors(entry(shape=DEEP)),
        "deep_data_offsets": safetensors(entry(offsets=DEEP)),
        "number_overflow": safetensors('{"a":1e400}'),
        "negative_overflow_offsets": safetensors(entry(offsets="[-1e400,0]")),
        "nul_in_header": safetensors(entry(shape="[1]", offsets="[0,4]").encode() + b'\0,"b":{}} garbage', b"\0" * 4),
        "header_length_past_cap": safetensors("{}", length=1 << 40),
        "shape_of_100k_zeros": safetensors(entry(shape="[" + ",".join(["0"] * 100000) + "]", offsets="[0,0]")),
        "shape_of_80k_objects": safetensors(entry(shape="[" + ",".join(["{}"] * 80000) + "]")),
        "empty_name": safetensors('{"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\1"),
        "bool_byte_2": safetensors('{"m":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}}', b"\1\2"),
        "f64_1e300": safetensors('{"a":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}}', struct.pack("<d", 1e300)),
        "i64_2p62_plus_1": safetensors('{"a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}',
                                       struct.pack("<q", (1 << 62) + 1)),
        "f16_nan_payload": safetensors('{"h":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}', b"\x01\x7d\x01\xfe"),
    }
    for harness in ("safetensors", "checkpoint"):
        os.makedirs(os.path.join(HERE, harness), exist_ok=True)
        for name, data in header_cases.items():
            if harness == "checkpoint" and name.startswith(("f64", "i64", "f16", "shape_of", "deep_data")):
                continue
            with open(os.path.join(HERE, harness, name), "wb") as f:
                f.write(data)

    base = {"d_model": 4, "n_experts": 3, "expert_size": 2, "k": 2, "router": "softmax_topk", "activation": "relu",
            "dtype": "float64"}
    good_in = f64_file([("x", (5, 4)), ("router.weight", (3, 4)), ("experts.w1", (3, 4, 2)),
                        ("experts.w2", (3, 2, 4))])

    def spliced(key, raw):
        return json.dumps({**base, key: "@@"}).replace('"@@"', raw)

    spec_cases = {
        "deep_d_model": spliced("d_model", DEEP),
        "deep_activation": spliced("activation", DEEP),
        "number_overflow": spliced("d_model", "1e400"),
        "negative_overflow_coef": spliced("coef", '{"z":-1e400}'),
        "n_experts_2p62": json.dumps({**base, "n_experts": 2**62}),
        "d_model_n_experts_2p32": json.dumps({**base, "n_experts": 2**32, "d_model": 2**32}),
        "shared_experts_max": json.dumps({**base, "layers": 1, "shared_experts": 2**63 - 1}),
        "objects_160k": spliced("coef", "[" + ",".join(["{}"] * 160000) + "]"),
    }
    os.makedirs(os.path.join(HERE, "smoe_eval"), exist_ok=True)
    for name, text in spec_cases.items():
        with open(os.path.join(HERE, "smoe_eval", name), "wb") as f:
            f.write(text.encode() + b"\0" + good_in)


if __name__ == "__main__":
    main()
