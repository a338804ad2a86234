"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models") in Python, independent
of the C++ router smoe::HashRouter.

    expert(id) = philox4x32(seed, uint64(id))[0] mod E     (philox.py; negative ids: bit pattern)
    K = 1, gate 1, no logits, no router loss, nothing differentiable.

t["ids"]: int64 tensor [T] of token ids. spec keys: n_experts, seed (default 0).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import philox  # noqa: E402


def route(spec, t, x, mode):
    E, seed = spec["n_experts"], spec.get("seed", 0)
    token_ids = t["ids"].reshape(-1).tolist()
    if len(token_ids) != x.shape[0]:
        raise ValueError(f"token ids: expected {x.shape[0]}, got {len(token_ids)}")
    ids = torch.tensor([[philox.philox4x32(seed, int(i))[0] % E] for i in token_ids], dtype=torch.long)
    ids = ids.reshape(x.shape[0], 1)
    gates = torch.ones(x.shape[0], 1, dtype=torch.float64)
    return ids, gates, None, torch.zeros((), dtype=torch.float64)


if __name__ == "__main__":
    philox.self_check()
    # Values printed by the C++ library (seed 3, E = 8), also pinned in test_router_noisy_hash.cpp.
    x = torch.zeros(6, 2, dtype=torch.float64)
    ids, gates, logits, aux = route({"n_experts": 8, "seed": 3},
                                    {"ids": torch.tensor([0, 1, 2, -1, -5, 123456789], dtype=torch.int64)}, x, "train")
    assert ids.reshape(-1).tolist() == [7, 1, 6, 5, 7, 0], ids
    assert gates.tolist() == [[1.0]] * 6 and logits is None and aux.item() == 0.0
    print("ref_hash.py: matches the C++ values")
