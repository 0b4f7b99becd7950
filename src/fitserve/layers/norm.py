"""RMSNorm, computed in float32 like the reference implementation, with an optional fused residual add:
Llama's form and Gemma's (1 + w) form, over hidden rows or over each head of q and k. On CUDA each is
one Triton kernel (kernels/triton_fused.py); elsewhere the torch forms of kernels/reference.py."""

from __future__ import annotations

import torch
from torch import nn

from fitserve.kernels import reference
from fitserve.kernels.dispatch import triton_fused
from fitserve.layers.weight_format import QuantizedRows


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                quantize: bool = False) -> tuple[torch.Tensor | QuantizedRows, torch.Tensor]:
        """x [T, H] -> (normed [T, H], residual [T, H]); with a residual, normalises x + residual.

        quantize: the consumer's weight format takes QuantizedRows (`fp8`); on CUDA the normed rows
        then come back quantized per token by the same kernel (elsewhere the layer quantizes them itself).
        """
        if quantize and x.is_cuda and triton_fused is not None and x.shape[1] <= triton_fused.FUSED_QUANT_MAX_COLS:
            q, scale, summed = triton_fused.rms_norm_quant(x, self.weight, self.eps, residual)
            return QuantizedRows(q, scale, x.dtype), summed
        if x.is_cuda and triton_fused is not None:
            return triton_fused.rms_norm(x, self.weight, self.eps, residual)
        return reference.rms_norm(x, self.weight, self.eps, residual)


class HeadRMSNorm(nn.Module):
    """RMSNorm over each head of q or k (Qwen3's q_norm / k_norm), weight [head_dim] shared by the heads.

    Applied before the rotary embedding, so on CUDA before PagedAttention's fused rotary + KV store;
    on CUDA one program per (token, head) reads the qkv slice in place (kernels/triton_fused.py
    qk_rms_norm; norm_q_and_k below does q and k in one launch)."""

    WEIGHT_OFFSET = 0.0  # the kernel's weight is weight + WEIGHT_OFFSET, in float32
    _reference = staticmethod(reference.rms_norm)

    def __init__(self, head_dim: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.head_dim, self.eps = head_dim, eps
        self.weight = nn.Parameter(torch.full((head_dim,), 1.0 - self.WEIGHT_OFFSET, dtype=dtype, device=device),
                                   requires_grad=False)  # the identity norm until loaded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, heads * head_dim] (a column slice of qkv allowed) -> normed [T, heads * head_dim], a new tensor."""
        if x.is_cuda and triton_fused is not None:
            return triton_fused.head_rms_norm(x, self.weight, self.eps, self.WEIGHT_OFFSET)
        normed, _ = self._reference(x.reshape(-1, self.head_dim), self.weight, self.eps)
        return normed.view(x.shape[0], -1)


def norm_q_and_k(q: torch.Tensor, k: torch.Tensor, q_norm: HeadRMSNorm,
                 k_norm: HeadRMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_norm(q), k_norm(k)); on CUDA one kernel launch for both when the two norms are of one form."""
    if (q.is_cuda and triton_fused is not None and q_norm.WEIGHT_OFFSET == k_norm.WEIGHT_OFFSET
            and q_norm.eps == k_norm.eps):
        return triton_fused.qk_rms_norm(q, k, q_norm.weight, k_norm.weight, q_norm.eps, q_norm.WEIGHT_OFFSET)
    return q_norm(q), k_norm(k)


class GemmaRMSNorm(nn.Module):
    """Gemma 2/3's RMSNorm: weight [H] as the checkpoint holds it (centred on 0), applied as (1 + weight)
    in float32 (kernels/reference.py gemma_rms_norm), with the same optional residual add as RMSNorm.

    On CUDA RMSNorm's kernels with weight offset 1 (kernels/triton_fused.py), quantizing for an fp8
    consumer as RMSNorm does; elsewhere the reference's torch ops."""

    WEIGHT_OFFSET = 1.0  # the kernels' weight is weight + 1, in float32

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                quantize: bool = False) -> tuple[torch.Tensor | QuantizedRows, torch.Tensor]:
        """x [T, H] -> (normed [T, H], residual [T, H]); with a residual, normalises x + residual.
        quantize: as RMSNorm.forward's."""
        return self.after(None, x, residual, quantize)

    def after(self, x_norm: GemmaRMSNorm | None, x: torch.Tensor, residual: torch.Tensor | None,
              quantize: bool = False) -> tuple[torch.Tensor | QuantizedRows, torch.Tensor]:
        """self(x_norm(x), residual, quantize): with x_norm, x is first normed by it (Gemma's post-attention
        or post-feedforward norm, before the residual add and the next norm); on CUDA both norms in one
        kernel (x_norm needs a residual there; without one, two)."""
        if x.is_cuda and triton_fused is not None and (x_norm is None or (x_norm.eps == self.eps and residual is not None)):
            x_weight = None if x_norm is None else x_norm.weight
            if quantize and x.shape[1] <= triton_fused.FUSED_QUANT_MAX_COLS:
                q, scale, summed = triton_fused.rms_norm_quant(x, self.weight, self.eps, residual, self.WEIGHT_OFFSET,
                                                               x_weight)
                return QuantizedRows(q, scale, x.dtype), summed
            return triton_fused.rms_norm(x, self.weight, self.eps, residual, self.WEIGHT_OFFSET, x_weight)
        if x_norm is not None:
            x, _ = x_norm(x)
        return reference.gemma_rms_norm(x, self.weight, self.eps, residual)


class GemmaHeadRMSNorm(HeadRMSNorm):
    """GemmaRMSNorm over each head of q or k (Gemma 3's q_norm / k_norm), weight [head_dim] centred on 0;
    on CUDA HeadRMSNorm's kernel with weight offset 1."""

    WEIGHT_OFFSET = 1.0
    _reference = staticmethod(reference.gemma_rms_norm)
