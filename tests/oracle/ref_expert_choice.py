"""smoe's ExpertChoiceRouter written directly from its formulas in PyTorch (float64, autograd).

Expert Choice (Zhou et al. 2022):
    s = x Wᵀ                              router logits [T, E], W = t["router.weight"] [E, d]
    S = softmax(s) over the experts of each token
    C = min(T, max(1, floor(T · c / E))), c = spec["capacity_factor"] (default 2), 0 when T = 0
    expert e takes the C tokens with the largest S[:, e] (ties to the smaller token index)
    ids [T, E]: row t lists the experts that took token t in increasing id, padded with -1
    gates [T, E] = S[t, e] at those entries, 0 at the padding (gradient through the full softmax)
The mode is ignored (no stochastic part). A selection bias does not apply: a per-expert constant
does not change an expert's order of tokens, so t["router.bias"] is ignored.
route() returns (ids, gates, logits s, router_aux = 0).
"""
import math

import torch


def capacity(T, E, cf):
    if T == 0:
        return 0
    return min(T, max(1, math.floor(T * cf / E)))


def route(spec, t, x, mode):
    E = spec["n_experts"]
    cf = spec.get("capacity_factor")
    cf = 2.0 if cf is None else float(cf)
    s = x @ t["router.weight"].T
    T = s.shape[0]
    S = torch.softmax(s, dim=1)
    C = capacity(T, E, cf)
    # picks[e] = the C best tokens of column e (stable descending sort: ties to the smaller token)
    picks = torch.sort(-S.detach().T, dim=1, stable=True).indices[:, :C]
    took = torch.zeros(T, E, dtype=torch.bool)
    if C > 0:
        took[picks.T.reshape(-1), torch.arange(E).repeat(C)] = True
    # Row t: the experts with took[t, e] in increasing e, then -1.
    order = torch.sort((~took).to(torch.int64), dim=1, stable=True).indices  # taken experts first, id order
    taken = took.gather(1, order)
    ids = torch.where(taken, order, torch.full_like(order, -1))
    gates = torch.where(taken, S.gather(1, order), torch.zeros_like(S))
    return ids, gates, s, s.sum() * 0.0


def _naive(s, cf):
    """Plain Python loops (the self-check's independent reference): (ids, gates) as lists."""
    T, E = len(s), len(s[0]) if s else 0
    S = []
    for row in s:
        z = sum(math.exp(v) for v in row)
        S.append([math.exp(v) / z for v in row])
    C = capacity(T, E, cf)
    took = [[False] * E for _ in range(T)]
    for e in range(E):
        order = sorted(range(T), key=lambda i: (-S[i][e], i))
        for i in order[:C]:
            took[i][e] = True
    ids = [[e for e in range(E) if took[i][e]] for i in range(T)]
    gates = [[S[i][e] for e in ids[i]] + [0.0] * (E - len(ids[i])) for i in range(T)]
    ids = [row + [-1] * (E - len(row)) for row in ids]
    return ids, gates


if __name__ == "__main__":
    torch.manual_seed(0)
    for T, E, cf in [(13, 4, 2.0), (3, 8, 2.0), (1, 4, 2.0), (7, 4, 4.0), (40, 6, 1.5), (0, 3, 2.0)]:
        x = torch.randn(T, 5, dtype=torch.float64)
        W = torch.randn(E, 5, dtype=torch.float64, requires_grad=True)
        spec = {"n_experts": E, "capacity_factor": cf}
        ids, gates, s, aux = route(spec, {"router.weight": W}, x, "train")
        ref_ids, ref_gates = _naive(s.detach().tolist(), cf)
        assert ids.tolist() == ref_ids, (T, E, cf)
        assert torch.allclose(gates.detach(), torch.tensor(ref_gates, dtype=torch.float64).reshape(T, E), atol=1e-14)
        assert int((ids >= 0).sum()) == E * capacity(T, E, cf)
        if T > 0:
            (gates * torch.randn(T, E, dtype=torch.float64)).sum().backward()
            assert W.grad is not None and torch.isfinite(W.grad).all()
    # All-equal scores: every expert takes the first C tokens.
    ids, gates, _, _ = route({"n_experts": 4, "capacity_factor": 1.0}, {"router.weight": torch.zeros(4, 3, dtype=torch.float64)},
                             torch.randn(6, 3, dtype=torch.float64), "eval")
    assert ids[0].tolist() == [0, 1, 2, 3] and (ids[1:] == -1).all()
    assert torch.allclose(gates[0], torch.full((4,), 0.25, dtype=torch.float64))
    print("ref_expert_choice: self-check passed")
