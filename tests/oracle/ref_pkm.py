"""Product-key memory (Lample et al. 2019) as sigma-MoE studies it (Csordás et al. 2023, Sec. 3.2),
written directly from its formulas in PyTorch (float64, autograd): the reference of
smoe::ProductKeyRouter (routing) and smoe::ValueExperts (the value rows).

Tensor names (the MoE layer prefixes router parameters with "router.", expert ones with "experts."):
    router.keys_a   [H, N, d/2]   sub-keys for the first half of x
    router.keys_b   [H, N, d/2]   sub-keys for the second half of x
    experts.values  [N², d]       value rows
Spec keys: "d_model" (even), "pkm_keys" (N), "pkm_heads" (H), "k" (K, selected PER HEAD; the
router's k() and the width of ids/gates is H·K), "n_experts" (N², if given it must match), "router":
    "pkm" or "pkm_relu"          gate = max(0, score)                     (sigma-MoE)
    "pkm_softmax"                softmax over each head's K scores        (Lample et al.)
    "pkm_softmax_across_heads"   softmax over the token's H·K scores      (sigma-MoE released code)

For x = x_a | x_b and head h:
    u_a = keys_a[h] x_a, u_b = keys_b[h] x_b          [N] each
    score[i·N + j] = u_a[i] + u_b[j]                  all N² values (formed densely here; the C++
                                                     code forms only the K×K candidates of the
                                                     sub-key top-Ks, which gives the same top-K)
    ids_h = the K best scores, best first, ties to the smaller value id, NaN lowest
ids [T, H·K] (head-major), gates [T, H·K]; logits None (no balance-loss logits over N² values);
router_aux 0 (no router-owned loss). The layer output is values_forward(t, ids, gates).
"""
import torch

ACTIVATIONS = {
    "pkm": "relu",
    "pkm_relu": "relu",
    "pkm_softmax": "softmax",
    "pkm_softmax_across_heads": "softmax_across_heads",
}


def stable_topk(s, k):
    """Indices of the k largest entries per row, best first; equal values keep index order; NaN last."""
    return torch.sort(-s, dim=1, stable=True).indices[:, :k]


def product_scores(t, x, H, N):
    """Dense product scores [T, H, N²] with value id i·N + j, differentiable in x and the keys."""
    ka, kb = t["router.keys_a"], t["router.keys_b"]
    half = x.shape[1] // 2
    ua = torch.einsum("tc,hnc->thn", x[:, :half], ka)  # [T, H, N]
    ub = torch.einsum("tc,hnc->thn", x[:, half:], kb)
    return (ua[:, :, :, None] + ub[:, :, None, :]).reshape(x.shape[0], H, N * N)


def route(spec, t, x, mode):
    """(ids [T, H·K] long, gates [T, H·K] float64, logits None, router_aux 0); mode is unused."""
    d, N, H, K = spec["d_model"], spec["pkm_keys"], spec["pkm_heads"], spec["k"]
    act = ACTIVATIONS[spec.get("router", "pkm")]
    if d % 2 != 0 or d < 2:
        raise ValueError(f"d_model must be even and >= 2, got {d}")
    if not 1 <= K <= N:
        raise ValueError(f"k must be in [1, pkm_keys = {N}], got {K}")
    if "n_experts" in spec and spec["n_experts"] != N * N:
        raise ValueError(f"n_experts must be pkm_keys² = {N * N}, got {spec['n_experts']}")
    T = x.shape[0]
    scores = product_scores(t, x, H, N)
    ids = torch.stack([stable_topk(scores[:, h].detach(), K) for h in range(H)], dim=1)  # [T, H, K]
    selected = scores.gather(2, ids)  # [T, H, K]
    if act == "relu":
        gates = torch.relu(selected)
    elif act == "softmax":
        gates = torch.softmax(selected, dim=2)
    else:
        gates = torch.softmax(selected.reshape(T, H * K), dim=1)
    return ids.reshape(T, H * K), gates.reshape(T, H * K), None, scores.sum() * 0.0


def values_forward(t, ids, gates):
    """y [T, d] = Σ_q gates[t, q] · values[ids[t, q]], assignments with id −1 skipped."""
    values = t["experts.values"]
    keep = ids >= 0
    rows = values[ids.clamp(min=0)]  # [T, Q, d]
    return ((gates * keep.to(gates.dtype))[..., None] * rows).sum(dim=1)


def layer_forward(spec, t, x, mode="eval"):
    """The whole PKM layer: y = values_forward(route(x)); returns (y, ids, gates)."""
    ids, gates, _, _ = route(spec, t, x, mode)
    return values_forward(t, ids, gates), ids, gates


def _shortcut_route(spec, t, x):
    """Independent loop version with the K×K candidate shortcut (as the C++ code), for the self-check."""
    N, H, K = spec["pkm_keys"], spec["pkm_heads"], spec["k"]
    half = x.shape[1] // 2
    ka, kb = t["router.keys_a"].detach(), t["router.keys_b"].detach()
    out = []
    for tok in range(x.shape[0]):
        row = []
        for h in range(H):
            ua = [float(x[tok, :half] @ ka[h, i]) for i in range(N)]
            ub = [float(x[tok, half:] @ kb[h, j]) for j in range(N)]
            ia = sorted(range(N), key=lambda i: (-ua[i], i))[:K]
            jb = sorted(range(N), key=lambda j: (-ub[j], j))[:K]
            cand = [(ua[i] + ub[j], i * N + j) for i in ia for j in jb]
            row += [v for _, v in sorted(cand, key=lambda c: (-c[0], c[1]))[:K]]
        out.append(row)
    return torch.tensor(out, dtype=torch.long)


if __name__ == "__main__":
    torch.manual_seed(0)
    for router in ("pkm", "pkm_softmax", "pkm_softmax_across_heads"):
        for H, N, K in ((1, 5, 2), (4, 6, 3), (2, 4, 4)):
            d, T = 8, 11
            spec = {"d_model": d, "pkm_keys": N, "pkm_heads": H, "k": K, "router": router, "n_experts": N * N}
            t = {
                "router.keys_a": torch.randn(H, N, d // 2, dtype=torch.float64, requires_grad=True),
                "router.keys_b": torch.randn(H, N, d // 2, dtype=torch.float64, requires_grad=True),
                "experts.values": torch.randn(N * N, d, dtype=torch.float64, requires_grad=True),
            }
            x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
            ids, gates, logits, aux = route(spec, t, x, "eval")
            assert logits is None and float(aux) == 0.0
            assert torch.equal(ids, _shortcut_route(spec, t, x.detach())), (router, H, N, K)
            # Gradients of the layer against finite differences (selection fixed near a generic point).
            def f(xx, ka, kb, v):
                tt = {"router.keys_a": ka, "router.keys_b": kb, "experts.values": v}
                return layer_forward(spec, tt, xx)[0]
            assert torch.autograd.gradcheck(f, (x, t["router.keys_a"], t["router.keys_b"], t["experts.values"]))
    # All-equal scores: ids 0..K-1 per head (i = 0, j = 0..K-1), ties to the smaller id.
    spec = {"d_model": 4, "pkm_keys": 3, "pkm_heads": 2, "k": 3, "router": "pkm_softmax"}
    t = {"router.keys_a": torch.zeros(2, 3, 2, dtype=torch.float64), "router.keys_b": torch.zeros(2, 3, 2, dtype=torch.float64)}
    ids, gates, _, _ = route(spec, t, torch.randn(2, 4, dtype=torch.float64), "eval")
    assert ids.tolist() == [[0, 1, 2, 0, 1, 2]] * 2 and torch.allclose(gates, torch.full_like(gates, 1 / 3))
    print("ref_pkm self-check passed")
