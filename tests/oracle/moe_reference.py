"""The MoE layer of smoe_eval written directly from its formulas in PyTorch (float64, autograd).

Routing (ids [T, K], gates [T, K], logits s [T, E] or None, router_aux):
    softmax_topk / sigmoid_topk (here):
        s = x Wᵀ;  ids = top-k of s per token, ties to the smaller expert index
        gate = softmax(s)[e]                      renormalize = false
             = softmax over the K selected logits renormalize = true
             = sigmoid(s[e])                      sigmoid_topk
    noisy_topk, sbase, base, expert_choice, hash, group_topk, pkm: route() of ref_<router>.py
        (their docstrings); spec keys are passed through, with smoe_eval's defaults filled in.
Capacity (token-choice routers, spec "capacity_factor" c > 0):
    C = ceil(c · T · K / E); assignments are visited first choices of all tokens first, then second
    choices, ..., each in token order; an assignment to an expert that already holds C is dropped
    (id −1). The router's ids and gates stay as chosen (the losses read them); y skips dropped ones.
Experts:
    feed-forward expert e: pre = x W1[e] + b1[e]; h = relu(pre) | gelu(pre) (exact erf) |
                           silu(pre[:G]) * pre[G:];  out = h W2[e] + b2[e]
    pkm value e:           out = values[e] (whatever the token)
    y[t] = Σ_k gate[t, k] · out_{ids[t, k]}(x[t])   over the assignments that are not −1
Losses (with p_t = softmax(s_t); only "importance" for routers without logits):
    switch     = E · Σ_e f_e P_e, f_e = fraction of tokens whose argmax logit is e (no gradient),
                 P_e = mean_t p_te
    z          = mean_t (logsumexp_e s_te)²
    entropy    = Σ_e p̄_e log p̄_e, p̄ = mean_t p_t
    importance = Var(I) / mean(I)², I_e = Σ of the router's gates routed to e (before capacity;
                 population variance; 0 when mean(I) = 0)
    aux_loss = Σ coef · loss + router_aux (noisy_topk: load_coef · load loss);
    gradients are those of sum(y ⊙ dy) + aux_loss.
With no tokens (T = 0) every loss is 0.
OUT also holds routing.tokens_per_expert [E] (= expert_counts, assignments after capacity) and,
for every router but expert_choice, routing.experts [T, K] (int32, dropped assignments −1) and
routing.gates [T, K] (0 where the id is −1).
"""
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ref_base  # noqa: E402
import ref_expert_choice  # noqa: E402
import ref_group_topk  # noqa: E402
import ref_hash  # noqa: E402
import ref_noisy_topk  # noqa: E402
import ref_pkm  # noqa: E402
import ref_sbase  # noqa: E402

PARAMETERS = ("router.weight", "router.noise_weight", "router.keys_a", "router.keys_b",
              "experts.w1", "experts.w2", "experts.b1", "experts.b2", "experts.values")
NOT_DIFFERENTIABLE = ("dy", "ids", "router.bias")  # router.bias: selection only, not trained by gradient
PKM_GATES = {"relu": "pkm", "softmax": "pkm_softmax", "softmax_across_heads": "pkm_softmax_across_heads"}
PKM_DEFAULT_HEADS = 4


def stable_topk(s, k):
    """Indices of the k largest entries per row, best first; equal values keep index order."""
    return torch.sort(-s, dim=1, stable=True).indices[:, :k]


def topk_route(spec, t, x, mode):
    s = x @ t["router.weight"].T
    ids = stable_topk(s.detach(), spec["k"])
    if spec["router"] == "softmax_topk":
        if spec.get("renormalize", False):
            gates = torch.softmax(s.gather(1, ids), dim=1)
        else:
            gates = torch.softmax(s, dim=1).gather(1, ids)
    else:
        gates = torch.sigmoid(s.gather(1, ids))
    return ids, gates, s, s.sum() * 0.0


def pkm_spec(spec):
    """ref_pkm's spec: the gate nonlinearity is smoe_eval's "activation", heads default to 4."""
    return {**spec, "pkm_heads": spec.get("pkm_heads", PKM_DEFAULT_HEADS),
            "router": PKM_GATES[spec.get("activation", "relu")]}


ROUTES = {
    "softmax_topk": topk_route,
    "sigmoid_topk": topk_route,
    "noisy_topk": ref_noisy_topk.route,
    "sbase": ref_sbase.route,
    "base": ref_base.route,
    "expert_choice": ref_expert_choice.route,
    "hash": ref_hash.route,
    "group_topk": ref_group_topk.route,
    "pkm": lambda spec, t, x, mode: ref_pkm.route(pkm_spec(spec), t, x, mode),
}


def n_experts(spec):
    return spec["pkm_keys"] ** 2 if spec["router"] == "pkm" else spec["n_experts"]


def route(spec, t):
    """(ids, gates, logits or None, router_aux) of the spec's router on t["x"]."""
    return ROUTES[spec["router"]](spec, t, t["x"], spec.get("mode", "eval"))


def apply_capacity(spec, ids, E):
    """ids with the over-capacity assignments set to −1 (position priority)."""
    c = spec.get("capacity_factor") or 0.0
    if spec["router"] == "expert_choice" or c == 0.0:
        return ids.clone()
    T, K = ids.shape
    C = math.ceil(c * (T * K) / E)
    kept = ids.clone()
    load = [0] * E
    for j in range(K):
        for i in range(T):
            e = int(ids[i, j])
            if e < 0:
                continue
            if load[e] < C:
                load[e] += 1
            else:
                kept[i, j] = -1
    return kept


def expert_outputs(spec, t, ids):
    """out [T, K, d]: the output of expert ids[t, k] for token t (ids −1 read expert 0)."""
    x = t["x"]
    T, K = ids.shape
    safe = ids.clamp(min=0)
    if spec["router"] == "pkm":
        return t["experts.values"][safe]
    G = spec["expert_size"]
    pre = torch.einsum("td,edh->eth", x, t["experts.w1"])
    if spec.get("bias", False):
        pre = pre + t["experts.b1"][:, None, :]
    act = spec["activation"]
    if act == "relu":
        h = torch.relu(pre)
    elif act == "gelu":
        h = F.gelu(pre, approximate="none")
    elif act == "swiglu":
        h = F.silu(pre[..., :G]) * pre[..., G:]
    else:
        raise ValueError(act)
    out = torch.einsum("etg,egd->etd", h, t["experts.w2"])
    if spec.get("bias", False):
        out = out + t["experts.b2"][:, None, :]
    token = torch.arange(T)[:, None].expand(T, K)
    return out[safe, token]


def forward(spec, t, outputs=expert_outputs):
    """(y, aux_loss, routing outputs, losses) from spec and float64 tensors t (name -> torch tensor).
    outputs(spec, t, kept) -> [T, K, d] gives the expert outputs (ref_stack.py passes its pools')."""
    E = n_experts(spec)
    coef = {"switch": 0.0, "z": 0.0, "entropy": 0.0, "importance": 0.0, **spec.get("coef", {})}
    x = t["x"]
    T = x.shape[0]
    ids, gates, s, router_aux = route(spec, t)
    kept = apply_capacity(spec, ids, E)
    live = (kept >= 0).to(gates.dtype)
    y = ((gates * live)[..., None] * outputs(spec, t, kept)).sum(dim=1)

    zero = x.sum() * 0.0
    losses = {}
    if s is not None:
        if T == 0:
            losses = {"switch": zero, "z": zero, "entropy": zero}
        else:
            p = torch.softmax(s, dim=1)
            f = torch.bincount(stable_topk(s.detach(), 1)[:, 0], minlength=E).to(s.dtype) / T
            p_mean = p.mean(dim=0)
            losses = {
                "switch": E * (f * p_mean).sum(),
                "z": (torch.logsumexp(s, dim=1) ** 2).mean(),
                "entropy": (p_mean * torch.log(p_mean)).sum(),
            }
    routed = ids >= 0
    importance = torch.zeros(E, dtype=gates.dtype).index_add(0, ids[routed], gates[routed])
    mean = importance.mean()
    if mean.item() == 0.0:
        losses["importance"] = zero
    else:
        losses["importance"] = ((importance - mean) ** 2).mean() / mean ** 2
    aux = sum(coef[name] * value for name, value in losses.items()) + router_aux
    counts = torch.bincount(kept[kept >= 0], minlength=E)
    routing = {"expert_counts": counts, "routing.tokens_per_expert": counts}
    if spec["router"] != "expert_choice":
        routing["routing.experts"] = kept.to(torch.int32)
        routing["routing.gates"] = (gates * live).detach()
    losses["router"] = router_aux
    return y, aux, routing, losses


def evaluate(spec, inputs):
    """The outputs smoe_eval must produce for `inputs` (name -> numpy array), as numpy arrays
    (float64 for the floating ones)."""
    t = {}
    for name, a in inputs.items():
        if name == "ids":
            t[name] = torch.tensor(a, dtype=torch.int64)
        else:
            t[name] = torch.tensor(a, dtype=torch.float64, requires_grad=name not in NOT_DIFFERENTIABLE)
    y, aux, routing, losses = forward(spec, t)
    out = {"y": y.detach().numpy(), "aux_loss": aux.detach().numpy()}
    out.update({name: v.numpy() for name, v in routing.items()})
    if "dy" in t:
        wrt = ["x"] + [n for n in PARAMETERS if n in t]
        objective = (y * t["dy"]).sum() + aux
        grads = torch.autograd.grad(objective, [t[n] for n in wrt], allow_unused=True)
        for name, g in zip(wrt, grads):
            out["grad." + name] = (torch.zeros_like(t[name]) if g is None else g).detach().numpy()
    return out, {k: float(v) for k, v in losses.items()}
