"""RMSNorm, computed in float32 like the reference implementation, with an optional fused residual add."""

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
    the same kernel as RMSNorm, over [T * heads, head_dim] rows."""

    def __init__(self, head_dim: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.head_dim, self.eps = head_dim, eps
        self.weight = nn.Parameter(torch.ones(head_dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, heads * head_dim] (a column slice of qkv allowed) -> normed [T, heads * head_dim], a new tensor."""
        rows = x.reshape(-1, self.head_dim)  # copies a strided slice: the kernel wants unit column stride
        if rows.is_cuda and triton_fused is not None:
            normed, _ = triton_fused.rms_norm(rows.contiguous(), self.weight, self.eps)
        else:
            normed, _ = reference.rms_norm(rows, self.weight, self.eps)
        return normed.view(x.shape[0], -1)


class GemmaRMSNorm(nn.Module):
    """Gemma 2/3's RMSNorm: weight [H] as the checkpoint holds it (centred on 0), applied as (1 + weight)
    in float32 (kernels/reference.py gemma_rms_norm), with the same optional residual add as RMSNorm.

    Torch ops on every device (no fused kernel for this form yet); an fp8 consumer quantizes the
    output itself."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (normed [T, H], residual [T, H]); with a residual, normalises x + residual."""
        return reference.gemma_rms_norm(x, self.weight, self.eps, residual)


class GemmaHeadRMSNorm(GemmaRMSNorm):
    """GemmaRMSNorm over each head of q or k (Gemma 3's q_norm / k_norm), weight [head_dim]."""

    def __init__(self, head_dim: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(head_dim, eps, dtype, device)
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor, residual: None = None) -> torch.Tensor:  # type: ignore[override]
        """x [T, heads * head_dim] (a column slice of qkv allowed) -> normed [T, heads * head_dim], a new tensor."""
        normed, _ = reference.gemma_rms_norm(x.reshape(-1, self.head_dim), self.weight, self.eps)
        return normed.view(x.shape[0], -1)
