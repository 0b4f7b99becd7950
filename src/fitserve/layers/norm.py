"""RMSNorm, computed in float32 like the reference implementation, with an optional fused residual add."""

from __future__ import annotations

import torch
from torch import nn

from fitserve.kernels import reference
from fitserve.kernels.dispatch import triton_fused


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (normed [T, H], residual [T, H]); with a residual, normalises x + residual."""
        if x.is_cuda and triton_fused is not None:
            return triton_fused.rms_norm(x, self.weight, self.eps, residual)
        return reference.rms_norm(x, self.weight, self.eps, residual)
