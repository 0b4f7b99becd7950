"""Activations: SiLU-and-multiply of the merged gate/up projection."""

from __future__ import annotations

import torch

from fitserve.kernels import reference
from fitserve.kernels.dispatch import triton_fused


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2*I] (gate rows first, as the merged gate_up projection writes them) -> [T, I]."""
    if gate_up.is_cuda and triton_fused is not None:
        return triton_fused.silu_and_mul(gate_up)
    return reference.silu_and_mul(gate_up)
