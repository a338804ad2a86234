"""Noisy top-k gating (Shazeer et al. 2017, Eq. 3-5 and Appendix A) in PyTorch (float64,
autograd), independent of the C++ router smoe::NoisyTopK.

    s = x Wᵀ                          W  = t["router.weight"]       [E, d]   (the logits returned)
    σ = softplus(x W_noiseᵀ)          W_noise = t["router.noise_weight"] [E, d]
    H = s + ε σ,  ε_te = standard_normal(seed, t·E + e, step)   (mode "train", Philox, philox.py)
    H = s                                                      (mode "eval")
    ids = top-k of H (ties to the smaller index);  gates = softmax over the K selected H values
    P(x, i) = Φ((s_i − kth_excluding(H, k, i)) / σ_i)   (1 when K = E: no k-th entry without i)
    Load_i = Σ_x P(x, i);  L_load = Var(Load) / mean(Load)²  (population, 0 if the mean is 0)
    router_aux = load_coef · L_load

spec keys: n_experts, k, seed (default 0), load_coef (default 0), step (the router's step counter
at this forward, default 0: a fresh router).
"""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import philox  # noqa: E402


def stable_topk(s, k):
    """Indices of the k largest entries per row, best first; equal values keep index order."""
    return torch.sort(-s, dim=1, stable=True).indices[:, :k]


def noise(seed, step, T, E):
    """ε [T, E] of one training forward: standard_normal(seed, t·E + e, step)."""
    eps = [philox.standard_normal(seed, t * E + e, step) for t in range(T) for e in range(E)]
    return torch.tensor(eps, dtype=torch.float64).reshape(T, E)


def route(spec, t, x, mode):
    E, K = spec["n_experts"], spec["k"]
    seed, step = spec.get("seed", 0), spec.get("step", 0)
    coef = float(spec.get("load_coef", 0.0))
    T = x.shape[0]
    s = x @ t["router.weight"].T
    u = x @ t["router.noise_weight"].T
    sigma = torch.logaddexp(u, torch.zeros_like(u))  # softplus, exact for every u
    eps = noise(seed, step, T, E) if mode == "train" else torch.zeros(T, E, dtype=torch.float64)
    H = s + eps * sigma
    ids = stable_topk(H.detach(), K)
    gates = torch.softmax(H.gather(1, ids), dim=1)

    zero = s.sum() * 0.0
    if coef == 0.0 or T == 0 or K == E:  # K = E: every P = 1, equal loads
        return ids, gates, s, zero
    # kth_excluding(H, k, i): the k-th largest of row H with entry i replaced by -inf.
    diag = torch.where(torch.eye(E, dtype=torch.bool), torch.tensor(-math.inf, dtype=torch.float64),
                       torch.tensor(0.0, dtype=torch.float64))
    excluded = H[:, None, :] + diag[None, :, :]  # [T, i, e]
    threshold = torch.topk(excluded, K, dim=2).values[:, :, K - 1]
    P = 0.5 * torch.erfc(-(s - threshold) / sigma / math.sqrt(2.0))
    load = P.sum(dim=0)
    mean = load.mean()
    if mean.item() == 0.0:
        return ids, gates, s, zero
    loss = ((load - mean) ** 2).mean() / mean ** 2
    return ids, gates, s, coef * loss


def _naive(spec, x, W, Wn, mode):
    """Plain-Python loops of the same formulas (ids, gates, load loss) for the self-check."""
    E, K, seed, step = spec["n_experts"], spec["k"], spec.get("seed", 0), spec.get("step", 0)
    T, d = len(x), len(x[0])
    ids, gates, load = [], [], [0.0] * E
    for t in range(T):
        s = [sum(x[t][i] * W[e][i] for i in range(d)) for e in range(E)]
        sig = [math.log1p(math.exp(sum(x[t][i] * Wn[e][i] for i in range(d)))) for e in range(E)]
        h = [s[e] + (philox.standard_normal(seed, t * E + e, step) if mode == "train" else 0.0) * sig[e]
             for e in range(E)]
        order = sorted(range(E), key=lambda e: (-h[e], e))[:K]
        z = sum(math.exp(h[e] - h[order[0]]) for e in order)
        ids.append(order)
        gates.append([math.exp(h[e] - h[order[0]]) / z for e in order])
        for i in range(E):
            others = sorted((h[e] for e in range(E) if e != i), reverse=True)
            load[i] += 1.0 if len(others) < K else 0.5 * math.erfc(-(s[i] - others[K - 1]) / sig[i] / math.sqrt(2))
    mean = sum(load) / E
    var = sum((v - mean) ** 2 for v in load) / E
    return ids, gates, (var / mean ** 2 if mean else 0.0)


if __name__ == "__main__":
    philox.self_check()
    g = torch.Generator().manual_seed(0)
    for K in (1, 2, 5):
        for mode in ("eval", "train"):
            spec = {"n_experts": 5, "k": K, "seed": 3, "step": 2, "load_coef": 0.5}
            x = torch.randn(7, 4, generator=g, dtype=torch.float64)
            W = torch.randn(5, 4, generator=g, dtype=torch.float64)
            Wn = torch.randn(5, 4, generator=g, dtype=torch.float64) * 0.5
            t = {"router.weight": W.requires_grad_(), "router.noise_weight": Wn.requires_grad_()}
            ids, gates, logits, aux = route(spec, t, x, mode)
            n_ids, n_gates, n_loss = _naive(spec, x.tolist(), W.tolist(), Wn.tolist(), mode)
            assert ids.tolist() == n_ids, (ids.tolist(), n_ids)
            assert torch.allclose(gates, torch.tensor(n_gates, dtype=torch.float64), rtol=1e-12, atol=1e-12)
            assert abs(aux.item() - 0.5 * n_loss) <= 1e-12, (aux.item(), 0.5 * n_loss)
            if K < 5:
                torch.autograd.grad(aux + gates.sum(), [W, Wn])  # differentiable end to end
    print("ref_noisy_topk.py: route() matches the naive loops")
