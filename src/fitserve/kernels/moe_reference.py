"""Pure-torch Mixture-of-Experts: the routing and the experts, the specification the fused Triton
kernel (kernels/triton_moe.py) must match, and the CPU path.

Matches transformers' Mixtral and Qwen3-MoE blocks: router logits in the activations' dtype, a
softmax over all experts in float32, the top k of it, renormalised over the k when asked; each
chosen expert's SiLU-gated MLP on its tokens, scaled by the token's routing weight, the k results
summed (here in float32, cast once at the end).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int64), best expert first."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
            topk_ids: torch.Tensor) -> torch.Tensor:
    """x [T, H], w13 [E, 2*I, H] (gate rows, then up rows), w2 [E, H, I], topk_weights [T, k] float32,
    topk_ids [T, k] -> sum over the k of weight * down(silu(gate(x)) * up(x)) [T, H] in x's dtype.

    Loops over the experts the batch selects (one host sync for the list), each on its own tokens."""
    num_tokens, top_k = topk_ids.shape
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1)  # [T*k]: token t's j-th choice at t*k + j
    flat_weights = topk_weights.reshape(-1).float()
    for expert in flat_ids.unique().tolist():
        rows = (flat_ids == expert).nonzero().squeeze(1)  # [n] positions in the flat choices
        tokens = rows // top_k
        gate, up = F.linear(x[tokens], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert])  # [n, H] in x's dtype
        out.index_add_(0, tokens, y.float() * flat_weights[rows, None])
    return out.to(x.dtype)
