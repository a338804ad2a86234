"""smoe_eval's multi-layer mode ("layers" in the SPEC) written directly from its formulas in PyTorch
(float64, autograd), from docs/samoe.md and docs/smoe_eval.md:

Stack:
    x_0 = x,   x_{l+1} = x_l + F_l(x_l)   (l = 0 .. L-1),   y = x_L,   aux_loss = Σ_l aux_l
    F_l(x) = MoE_l(x)                                            (the routed layer)
           = c0·MoE_l(x) + c1·MLP_l(x),  (c0, c1) = softmax(x·mixᵀ + mix_bias)   with a residual expert
           + Σ_{j<N_s} FFN_{l,j}(x), ungated                     with shared experts (outside the mixture)
    MoE_l is the single-layer MoE of moe_reference.forward (routing by layers.{l}.router.weight on
    x_l, capacity, losses, aux_l), with the expert outputs of the pool:
        per_layer     FFN(layers.{l}.experts.*[e])
        tied          FFN(experts.*[e])                      the same weights in every layer
        samoe_weight  FFN(Σ_{m∈S} α_{l,m} pool.*[m, e])      w1, w2, b1, b2 combined alike
        samoe_output  Σ_{m∈S} α_{l,m} FFN(pool.*[m, e])
        α_{l,m} = exp(a_{l,m}/τ) / Σ_{j∈S} exp(a_{l,j}/τ) for m ∈ S, else 0;  a_l = layers.{l}.combine;
        S = all M members, or the r ("pool_top_members") with the largest a_l, ties to the smaller index.
FFN(W)(x) = act(x·W1 + b1)·W2 + b2, act = relu | gelu (exact erf) | swiglu: silu(pre[:G]) ⊙ pre[G:].
The residual MLP and the shared experts are FFNs of the same activation; with "bias" every FFN has
its biases.

forward() also returns the distances of the routing decisions from their kinks (top-k and argmax
gaps of every layer's logits, the top-r gap of a_l, the relative size of the smallest selected ReLU
pre-activation), so the oracle can redraw inputs that sit too close to one.
"""
import numpy as np
import torch
import torch.nn.functional as F

import moe_reference

SAMOE = ("samoe_weight", "samoe_output")


def hidden(spec, G):
    return 2 * G if spec["activation"] == "swiglu" else G


def parameter_shapes(spec):
    """name -> shape of every parameter tensor the stack reads (the names of the contract)."""
    L, pool = spec["layers"], spec.get("pool", "per_layer")
    E, d, G = spec["n_experts"], spec["d_model"], spec["expert_size"]
    H = hidden(spec, G)
    bias = spec.get("bias", False)
    shapes = {}

    def ffn(prefix, lead, G, H):
        shapes[prefix + "w1"] = (*lead, d, H)
        shapes[prefix + "w2"] = (*lead, G, d)
        if bias:
            shapes[prefix + "b1"] = (*lead, H)
            shapes[prefix + "b2"] = (*lead, d)

    if pool == "tied":
        ffn("experts.", (E,), G, H)
    elif pool in SAMOE:
        ffn("pool.", (spec["pool_members"], E), G, H)
    for l in range(L):
        p = f"layers.{l}."
        shapes[p + "router.weight"] = (E, d)
        if pool == "per_layer":
            ffn(p + "experts.", (E,), G, H)
        if pool in SAMOE:
            shapes[p + "combine"] = (spec["pool_members"],)
        Gr = spec.get("residual_expert_size", 0)
        if Gr:
            ffn(p + "residual.", (), Gr, hidden(spec, Gr))
            shapes[p + "residual.mix"] = (2, d)
            if spec.get("residual_mix_bias", False):
                shapes[p + "residual.mix_bias"] = (2,)
        Ns = spec.get("shared_experts", 0)
        if Ns:
            ffn(p + "shared.", (Ns,), G, H)
    return shapes


def act(spec, pre, G):
    a = spec["activation"]
    if a == "relu":
        return torch.relu(pre)
    if a == "gelu":
        return F.gelu(pre, approximate="none")
    return F.silu(pre[..., :G]) * pre[..., G:]


class Kinks:
    """Smallest distances of the routing decisions and ReLU pre-activations from their kinks, as
    (kind, distance): "experts" (top-k and argmax of a layer's logits), "members" (top-r of a_l),
    "relu" (|pre| / max(1, max |pre|) of the pre-activations that are used)."""

    def __init__(self, spec):
        self.relu = spec["activation"] == "relu"
        self.gaps = []

    def topk(self, kind, scores, k):
        s = scores.detach().numpy()
        if s.size and k < s.shape[-1]:
            ordered = -np.sort(-s, axis=-1)
            self.gaps.append((kind, float(np.min(ordered[..., k - 1] - ordered[..., k]))))

    def pre(self, values):
        if self.relu and values.numel():
            v = values.detach().abs()
            self.gaps.append(("relu", float(v.min()) / max(1.0, float(v.max()))))


def ffn_rows(spec, x, w, G, kinks):
    """FFN of w (w1 [.., d, H], w2 [.., G, d], optional b1, b2 with the same leading axes as x's
    rows): x [N, d] with one weight set per row."""
    pre = torch.einsum("nd,ndh->nh", x, w["w1"])
    if "b1" in w:
        pre = pre + w["b1"]
    kinks.pre(pre)
    out = torch.einsum("ng,ngd->nd", act(spec, pre, G), w["w2"])
    if "b2" in w:
        out = out + w["b2"]
    return out


def routed_outputs(spec, x, weights, kept, kinks):
    """[T, K, d]: expert kept[t, k]'s output for token t under weights (w1 [E, d, H], ...); −1 reads
    expert 0 and is not a kink (the layer multiplies it by 0)."""
    T, K = kept.shape
    d = x.shape[1]
    safe = kept.clamp(min=0).reshape(-1)
    live = (kept >= 0).reshape(-1)
    rows = x[:, None, :].expand(T, K, d).reshape(-1, d)
    w = {name: value[safe] for name, value in weights.items()}
    pre = torch.einsum("nd,ndh->nh", rows, w["w1"])
    if "b1" in w:
        pre = pre + w["b1"]
    kinks.pre(pre[live])
    out = torch.einsum("ng,ngd->nd", act(spec, pre, spec["expert_size"]), w["w2"])
    if "b2" in w:
        out = out + w["b2"]
    return out.reshape(T, K, d)


def dense_ffn(spec, x, t, prefix, G, kinks):
    """The residual MLP: w1 [d, H_r], w2 [G_r, d] for every token."""
    pre = x @ t[prefix + "w1"]
    if prefix + "b1" in t:
        pre = pre + t[prefix + "b1"]
    kinks.pre(pre)
    out = act(spec, pre, G) @ t[prefix + "w2"]
    if prefix + "b2" in t:
        out = out + t[prefix + "b2"]
    return out


def member_set(spec, a):
    """S: the selected members in increasing index order."""
    M = a.shape[0]
    r = spec.get("pool_top_members", 0) or M
    if r == M:
        return list(range(M))
    order = torch.sort(-a.detach(), stable=True).indices[:r]
    return sorted(int(m) for m in order)


def coefficients(spec, a, kinks):
    """α_l over all M members (0 outside S)."""
    M = a.shape[0]
    r = spec.get("pool_top_members", 0) or M
    if r < M:
        kinks.topk("members", a[None, :], r)
    S = member_set(spec, a)
    tau = spec.get("temperature", 1.0)
    alpha_S = torch.softmax(a[S] / tau, dim=0)
    alpha = torch.zeros(M, dtype=a.dtype)
    return alpha.index_put((torch.tensor(S, dtype=torch.long),), alpha_S), S


def weights_of(t, prefix, index=None):
    out = {}
    for name in ("w1", "w2", "b1", "b2"):
        if prefix + name in t:
            out[name] = t[prefix + name] if index is None else t[prefix + name][index]
    return out


def forward(spec, t):
    """(y, aux_loss, outputs, gaps): y and aux_loss as tensors, the other OUT tensors (name -> tensor)
    and the kink distances."""
    L, pool = spec["layers"], spec.get("pool", "per_layer")
    kinks = Kinks(spec)
    x = t["x"]
    K = spec["k"]
    aux = x.sum() * 0.0
    out = {}
    for l in range(L):
        p = f"layers.{l}."
        logits = x @ t[p + "router.weight"].T
        kinks.topk("experts", logits, K)
        kinks.topk("experts", logits, 1)  # the switch loss's argmax
        if pool in SAMOE:
            alpha, S = coefficients(spec, t[p + "combine"], kinks)
            out[p + "combine_coefficients"] = alpha
            members = [(alpha[m], weights_of(t, "pool.", m)) for m in S]
        if pool == "per_layer":
            weights = weights_of(t, p + "experts.")
        elif pool == "tied":
            weights = weights_of(t, "experts.")
        elif pool == "samoe_weight":
            weights = {name: sum(a * w[name] for a, w in members) for name in members[0][1]}

        if pool == "samoe_output":
            def outputs(spec_, t_, kept):
                return sum(a * routed_outputs(spec, t_["x"], w, kept, kinks) for a, w in members)
        else:
            def outputs(spec_, t_, kept):
                return routed_outputs(spec, t_["x"], weights, kept, kinks)

        moe_y, aux_l, routing, _ = moe_reference.forward(spec, {"x": x, "router.weight": t[p + "router.weight"]},
                                                         outputs=outputs)
        f = moe_y
        Gr = spec.get("residual_expert_size", 0)
        if Gr:
            z = x @ t[p + "residual.mix"].T
            if p + "residual.mix_bias" in t:
                z = z + t[p + "residual.mix_bias"]
            c = torch.softmax(z, dim=1)
            out[p + "residual_coefficients"] = c
            f = c[:, 0:1] * moe_y + c[:, 1:2] * dense_ffn(spec, x, t, p + "residual.", Gr, kinks)
        Ns = spec.get("shared_experts", 0)
        if Ns:
            T = x.shape[0]
            for j in range(Ns):
                w = {name: v[None].expand(T, *v.shape) for name, v in weights_of(t, p + "shared.", j).items()}
                f = f + ffn_rows(spec, x, w, spec["expert_size"], kinks)
        x = x + f
        aux = aux + aux_l
        out[p + "aux_loss"] = aux_l
        for name, value in routing.items():
            out[p + name] = value
    return x, aux, out, kinks.gaps


def evaluate(spec, inputs):
    """(OUT tensors smoe_eval must produce as numpy arrays, kink distances) for float64 numpy inputs."""
    t = {name: torch.tensor(a, dtype=torch.float64, requires_grad=name != "dy") for name, a in inputs.items()}
    y, aux, outputs, gaps = forward(spec, t)
    out = {"y": y.detach().numpy(), "aux_loss": aux.detach().numpy()}
    for name, value in outputs.items():
        out[name] = value.detach().numpy()
    if "dy" in t:
        wrt = [n for n in t if n != "dy"]
        objective = (y * t["dy"]).sum() + aux
        grads = torch.autograd.grad(objective, [t[n] for n in wrt], allow_unused=True)
        for name, g in zip(wrt, grads):
            out["grad." + name] = (torch.zeros_like(t[name]) if g is None else g).detach().numpy()
    return out, gaps


def gaps_only(spec, inputs):
    with torch.no_grad():
        t = {name: torch.tensor(a, dtype=torch.float64) for name, a in inputs.items()}
        return forward(spec, t)[3]


if __name__ == "__main__":
    # Self-check that needs no smoe_eval: a one-member pool is the tied set (α = 1) in both spaces.
    torch.set_default_dtype(torch.float64)
    rng = np.random.default_rng(0)
    base = {"layers": 2, "d_model": 5, "n_experts": 3, "expert_size": 4, "k": 2, "router": "softmax_topk",
            "activation": "gelu", "bias": True, "coef": {"switch": 0.1, "z": 0.01}}
    tied = {**base, "pool": "tied"}
    shapes = parameter_shapes(tied)
    inputs = {n: rng.normal(size=s) for n, s in shapes.items()}
    inputs["x"] = rng.normal(size=(7, 5))
    one = {**base, "pool": "samoe_weight", "pool_members": 1}
    inputs1 = {("pool." + n[len("experts."):] if n.startswith("experts.") else n): (v[None] if n.startswith("experts.") else v)
               for n, v in inputs.items()}
    for l in range(2):
        inputs1[f"layers.{l}.combine"] = np.array([0.3])
    a, _ = evaluate(tied, inputs)
    for p in SAMOE:
        b, _ = evaluate({**one, "pool": p}, inputs1)
        assert np.allclose(a["y"], b["y"], rtol=0, atol=1e-14), p
    print("ref_stack self-check passed")
