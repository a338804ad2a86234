"""smoe's GroupTopKRouter written directly from its formulas in PyTorch (float64, autograd).

DeepSeek-V3 group-limited sigmoid routing with an aux-loss-free selection bias:
    s = x Wᵀ                           router logits [T, E], W = t["router.weight"] [E, d]
    σ = sigmoid(s),  q = σ + b         b = t["router.bias"] [E] when present, else 0 (selection only)
    n_groups consecutive groups of E / n_groups experts (spec["n_groups"], default 1)
    group score = sum of the group's two largest q (a one-expert group: its single q)
    keep the spec["topk_groups"] best groups (ties to the smaller group index)
    ids = top-k of q among the kept groups' experts (ties to the smaller expert index)
    gates = route_scale · σ[ids] / Σ σ[ids]      (spec["route_scale"], default 1; no bias)
Gradient flows through σ of the selected experts only; selection (and the bias) gets none.
The mode is ignored. route() returns (ids [T, K], gates [T, K], logits s [T, E], router_aux = 0).
"""
import torch


def _opt(spec, key, default):
    v = spec.get(key)
    return default if v is None else v


def stable_topk(score, k):
    """Indices of the k largest entries per row, best first; equal values keep index order."""
    return torch.sort(-score, dim=1, stable=True).indices[:, :k]


def route(spec, t, x, mode):
    E, K = spec["n_experts"], spec["k"]
    groups = int(_opt(spec, "n_groups", 1))
    keep = int(_opt(spec, "topk_groups", 1))
    scale = float(_opt(spec, "route_scale", 1.0))
    assert E % groups == 0 and 1 <= keep <= groups and 1 <= K <= keep * (E // groups)
    s = x @ t["router.weight"].T
    T = s.shape[0]
    sig = torch.sigmoid(s)
    q = sig.detach()
    if "router.bias" in t:
        q = q + t["router.bias"].detach()[None, :]
    size = E // groups
    if keep < groups:
        qg = q.reshape(T, groups, size)
        if size == 1:
            gscore = qg[:, :, 0]
        else:
            gscore = torch.sort(qg, dim=2, descending=True).values[:, :, :2].sum(dim=2)
        kept = stable_topk(gscore, keep)
        allowed = torch.zeros(T, groups, dtype=torch.bool)
        allowed[torch.arange(T)[:, None].expand(T, keep), kept] = True
        allowed = allowed[:, :, None].expand(T, groups, size).reshape(T, E)
        # Dropped experts rank below every allowed one (q is bounded, so -inf is safe here).
        q = torch.where(allowed, q, torch.full_like(q, -float("inf")))
    ids = stable_topk(q, K)
    chosen = sig.gather(1, ids)
    gates = scale * chosen / chosen.sum(dim=1, keepdim=True)
    return ids, gates, s, s.sum() * 0.0


def _naive(s, b, K, groups, keep, scale):
    """Plain Python loops (the self-check's independent reference): (ids, gates) as lists."""
    import math
    E = len(b)
    size = E // groups
    ids, gates = [], []
    for row in s:
        sig = [1.0 / (1.0 + math.exp(-v)) for v in row]
        q = [sig[e] + b[e] for e in range(E)]
        gs = []
        for g in range(groups):
            m = sorted(q[g * size:(g + 1) * size], reverse=True)
            gs.append(m[0] if size == 1 else m[0] + m[1])
        kept = sorted(range(groups), key=lambda g: (-gs[g], g))[:keep]
        cand = [e for e in range(E) if e // size in kept]
        sel = sorted(cand, key=lambda e: (-q[e], e))[:K]
        z = sum(sig[e] for e in sel)
        ids.append(sel)
        gates.append([scale * sig[e] / z for e in sel])
    return ids, gates


if __name__ == "__main__":
    import math

    torch.manual_seed(0)
    cases = [(8, 2, 4, 2, 1.0), (8, 3, 4, 2, 2.5), (12, 4, 3, 1, 1.0), (6, 2, 6, 3, 1.5), (6, 6, 1, 1, 1.0),
             (16, 4, 4, 3, 2.5), (8, 4, 2, 1, 1.0)]
    for E, K, groups, keep, scale in cases:
        for with_bias in (False, True):
            T = 11
            x = torch.randn(T, 5, dtype=torch.float64)
            W = torch.randn(E, 5, dtype=torch.float64, requires_grad=True)
            t = {"router.weight": W}
            b = [0.0] * E
            if with_bias:
                t["router.bias"] = 0.3 * torch.randn(E, dtype=torch.float64)
                b = t["router.bias"].tolist()
            spec = {"n_experts": E, "k": K, "n_groups": groups, "topk_groups": keep, "route_scale": scale}
            ids, gates, s, aux = route(spec, t, x, "train")
            ref_ids, ref_gates = _naive(s.detach().tolist(), b, K, groups, keep, scale)
            assert ids.tolist() == ref_ids, (E, K, groups, keep, with_bias)
            assert torch.allclose(gates.detach(), torch.tensor(ref_gates, dtype=torch.float64), atol=1e-14)
            (gates * torch.randn(T, K, dtype=torch.float64)).sum().backward()
            assert torch.isfinite(W.grad).all()
    # The hand example of the C++ test: s = (2, 1, 0, -1), two groups, one kept; bias flips the group.
    W = torch.tensor([[2.0], [1.0], [0.0], [-1.0]], dtype=torch.float64)
    x = torch.ones(1, 1, dtype=torch.float64)
    spec = {"n_experts": 4, "k": 2, "n_groups": 2, "topk_groups": 1, "route_scale": 2.5}
    assert route(spec, {"router.weight": W}, x, "eval")[0].tolist() == [[0, 1]]
    bias = torch.tensor([0.0, 0.0, 0.5, 0.5], dtype=torch.float64)
    ids, gates, _, _ = route(spec, {"router.weight": W, "router.bias": bias}, x, "eval")
    assert ids.tolist() == [[2, 3]]
    s0, sm1 = 0.5, 1.0 / (1.0 + math.e)
    assert abs(gates[0, 0].item() - 2.5 * s0 / (s0 + sm1)) < 1e-12
    print("ref_group_topk: self-check passed")
