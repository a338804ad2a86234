"""The MoE layer of smoe_eval written directly from its formulas in PyTorch (float64, autograd).

    s = x Wᵀ                                  router logits [T, E]
    ids = top-k of s per token, ties to the smaller expert index
    gate = softmax(s)[e]                      softmax_topk, renormalize = false
         = softmax over the K selected logits softmax_topk, renormalize = true
         = sigmoid(s[e])                      sigmoid_topk
    expert e: pre = x W1[e] + b1[e]; h = relu(pre) | gelu(pre) (exact erf) | silu(pre[:G]) * pre[G:]
              out = h W2[e] + b2[e]
    y[t] = Σ_k gate[t, k] · out_{ids[t, k]}(x[t])
    with p_t = softmax(s_t):
      switch     = E · Σ_e f_e P_e, f_e = fraction of tokens whose argmax logit is e (no gradient),
                   P_e = mean_t p_te
      z          = mean_t (logsumexp_e s_te)²
      entropy    = Σ_e p̄_e log p̄_e, p̄ = mean_t p_t
      importance = Var(I) / mean(I)², I_e = Σ of the final gates routed to e (population variance;
                   0 when mean(I) = 0)
    aux_loss = Σ coef · loss;  gradients are those of sum(y ⊙ dy) + aux_loss.
With no tokens (T = 0) every loss is 0.
"""
import torch
import torch.nn.functional as F

PARAMETERS = ("router.weight", "experts.w1", "experts.w2", "experts.b1", "experts.b2")


def stable_topk(s, k):
    """Indices of the k largest entries per row, best first; equal values keep index order."""
    return torch.sort(-s, dim=1, stable=True).indices[:, :k]


def forward(spec, t):
    """(y, aux_loss, expert_counts, losses) from spec and float64 tensors t (name -> torch tensor)."""
    E, K, G = spec["n_experts"], spec["k"], spec["expert_size"]
    coef = {"switch": 0.0, "z": 0.0, "entropy": 0.0, "importance": 0.0, **spec.get("coef", {})}
    x, W = t["x"], t["router.weight"]
    T = x.shape[0]
    s = x @ W.T
    ids = stable_topk(s.detach(), K)

    if spec["router"] == "softmax_topk":
        if spec.get("renormalize", False):
            gates = torch.softmax(s.gather(1, ids), dim=1)
        else:
            gates = torch.softmax(s, dim=1).gather(1, ids)
    elif spec["router"] == "sigmoid_topk":
        gates = torch.sigmoid(s.gather(1, ids))
    else:
        raise ValueError(spec["router"])

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
    y = (gates[..., None] * out[ids, token]).sum(dim=1)

    zero = s.sum() * 0.0
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
    importance = torch.zeros(E, dtype=s.dtype).index_add(0, ids.reshape(-1), gates.reshape(-1))
    mean = importance.mean()
    if mean.item() == 0.0:
        losses["importance"] = zero
    else:
        losses["importance"] = ((importance - mean) ** 2).mean() / mean ** 2
    aux = sum(coef[name] * losses[name] for name in ("switch", "z", "entropy", "importance"))
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    return y, aux, counts, losses


def evaluate(spec, inputs):
    """The outputs smoe_eval must produce for `inputs` (name -> numpy array), as float64 numpy."""
    t = {name: torch.tensor(a, dtype=torch.float64, requires_grad=name != "dy") for name, a in inputs.items()}
    y, aux, counts, losses = forward(spec, t)
    out = {"y": y.detach().numpy(), "aux_loss": aux.detach().numpy(), "expert_counts": counts.numpy()}
    if "dy" in t:
        wrt = ["x"] + [n for n in PARAMETERS if n in t]
        objective = (y * t["dy"]).sum() + aux
        grads = torch.autograd.grad(objective, [t[n] for n in wrt], allow_unused=True)
        for name, g in zip(wrt, grads):
            out["grad." + name] = (torch.zeros_like(t[name]) if g is None else g).detach().numpy()
    return out, {k: float(v) for k, v in losses.items()}
