"""smoe's SBaseRouter written directly from its formulas in PyTorch (float64, autograd).

S-BASE (Clark et al. 2022; the "sinkmoid" selection of the sigma-MoE reference code):
    s = x Wᵀ                                    router logits [T, E], W = t["router.weight"] [E, d]
    train: ids = top-k of log P, P = textbook log-domain Sinkhorn of s (spec["sinkhorn_iters"],
           default 3): start a = 0, repeat  b_t = −LSE_e(s_te + a_e),  a_e = log(T/E) − LSE_t(s_te + b_t);
           log P_te = (s_te + b_t) − LSE_t(s + b)_e + log(T/E)  (rows sum to 1, columns to T/E)
           order: larger log P, then larger raw logit, then the smaller expert index
    eval:  ids = top-k of s (ties to the smaller index)
    gates = sigmoid(s[t, ids]) of the RAW logits; no gradient through the balancing.
route() returns (ids [T, K], gates [T, K], logits s [T, E], router_aux = 0).
"""
import math

import torch


def sinkhorn(z, iters):
    """log P [T, E] of the balanced plan for scores z (no gradient)."""
    z = z.detach()
    T, E = z.shape
    if iters == 0 or T == 0:
        return z.clone()
    log_c = math.log(T) - math.log(E)
    a = torch.zeros(E, dtype=z.dtype)
    for _ in range(iters):
        b = -torch.logsumexp(z + a[None, :], dim=1)
        lse = torch.logsumexp(z + b[:, None], dim=0)
        a = log_c - lse
    # The last column step written so that a single token gets exactly log(1/E) everywhere.
    return (z + b[:, None]) - lse[None, :] + log_c


def ordered_topk(primary, secondary, k):
    """Indices of the k best per row by (primary desc, secondary desc, index asc)."""
    by_secondary = torch.sort(-secondary, dim=1, stable=True).indices
    p = primary.gather(1, by_secondary)
    by_primary = torch.sort(-p, dim=1, stable=True).indices
    return by_secondary.gather(1, by_primary)[:, :k]


def route(spec, t, x, mode):
    K = spec["k"]
    iters = spec.get("sinkhorn_iters", 3)
    if iters is None:
        iters = 3
    s = x @ t["router.weight"].T
    if mode == "train" and iters > 0:
        ids = ordered_topk(sinkhorn(s, iters), s.detach(), K)
    else:
        ids = ordered_topk(s.detach(), s.detach(), K)
    gates = torch.sigmoid(s.gather(1, ids))
    return ids, gates, s, s.sum() * 0.0


def _naive_sinkhorn(z, iters):
    """Plain loops over Python floats (the self-check's independent reference)."""
    T, E = len(z), len(z[0])
    a, b = [0.0] * E, [0.0] * T
    for _ in range(iters):
        for i in range(T):
            m = max(z[i][e] + a[e] for e in range(E))
            b[i] = -(m + math.log(sum(math.exp(z[i][e] + a[e] - m) for e in range(E))))
        for e in range(E):
            m = max(z[i][e] + b[i] for i in range(T))
            a[e] = math.log(T / E) - (m + math.log(sum(math.exp(z[i][e] + b[i] - m) for i in range(T))))
    return [[z[i][e] + a[e] + b[i] for e in range(E)] for i in range(T)]


if __name__ == "__main__":
    torch.manual_seed(0)
    for T, E, K, iters in [(13, 4, 2, 3), (3, 5, 2, 1), (1, 4, 2, 3), (40, 6, 6, 10)]:
        x = torch.randn(T, 5, dtype=torch.float64)
        W = torch.randn(E, 5, dtype=torch.float64, requires_grad=True)
        s = (x @ W.T).detach()
        lp = sinkhorn(s, iters)
        ref = torch.tensor(_naive_sinkhorn(s.tolist(), iters), dtype=torch.float64)
        assert torch.allclose(lp, ref, atol=1e-12), (T, E)
        if T == 1:
            assert bool((lp == -math.log(E)).all())
        ids, gates, logits, aux = route({"k": K, "sinkhorn_iters": iters}, {"router.weight": W}, x, "train")
        for i in range(T):
            order = sorted(range(E), key=lambda e: (-float(lp[i, e]), -float(s[i, e]), e))[:K]
            assert ids[i].tolist() == order
        gates.sum().backward()
        assert W.grad is not None
    z = torch.randn(64, 8, dtype=torch.float64) * 3
    P = sinkhorn(z, 200).exp()
    assert (P.sum(1) - 1).abs().max() < 1e-9 and (P.sum(0) - 8).abs().max() < 1e-9
    print("ref_sbase self-check passed")
