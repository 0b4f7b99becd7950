"""A Mixture-of-Experts MLP (Mixtral, Qwen3-MoE): a router and E SiLU-gated expert MLPs, k per token.

The router is a linear layer hidden -> num_experts whose softmax picks each token's top k experts
(kernels/moe_reference.py `route`). The experts' weights are stacked, one tensor for all of them:
`w13` [E, 2*I, H] (each expert's gate rows, then its up rows) and `w2` [E, H, I], filled from the
checkpoint's per-expert tensors (`load_expert`). On CUDA the experts run in the fused Triton kernel
(kernels/triton_moe.py: tokens grouped by expert, one grouped GEMM per projection); on the CPU in
the pure-torch reference, which loops over the experts the batch selects.

Tensor parallelism splits every expert as the dense MLP is split (layers/parallel.py): a rank holds
I/N columns of each expert's gate and up and the same columns of its down, for all E experts; the
router is replicated (so every rank routes alike), and the partial outputs are all-reduced.

Expert weights stay in the serving dtype whatever `--quantization` (the weight formats quantize
the attention and dense-MLP projections); the router does too.
"""

from __future__ import annotations

import torch
from torch import nn

from fitserve.kernels import fp8, moe_reference
from fitserve.kernels.dispatch import triton_moe
from fitserve.layers.linear import linear
from fitserve.layers.parallel import SINGLE, TensorParallel

GATE, UP, DOWN = "gate", "up", "down"  # an expert's three projections, as load_expert names them


class MoE(nn.Module):
    """forward(x [T, H]) -> [T, H]; `intermediate_size` is this rank's columns of each expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, renormalize: bool,
                 dtype: torch.dtype, device: torch.device, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.top_k, self.renormalize, self.tp = top_k, renormalize, tp
        self.intermediate_size = intermediate_size

        def empty(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)

        self.router = empty(num_experts, hidden_size)  # [E, H]
        self.w13 = empty(num_experts, 2 * intermediate_size, hidden_size)  # [E, 2*I, H]
        self.w2 = empty(num_experts, hidden_size, intermediate_size)  # [E, H, I]

    @property
    def num_experts(self) -> int:
        return self.router.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_logits = linear(x, self.router)  # [T, E]
        if x.is_cuda and triton_moe is not None:
            topk_weights, topk_ids = triton_moe.route(router_logits, self.top_k, self.renormalize)
            out = triton_moe.fused_moe(x, self.w13, self.w2, topk_weights, topk_ids)
        else:
            topk_weights, topk_ids = moe_reference.route(router_logits, self.top_k, self.renormalize)
            out = moe_reference.experts(x, self.w13, self.w2, topk_weights, topk_ids)
        return self.tp.all_reduce(out)

    @torch.no_grad()
    def load_router(self, tensor: torch.Tensor) -> None:
        _check_shape("router", tensor, tuple(self.router.shape))
        self.router.copy_(tensor)

    @torch.no_grad()
    def load_expert(self, expert: int, projection: str, tensor: torch.Tensor) -> None:
        """One expert's gate or up [I, H] or down [H, I], already this rank's slice. ValueError for a
        wrong expert, shape or an fp8 tensor (expert weights are read in the serving dtype only)."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} of a layer of {self.num_experts}")
        if fp8.is_fp8(tensor.dtype):
            raise ValueError("expert weights stored in fp8 are not supported (experts stay in --dtype)")
        inter = self.intermediate_size
        if projection == DOWN:
            target = self.w2[expert]
        else:
            start = 0 if projection == GATE else inter
            target = self.w13[expert, start:start + inter]
        _check_shape(f"expert {expert} {projection}", tensor, tuple(target.shape))
        target.copy_(tensor)


def _check_shape(what: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{what}: expected {shape}, got {tuple(tensor.shape)}")
