"""Activations: SiLU-and-multiply (or Gemma's GELU-tanh-and-multiply) of the merged gate/up projection."""

from __future__ import annotations

import torch

from fitserve.kernels import reference
from fitserve.kernels.dispatch import triton_fused
from fitserve.layers.weight_format import QuantizedRows


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2*I] (gate rows first, as the merged gate_up projection writes them) -> [T, I]."""
    if gate_up.is_cuda and triton_fused is not None:
        return triton_fused.silu_and_mul(gate_up)
    return reference.silu_and_mul(gate_up)


def silu_and_mul_for_fp8(gate_up: torch.Tensor) -> torch.Tensor | QuantizedRows:
    """silu_and_mul for a layer whose weight format takes QuantizedRows (`fp8`): on CUDA quantized
    per token in the same kernel."""
    if gate_up.is_cuda and triton_fused is not None and gate_up.shape[1] // 2 <= triton_fused.FUSED_QUANT_MAX_COLS:
        q, scale = triton_fused.silu_and_mul_quant(gate_up)
        return QuantizedRows(q, scale, gate_up.dtype)
    return silu_and_mul(gate_up)


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2*I] -> gelu_tanh(gate) * up [T, I] (Gemma 2/3): one Triton kernel on CUDA, the
    reference's torch ops elsewhere."""
    if gate_up.is_cuda and triton_fused is not None:
        return triton_fused.gelu_tanh_and_mul(gate_up)
    return reference.gelu_tanh_and_mul(gate_up)


def gelu_tanh_and_mul_for_fp8(gate_up: torch.Tensor) -> torch.Tensor | QuantizedRows:
    """gelu_tanh_and_mul for a layer whose weight format takes QuantizedRows (`fp8`), as silu_and_mul_for_fp8."""
    if gate_up.is_cuda and triton_fused is not None and gate_up.shape[1] // 2 <= triton_fused.FUSED_QUANT_MAX_COLS:
        q, scale = triton_fused.gelu_tanh_and_mul_quant(gate_up)
        return QuantizedRows(q, scale, gate_up.dtype)
    return gelu_tanh_and_mul(gate_up)
