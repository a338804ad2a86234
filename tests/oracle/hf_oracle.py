"""Checks `smoe_eval hf MODEL_DIR IN OUT [--layer L]` and `generate` against a PyTorch reference of the
Hugging Face MoE blocks and decoder models, written from the transformers 4.57 semantics (docs/hf.md,
issue 14), not from smoe:

    hf_oracle.py SMOE_EVAL [--generate GENERATE] [--keep DIR]

For each family (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3 twice, gpt_oss) it builds a tiny
random checkpoint in the exact on-disk layout (HF tensor names, [out, in] Linear weights, GPT-OSS's
[in, out] interleaved gate_up_proj; float32, bfloat16 and float16 files, one checkpoint sharded
through model.safetensors.index.json), runs the tool on random x, and compares
    y, routing.gates:   max|a - b| / max(1, max|b|) <= 1e-4   (reference in float64 on the stored,
                        dtype-rounded weights; smoe computes in float32)
    routing.experts:    exactly (best first).
Inputs are redrawn while a routing decision (top-k boundary, DeepSeek's kept-group boundary) or a
GPT-OSS clamp is closer to its kink than 1e-3, so both sides cannot legitimately differ. Then every
bad input must exit with status 1, print a message naming the problem, and leave no OUT.
Exit code 77 (a ctest skip) when torch is not importable.
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib

try:
    import numpy as np
    import torch
except ImportError as e:  # pragma: no cover - depends on the machine
    print(f"SKIP: torch/numpy not importable with {sys.executable}: {e}")
    sys.exit(77)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_lite  # noqa: E402

TOL = 1e-4
MARGIN = 1e-3

# ---------------------------------------------------------------------------------------------
# safetensors with BF16 (safetensors_lite has no bfloat16: numpy lacks it)

_DT = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int32: "I32"}


def save_torch(path, tensors):
    """Writes name -> torch tensor (F32/BF16/F16) with metadata {"format": "pt"}, as save_pretrained."""
    header = {"__metadata__": {"format": "pt"}}
    chunks, offset = [], 0
    for name, t in tensors.items():
        t = t.contiguous()
        raw = t.view(torch.int16).numpy().astype("<i2").tobytes() if t.dtype == torch.bfloat16 else \
            t.numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": _DT[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))


# ---------------------------------------------------------------------------------------------
# The families: configs and checkpoints


def rand(gen, *shape, std=0.5):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * std


def swiglu_tensors(gen, prefix, H, I, names):
    g, u, d = names
    return {f"{prefix}{g}.weight": rand(gen, I, H), f"{prefix}{u}.weight": rand(gen, I, H),
            f"{prefix}{d}.weight": rand(gen, H, I)}


def build(family, seed):
    """(config dict, tensors name -> float64 tensor) of a tiny random model of `family`."""
    gen = torch.Generator().manual_seed(seed)
    H, L = 16, 3
    cfg = {"model_type": family, "hidden_size": H, "num_hidden_layers": L, "num_attention_heads": 4,
           "vocab_size": 32}
    t = {}
    for i in range(L):
        t[f"model.layers.{i}.input_layernorm.weight"] = 1 + rand(gen, H, std=0.1)
        t[f"model.layers.{i}.post_attention_layernorm.weight"] = 1 + rand(gen, H, std=0.1)
    if family == "mixtral":
        E, I = 6, 5
        cfg.update(num_local_experts=E, num_experts_per_tok=2, intermediate_size=I)
        for i in range(L):
            p = f"model.layers.{i}.block_sparse_moe."
            t[p + "gate.weight"] = rand(gen, E, H)
            for j in range(E):
                t.update(swiglu_tensors(gen, f"{p}experts.{j}.", H, I, ("w1", "w3", "w2")))
    elif family in ("qwen2_moe", "qwen3_moe", "olmoe"):
        E, I = 8, 5
        cfg.update(num_experts=E, num_experts_per_tok=3)
        if family == "olmoe":
            cfg.update(intermediate_size=I)
        else:
            cfg.update(moe_intermediate_size=I, intermediate_size=12, decoder_sparse_step=1 if family == "qwen3_moe" else 2)
        if family == "qwen3_moe":
            cfg.update(norm_topk_prob=True, mlp_only_layers=[0])
        if family == "qwen2_moe":
            cfg.update(shared_expert_intermediate_size=7)
        for i in range(L):
            p = f"model.layers.{i}.mlp."
            if not sparse(cfg, i):
                t.update(swiglu_tensors(gen, p, H, 12, ("gate_proj", "up_proj", "down_proj")))
                continue
            t[p + "gate.weight"] = rand(gen, E, H)
            for j in range(E):
                t.update(swiglu_tensors(gen, f"{p}experts.{j}.", H, I, ("gate_proj", "up_proj", "down_proj")))
            if family == "qwen2_moe":
                t.update(swiglu_tensors(gen, p + "shared_expert.", H, 7, ("gate_proj", "up_proj", "down_proj")))
                t[p + "shared_expert_gate.weight"] = rand(gen, 1, H)
    elif family.startswith("deepseek_v3"):
        E, I = 8, 4
        cfg.update(model_type="deepseek_v3", n_routed_experts=E, num_experts_per_tok=3, moe_intermediate_size=I,
                   intermediate_size=10, n_group=4, topk_group=2, n_shared_experts=2, routed_scaling_factor=2.5,
                   first_k_dense_replace=1, norm_topk_prob=family == "deepseek_v3")
        for i in range(L):
            p = f"model.layers.{i}.mlp."
            if i < 1:
                t.update(swiglu_tensors(gen, p, H, 10, ("gate_proj", "up_proj", "down_proj")))
                continue
            t[p + "gate.weight"] = rand(gen, E, H)
            # Negative biases of about -1: masking dropped groups with 0.0 (transformers <= 5.5) would differ.
            t[p + "gate.e_score_correction_bias"] = -1 + rand(gen, E, std=0.3)
            for j in range(E):
                t.update(swiglu_tensors(gen, f"{p}experts.{j}.", H, I, ("gate_proj", "up_proj", "down_proj")))
            t.update(swiglu_tensors(gen, p + "shared_experts.", H, I * 2, ("gate_proj", "up_proj", "down_proj")))
    elif family == "gpt_oss":
        E, I = 8, 6
        cfg.update(num_local_experts=E, num_experts_per_tok=2, intermediate_size=I, head_dim=4)
        for i in range(L):
            p = f"model.layers.{i}.mlp."
            t[p + "router.weight"] = rand(gen, E, H)
            t[p + "router.bias"] = rand(gen, E)
            # Large enough that some gate/up pre-activations pass the clamps at ±7.
            t[p + "experts.gate_up_proj"] = rand(gen, E, H, 2 * I, std=1.5)
            t[p + "experts.gate_up_proj_bias"] = rand(gen, E, 2 * I)
            t[p + "experts.down_proj"] = rand(gen, E, I, H, std=0.3)
            t[p + "experts.down_proj_bias"] = rand(gen, E, H)
    if cfg["model_type"] in WHOLE_MODEL_TYPES:
        add_decoder_tensors(gen, cfg, t)
    return cfg, t


WHOLE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def add_decoder_tensors(gen, cfg, t):
    """The attention, embedding, final norm and head of a whole decoder model, with each family's options:
    GQA everywhere; mixtral a tied head; qwen2_moe q/k/v biases; qwen3_moe per-head q/k norms and
    head_dim != hidden / heads; olmoe whole q/k norms and clip_qkv."""
    mt, H, L, V, nh = cfg["model_type"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], 4
    nkv = 2
    dh = 6 if mt == "qwen3_moe" else H // nh
    cfg.update(num_key_value_heads=nkv, rope_theta=500.0, rms_norm_eps=1e-5)
    if mt == "qwen3_moe":
        cfg.update(head_dim=dh)
    if mt == "mixtral":
        cfg.update(tie_word_embeddings=True)
    if mt == "olmoe":
        cfg.update(clip_qkv=1.5)
    if mt == "qwen2_moe":
        cfg.update(qkv_bias=True)
    t["model.embed_tokens.weight"] = rand(gen, V, H, std=1.0)
    t["model.norm.weight"] = 1 + rand(gen, H, std=0.1)
    if not cfg.get("tie_word_embeddings", False):
        t["lm_head.weight"] = rand(gen, V, H, std=0.3)
    for i in range(L):
        p = f"model.layers.{i}.self_attn."
        t[p + "q_proj.weight"] = rand(gen, nh * dh, H, std=0.4)
        t[p + "k_proj.weight"] = rand(gen, nkv * dh, H, std=0.4)
        t[p + "v_proj.weight"] = rand(gen, nkv * dh, H, std=0.4)
        t[p + "o_proj.weight"] = rand(gen, H, nh * dh, std=0.4)
        if mt == "qwen2_moe":
            for n, w in (("q", nh), ("k", nkv), ("v", nkv)):
                t[p + f"{n}_proj.bias"] = rand(gen, w * dh, std=0.3)
        if mt == "qwen3_moe":
            t[p + "q_norm.weight"] = 1 + rand(gen, dh, std=0.2)
            t[p + "k_norm.weight"] = 1 + rand(gen, dh, std=0.2)
        if mt == "olmoe":
            t[p + "q_norm.weight"] = 1 + rand(gen, nh * dh, std=0.2)
            t[p + "k_norm.weight"] = 1 + rand(gen, nkv * dh, std=0.2)


def sparse(cfg, i):
    mt = cfg["model_type"]
    if mt in ("qwen2_moe", "qwen3_moe"):
        return (i + 1) % cfg.get("decoder_sparse_step", 1) == 0 and i not in (cfg.get("mlp_only_layers") or [])
    if mt == "deepseek_v3":
        return i >= cfg.get("first_k_dense_replace", 3)
    return True


def write_checkpoint(directory, cfg, tensors, dtype_of, shards=1):
    """Rounds every tensor to its stored dtype (dtype_of(name)), writes config.json and the files;
    returns the float64 values smoe will read."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    stored, rounded = {}, {}
    for name, v in tensors.items():
        s = v.to(dtype_of(name))
        stored[name] = s
        rounded[name] = s.to(torch.float64)
    names = list(stored)
    if shards == 1:
        save_torch(os.path.join(directory, "model.safetensors"), stored)
    else:
        weight_map = {}
        for k in range(shards):
            part = names[k::shards]
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_torch(os.path.join(directory, fname), {n: stored[n] for n in part})
            weight_map.update({n: fname for n in part})
        total = sum(v.numel() * v.element_size() for v in stored.values())
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return rounded


# ---------------------------------------------------------------------------------------------
# The reference (float64), from the transformers semantics


def silu(v):
    return v * torch.sigmoid(v)


def swiglu(x, w, prefix, names):
    g, u, d = names
    return (silu(x @ w[f"{prefix}{g}.weight"].T) * (x @ w[f"{prefix}{u}.weight"].T)) @ w[f"{prefix}{d}.weight"].T


def topk_margin(scores, k):
    """Smallest gap between the k-th and (k+1)-th score of any row (inf when k = E)."""
    if k >= scores.shape[-1]:
        return float("inf")
    v = scores.sort(dim=-1, descending=True).values
    return float((v[:, k - 1] - v[:, k]).min())


def reference(cfg, w, layer, x):
    """(y, experts, gates, margin) of layer `layer`'s sparse MoE block on x [T, H]."""
    mt = cfg["model_type"]
    k = cfg["num_experts_per_tok"]
    T = x.shape[0]
    if mt == "gpt_oss":
        p = f"model.layers.{layer}.mlp."
        logits = x @ w[p + "router.weight"].T + w[p + "router.bias"]
        vals, idx = torch.topk(logits, k, dim=-1)
        gates = torch.softmax(vals, dim=-1)
        margin = topk_margin(logits, k)
        y = torch.zeros_like(x)
        gu, gub = w[p + "experts.gate_up_proj"], w[p + "experts.gate_up_proj_bias"]
        dp, dpb = w[p + "experts.down_proj"], w[p + "experts.down_proj_bias"]
        for t in range(T):
            for j in range(k):
                e = int(idx[t, j])
                h = x[t] @ gu[e] + gub[e]
                gate, up = h[0::2], h[1::2]
                margin = min(margin, float((gate - 7).abs().min()), float((up.abs() - 7).abs().min()))
                gate = gate.clamp(max=7.0)
                up = up.clamp(min=-7.0, max=7.0)
                glu = gate * torch.sigmoid(1.702 * gate)
                y[t] += gates[t, j] * (((up + 1) * glu) @ dp[e] + dpb[e])
        return y, idx, gates, margin
    if mt == "deepseek_v3":
        p = f"model.layers.{layer}.mlp."
        E, G, KG = cfg["n_routed_experts"], cfg["n_group"], cfg["topk_group"]
        s = torch.sigmoid(x @ w[p + "gate.weight"].T)
        sc = s + w[p + "gate.e_score_correction_bias"]
        group_scores = sc.view(T, G, E // G).topk(2, dim=-1).values.sum(-1)
        margin = topk_margin(group_scores, KG)
        gidx = torch.topk(group_scores, KG, dim=-1).indices
        gmask = torch.zeros_like(group_scores).scatter_(1, gidx, 1)
        smask = gmask.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
        masked = sc.masked_fill(smask == 0, float("-inf"))  # DeepSeek's own code (and transformers >= 5.6)
        idx = torch.topk(masked, k, dim=-1).indices
        finite = masked.clone()
        margin = min(margin, topk_margin(finite, k))
        wts = s.gather(1, idx)
        if cfg.get("norm_topk_prob", True):
            wts = wts / (wts.sum(-1, keepdim=True) + 1e-20)
        wts = wts * cfg["routed_scaling_factor"]
        y = torch.zeros_like(x)
        for t in range(T):
            for j in range(k):
                y[t] += wts[t, j] * swiglu(x[t:t + 1], w, f"{p}experts.{int(idx[t, j])}.",
                                           ("gate_proj", "up_proj", "down_proj"))[0]
        y = y + swiglu(x, w, p + "shared_experts.", ("gate_proj", "up_proj", "down_proj"))
        return y, idx, wts, margin
    # Softmax routers: softmax over all experts (float32 in HF; float64 here), top-k, optional renorm.
    mixtral = mt == "mixtral"
    p = f"model.layers.{layer}." + ("block_sparse_moe." if mixtral else "mlp.")
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    probs = torch.softmax(x @ w[p + "gate.weight"].T, dim=-1)
    wts, idx = torch.topk(probs, k, dim=-1)
    margin = topk_margin(probs, k)
    if mixtral or cfg.get("norm_topk_prob", False):
        wts = wts / wts.sum(-1, keepdim=True)
    y = torch.zeros_like(x)
    for t in range(T):
        for j in range(k):
            y[t] += wts[t, j] * swiglu(x[t:t + 1], w, f"{p}experts.{int(idx[t, j])}.", names)[0]
    if mt == "qwen2_moe":
        y = y + torch.sigmoid(x @ w[p + "shared_expert_gate.weight"].T) * swiglu(
            x, w, p + "shared_expert.", ("gate_proj", "up_proj", "down_proj"))
    return y, idx, wts, margin


def rms_norm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def rotate(x, theta):
    """rotate_half RoPE of x [S, heads, dh] at positions 0 … S−1."""
    S, dh = x.shape[0], x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    freqs = torch.arange(S, dtype=torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    rotated = torch.cat((-x[..., dh // 2:], x[..., :dh // 2]), dim=-1)
    return x * cos + rotated * sin


def attention(cfg, w, layer, x):
    """Layer `layer`'s self-attention of one sequence x [S, H] (eager transformers attention)."""
    mt, eps = cfg["model_type"], cfg["rms_norm_eps"]
    S, nh, nkv = x.shape[0], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    dh = cfg.get("head_dim") or cfg["hidden_size"] // nh
    p = f"model.layers.{layer}.self_attn."

    def proj(n):
        y = x @ w[p + f"{n}_proj.weight"].T
        return y + w[p + f"{n}_proj.bias"] if p + f"{n}_proj.bias" in w else y

    q, k, v = proj("q"), proj("k"), proj("v")
    if mt == "olmoe":  # norms over all heads, then the clamp
        q, k = rms_norm(q, w[p + "q_norm.weight"], eps), rms_norm(k, w[p + "k_norm.weight"], eps)
        if cfg.get("clip_qkv"):
            c = cfg["clip_qkv"]
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
    q, k, v = q.view(S, nh, dh), k.view(S, nkv, dh), v.view(S, nkv, dh)
    if mt == "qwen3_moe":  # per-head norms
        q, k = rms_norm(q, w[p + "q_norm.weight"], eps), rms_norm(k, w[p + "k_norm.weight"], eps)
    q, k = rotate(q, cfg["rope_theta"]), rotate(k, cfg["rope_theta"])
    rep = nh // nkv
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # repeat_kv
    scores = torch.einsum("qhd,khd->hqk", q, k) / dh ** 0.5
    scores = scores.masked_fill(torch.triu(torch.ones(S, S, dtype=torch.bool), 1), float("-inf"))
    o = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v).reshape(S, nh * dh)
    return o @ w[p + "o_proj.weight"].T


def lm_reference(cfg, w, ids):
    """(logits [B, S, V], the smallest routing margin) of the causal LM on ids [B, S]."""
    eps, margin, out = cfg["rms_norm_eps"], float("inf"), []
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    for seq in ids:
        h = w["model.embed_tokens.weight"][seq]
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = h + attention(cfg, w, i, rms_norm(h, w[p + "input_layernorm.weight"], eps))
            m = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
            if sparse(cfg, i):
                y, _, _, mg = reference(cfg, w, i, m)
                margin = min(margin, mg)
            else:
                y = swiglu(m, w, p + "mlp.", ("gate_proj", "up_proj", "down_proj"))
            h = h + y
        out.append(rms_norm(h, w["model.norm.weight"], eps) @ head.T)
    return torch.stack(out), margin


# ---------------------------------------------------------------------------------------------


def err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def run_tool(tool, model, inp, out, *extra):
    return subprocess.run([tool, "hf", model, inp, out, *extra], capture_output=True, text=True, timeout=120)


CASES = [
    # (name, family, stored dtype of each tensor, shards, layers checked)
    ("mixtral_f32", "mixtral", lambda n: torch.float32, 1, [0, 2]),
    ("qwen2_moe_bf16", "qwen2_moe", lambda n: torch.bfloat16, 1, [1]),
    ("qwen3_moe_sharded_mixed", "qwen3_moe",
     lambda n: torch.bfloat16 if "experts.1." in n or "experts.3." in n else torch.float32, 3, [1, 2]),
    ("olmoe_bf16_f16", "olmoe", lambda n: torch.float16 if n.endswith("gate.weight") else torch.bfloat16, 1, [1]),
    ("deepseek_v3_f32", "deepseek_v3", lambda n: torch.float32, 1, [1, 2]),
    ("deepseek_v3_unnormalized_bf16", "deepseek_v3_unnormalized", lambda n: torch.bfloat16, 2, [2]),
    ("gpt_oss_f32", "gpt_oss", lambda n: torch.float32, 1, [0, 1]),
]


def check_family(tool, root, name, family, dtype_of, shards, layers, failures):
    cfg, tensors = build(family, seed=zlib.crc32(name.encode()) % 1000)
    model = os.path.join(root, name)
    w = write_checkpoint(model, cfg, tensors, dtype_of, shards)
    H = cfg["hidden_size"]
    for layer in layers:
        for attempt in range(50):
            gen = torch.Generator().manual_seed(1000 * layer + attempt)
            x = (torch.randn(9, H, generator=gen, dtype=torch.float64)).to(torch.float32)
            y, idx, gates, margin = reference(cfg, w, layer, x.to(torch.float64))
            if margin > MARGIN:
                break
        else:
            failures.append(f"{name} layer {layer}: no input away from the kinks in 50 draws")
            continue
        inp, out = os.path.join(model, f"in{layer}.safetensors"), os.path.join(model, f"out{layer}.safetensors")
        safetensors_lite.save(inp, {"x": x.numpy()})
        r = run_tool(tool, model, inp, out, "--layer", str(layer))
        if r.returncode != 0:
            failures.append(f"{name} layer {layer}: exit {r.returncode}: {r.stderr.strip()}")
            continue
        got, _ = safetensors_lite.load(out)
        e_y, e_g = err(got["y"], y.numpy()), err(got["routing.gates"], gates.numpy())
        same = got["routing.experts"].dtype == np.int32 and np.array_equal(got["routing.experts"], idx.numpy())
        status = "ok" if e_y <= TOL and e_g <= TOL and same else "FAIL"
        print(f"{status} {name} layer {layer}: err(y) = {e_y:.2e}, err(gates) = {e_g:.2e}, experts equal: {same}")
        if status != "ok":
            failures.append(f"{name} layer {layer}")


LM_CASES = [
    # (name, family, stored dtype of each tensor, shards)
    ("lm_mixtral_f32", "mixtral", lambda n: torch.float32, 1),
    ("lm_qwen2_moe_bf16", "qwen2_moe", lambda n: torch.bfloat16, 1),
    ("lm_qwen3_moe_sharded_mixed", "qwen3_moe", lambda n: torch.bfloat16 if "self_attn" in n else torch.float32, 2),
    ("lm_olmoe_f32", "olmoe", lambda n: torch.float32, 1),
]


def check_lm(tool, generate, root, name, family, dtype_of, shards, failures):
    """Whole-model logits of `smoe_eval hf` (no --layer), then greedy generation with the KV cache."""
    cfg, tensors = build(family, seed=zlib.crc32(name.encode()) % 1000)
    model = os.path.join(root, name)
    w = write_checkpoint(model, cfg, tensors, dtype_of, shards)
    B, S, V = 2, 7, cfg["vocab_size"]
    for attempt in range(50):
        ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(attempt))
        logits, margin = lm_reference(cfg, w, ids)
        if margin > MARGIN:
            break
    else:
        failures.append(f"{name}: no input_ids away from the routing kinks in 50 draws")
        return
    inp, out = os.path.join(model, "ids.safetensors"), os.path.join(model, "logits.safetensors")
    safetensors_lite.save(inp, {"input_ids": ids.numpy().astype(np.int64)})
    r = run_tool(tool, model, inp, out)
    if r.returncode != 0:
        failures.append(f"{name}: exit {r.returncode}: {r.stderr.strip()}")
        return
    got, _ = safetensors_lite.load(out)
    e = err(got["logits"], logits.numpy())
    status = "ok" if e <= TOL and got["logits"].dtype == np.float32 else "FAIL"
    print(f"{status} {name} logits [{B}, {S}, {V}]: err = {e:.2e}")
    if status != "ok":
        failures.append(f"{name} logits")
    if generate:
        check_generation(generate, model, name, cfg, w, failures)


def greedy_reference(cfg, w, prompt, n_new):
    """Greedy continuation by full recomputation at every step, or None when a step's top-2 logits or
    a routing decision are too close to call."""
    seq = list(prompt)
    for _ in range(n_new):
        logits, margin = lm_reference(cfg, w, torch.tensor([seq]))
        top2 = logits[0, -1].topk(2).values
        if margin <= MARGIN or float(top2[0] - top2[1]) <= MARGIN:
            return None
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


def run_generate(generate, model, prompt, n_new, *extra):
    r = subprocess.run([generate, model, "--ids", ",".join(map(str, prompt)), "--max-new", str(n_new), *extra],
                       capture_output=True, text=True, timeout=120)
    ids = [int(v) for v in r.stdout.splitlines()[0].split(",")] if r.returncode == 0 and r.stdout else None
    return r, ids


def check_generation(generate, model, name, cfg, w, failures):
    n_new = 6
    for attempt in range(50):
        prompt = torch.randint(0, cfg["vocab_size"], (4,), generator=torch.Generator().manual_seed(100 + attempt)).tolist()
        expected = greedy_reference(cfg, w, prompt, n_new)
        if expected is not None:
            break
    else:
        failures.append(f"{name} generate: no prompt away from the kinks in 50 draws")
        return
    r, got = run_generate(generate, model, prompt, n_new, "--ignore-eos")
    ok = got == expected and "decode: 5 tokens" in r.stdout
    print(f"{'ok' if ok else 'FAIL'} {name} generate (KV cache) {got} vs greedy by full recomputation {expected}")
    if not ok:
        failures.append(f"{name} generate: {r.returncode} {r.stdout!r} {r.stderr!r}, expected {expected}")
        return
    # eos_token_id in config.json ends generation after the first occurrence (kept), as transformers' generate.
    stop = next((i for i in range(1, n_new) if expected[i] not in expected[:i]), None)
    if stop is None:
        return
    path = os.path.join(model, "config.json")
    with open(path) as f:
        original = f.read()
    with open(path, "w") as f:
        json.dump(dict(cfg, eos_token_id=[V_UNUSED, expected[stop]]), f)
    r, got = run_generate(generate, model, prompt, n_new)
    with open(path, "w") as f:
        f.write(original)
    ok = got == expected[:stop + 1]
    print(f"{'ok' if ok else 'FAIL'} {name} generate stops after eos_token_id {expected[stop]}: {got}")
    if not ok:
        failures.append(f"{name} generate with eos: {r.returncode} {r.stdout!r} {r.stderr!r}, expected {expected[:stop + 1]}")


V_UNUSED = 10 ** 6  # an eos id no tiny model produces


def expect_error(tool, failures, what, model, inp, out, extra, needle):
    if os.path.exists(out):
        os.remove(out)
    r = run_tool(tool, model, inp, out, *extra)
    ok = r.returncode == 1 and needle in r.stderr and not os.path.exists(out) and "Sanitizer" not in r.stderr
    print(f"{'ok' if ok else 'FAIL'} bad input: {what}: {r.stderr.strip().splitlines()[0] if r.stderr.strip() else '(no message)'}")
    if not ok:
        failures.append(f"bad input {what}: exit {r.returncode}, stderr {r.stderr!r}, expected {needle!r}")


def check_bad_inputs(tool, generate, root, failures):
    def fresh(name, family, shards=1):
        cfg, tensors = build(family, seed=7)
        d = os.path.join(root, "bad_" + name)
        write_checkpoint(d, cfg, tensors, lambda n: torch.float32, shards)
        return d, cfg

    x_path = os.path.join(root, "x16.safetensors")
    safetensors_lite.save(x_path, {"x": np.zeros((3, 16), np.float32)})
    out = os.path.join(root, "bad_out.safetensors")

    d, cfg = fresh("unknown", "mixtral")
    cfg["model_type"] = "llama"
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    expect_error(tool, failures, "unknown model_type", d, x_path, out, ["--layer", "0"],
                 "unsupported model_type 'llama' (supported: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss)")

    d, _ = fresh("missing", "olmoe")
    tensors, _ = safetensors_lite.load(os.path.join(d, "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    safetensors_lite.save(os.path.join(d, "model.safetensors"), tensors)
    expect_error(tool, failures, "missing tensor", d, x_path, out, ["--layer", "1"],
                 "missing tensor 'model.layers.1.mlp.experts.5.up_proj.weight'")

    d, _ = fresh("shape", "gpt_oss")
    tensors, _ = safetensors_lite.load(os.path.join(d, "model.safetensors"))
    tensors["model.layers.0.mlp.router.bias"] = np.zeros(7, np.float32)
    safetensors_lite.save(os.path.join(d, "model.safetensors"), tensors)
    expect_error(tool, failures, "wrong shape", d, x_path, out, ["--layer", "0"],
                 "tensor 'model.layers.0.mlp.router.bias' must have shape [8], got [7]")

    d, _ = fresh("layers", "deepseek_v3")
    expect_error(tool, failures, "layer out of range", d, x_path, out, ["--layer", "3"],
                 "layer must be in [0, num_hidden_layers = 3), got 3")
    expect_error(tool, failures, "dense layer", d, x_path, out, ["--layer", "0"], "is a dense MLP")
    expect_error(tool, failures, "bad --layer", d, x_path, out, ["--layer", "1x"], "--layer must be a non-negative integer")
    expect_error(tool, failures, "whole deepseek_v3 model", d, x_path, out, [], "whole deepseek_v3 models are not supported")
    d_oss, _ = fresh("whole_gpt_oss", "gpt_oss")
    expect_error(tool, failures, "whole gpt_oss model", d_oss, x_path, out, [], "whole gpt_oss models are not supported")
    # Whole-model inputs: checked before the checkpoint is read (this olmoe directory has no attention tensors).
    d_lm, cfg_lm = fresh("whole_olmoe", "olmoe")
    vocab = cfg_lm.get("vocab_size", 50304)
    ids_path = os.path.join(root, "ids_bad.safetensors")
    safetensors_lite.save(ids_path, {"input_ids": np.array([[0, 1], [2, vocab]], np.int64)})
    expect_error(tool, failures, "token id >= vocab", d_lm, ids_path, out, [],
                 f"input_ids must be in [0, vocab_size = {vocab}), got {vocab} at [1, 1]")
    safetensors_lite.save(ids_path, {"input_ids": np.array([[0, 1]], np.int32)})
    expect_error(tool, failures, "input_ids of dtype I32", d_lm, ids_path, out, [], "input_ids must be I64, got I32")
    safetensors_lite.save(ids_path, {"input_ids": np.array([0, 1], np.int64)})
    expect_error(tool, failures, "input_ids of rank 1", d_lm, ids_path, out, [], "input_ids must have rank 2 [B, S], got rank 1")
    expect_error(tool, failures, "no input_ids", d_lm, x_path, out, [], "input_ids")
    if generate:
        for what, model_dir, ids, needle in (
                ("generate: token id >= vocab", d_lm, f"1,{vocab}", f"token ids must be in [0, vocab_size = {vocab}), got {vocab} at 1"),
                ("generate: whole deepseek_v3 model", d, "1,2", "whole deepseek_v3 models are not supported")):
            r = subprocess.run([generate, model_dir, "--ids", ids], capture_output=True, text=True, timeout=60)
            ok = r.returncode == 1 and needle in r.stderr and not r.stdout
            print(f"{'ok' if ok else 'FAIL'} bad input: {what}: {r.stderr.strip()}")
            if not ok:
                failures.append(f"bad input {what}: exit {r.returncode}, stderr {r.stderr!r}, expected {needle!r}")
    x_bad = os.path.join(root, "x15.safetensors")
    safetensors_lite.save(x_bad, {"x": np.zeros((3, 15), np.float32)})
    expect_error(tool, failures, "x of the wrong width", d, x_bad, out, ["--layer", "1"],
                 "x must have hidden_size = 16 columns, got 15")

    d, _ = fresh("truncated", "mixtral")
    p = os.path.join(d, "model.safetensors")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 10)
    expect_error(tool, failures, "truncated file", d, x_path, out, ["--layer", "0"], "model.safetensors")

    d, _ = fresh("shard_truncated", "qwen3_moe", shards=2)
    p = os.path.join(d, "model-00002-of-00002.safetensors")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)
    expect_error(tool, failures, "truncated shard", d, x_path, out, ["--layer", "1"], "model-00002-of-00002.safetensors")

    d, _ = fresh("shard_missing", "qwen3_moe", shards=2)
    os.remove(os.path.join(d, "model-00001-of-00002.safetensors"))
    expect_error(tool, failures, "index naming a missing shard", d, x_path, out, ["--layer", "1"],
                 "names shard 'model-00001-of-00002.safetensors'")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tool")
    ap.add_argument("--keep", help="keep the checkpoints and files in this directory")
    ap.add_argument("--generate", help="examples/generate: also check greedy generation with the KV cache")
    args = ap.parse_args()
    root = args.keep or tempfile.mkdtemp(prefix="smoe_hf_oracle_")
    if args.keep:
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
    failures = []
    try:
        for case in CASES:
            check_family(args.tool, root, *case, failures)
        for case in LM_CASES:
            check_lm(args.tool, args.generate, root, *case, failures)
        check_bad_inputs(args.tool, args.generate, root, failures)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if failures:
        print(f"{len(failures)} failure(s):\n  " + "\n  ".join(failures))
        return 1
    print("all cases passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
