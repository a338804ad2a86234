"""smoe's BaseRouter written directly from its formulas in PyTorch (float64, autograd).

BASE layers (Lewis et al. 2021):
    s = x Wᵀ                                    router logits [T, E], W = t["router.weight"] [E, d]
    train: the assignment a maximizing Σ_t s[t, a_t] with every expert receiving ⌊T/E⌋ or ⌈T/E⌉
           tokens and exactly T mod E experts receiving ⌈T/E⌉ (which ones is optimized), solved
           exactly by the Hungarian method on replicated columns (see balanced_assignment)
    eval:  a_t = argmax_e s[t, e] (ties to the smaller index)
    gate = sigmoid(s[t, a_t]); no gradient through the assignment.
route() returns (ids [T, 1], gates [T, 1], logits s [T, E], router_aux = 0).
Keep T small (the solver is O((E·⌈T/E⌉)³) in Python) and the optimum unique (assignment_margin):
with tied optima smoe and this file may pick different, equally good assignments.
"""
import itertools
import math

import torch


def hungarian(cost):
    """Minimum-cost perfect matching of a square cost matrix (list of lists): column of each row."""
    n = len(cost)
    INF = math.inf
    u, v = [0.0] * (n + 1), [0.0] * (n + 1)
    p, way = [0] * (n + 1), [0] * (n + 1)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = [INF] * (n + 1)
        used = [False] * (n + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = p[j0], INF, 0
            for j in range(1, n + 1):
                if not used[j]:
                    cur = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(n + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while True:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
            if j0 == 0:
                break
    col = [0] * n
    for j in range(1, n + 1):
        col[p[j] - 1] = j - 1
    return col


def balanced_assignment(scores, forbid=None):
    """(expert per token, objective) of the optimal balanced assignment of scores [T][E].

    Expert e owns ⌊T/E⌋ "base" columns and one "extra" column; E − (T mod E) dummy rows may take
    only extra columns, so exactly T mod E experts get ⌈T/E⌉ tokens. `forbid` = (t, e) excludes
    one pair (used by assignment_margin)."""
    T = len(scores)
    if T == 0:
        return [], 0.0
    E = len(scores[0])
    q, extra = divmod(T, E)
    per, n = q + 1, E * (q + 1)
    big = 1e12
    cost = []
    for i in range(n):
        row = []
        for c in range(n):
            e, is_extra = c // per, c % per == q
            if i < T:
                row.append(big if forbid == (i, e) else -scores[i][e])
            else:
                row.append(0.0 if is_extra else big)
        cost.append(row)
    col = hungarian(cost)
    a = [col[i] // per for i in range(T)]
    return a, sum(scores[i][a[i]] for i in range(T))


def assignment_margin(scores):
    """Objective gap between the best and the second-best balanced assignment (inf if unique by
    construction). The second best differs from the best in some token t, so it is the best with
    (t, a_t) forbidden for some t."""
    a, best = balanced_assignment(scores)
    second = -math.inf
    for t in range(len(a)):
        if len(scores[0]) == 1:
            break
        _, v = balanced_assignment(scores, forbid=(t, a[t]))
        if v > -1e11:  # a feasible alternative
            second = max(second, v)
    return best - second


def route(spec, t, x, mode):
    s = x @ t["router.weight"].T
    T = s.shape[0]
    if mode == "train":
        a, _ = balanced_assignment(s.detach().tolist())
        ids = torch.tensor(a, dtype=torch.long).reshape(T, 1)
    else:
        ids = torch.sort(-s.detach(), dim=1, stable=True).indices[:, :1]
    gates = torch.sigmoid(s.gather(1, ids))
    return ids, gates, s, s.sum() * 0.0


def _brute_force(scores):
    T, E = len(scores), len(scores[0])
    q, extra = divmod(T, E)
    best, arg = -math.inf, None
    for a in itertools.product(range(E), repeat=T):
        loads = [a.count(e) for e in range(E)]
        if any(n not in (q, q + 1) for n in loads) or loads.count(q + 1) != extra:
            continue
        v = sum(scores[i][a[i]] for i in range(T))
        if v > best:
            best, arg = v, list(a)
    return arg, best


if __name__ == "__main__":
    torch.manual_seed(0)
    for T, E in [(1, 3), (3, 4), (4, 2), (6, 3), (7, 3), (8, 4), (5, 1)]:
        for _ in range(3):
            s = torch.randn(T, E, dtype=torch.float64).tolist()
            a, v = balanced_assignment(s)
            b, w = _brute_force(s)
            assert abs(v - w) < 1e-12, (T, E, v, w)
            if assignment_margin(s) > 1e-9:
                assert a == b
    x = torch.randn(8, 5, dtype=torch.float64)
    W = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    ids, gates, logits, aux = route({"k": 1}, {"router.weight": W}, x, "train")
    assert sorted(torch.bincount(ids[:, 0], minlength=4).tolist()) == [2, 2, 2, 2]
    gates.sum().backward()
    assert W.grad is not None
    print("ref_base self-check passed")
