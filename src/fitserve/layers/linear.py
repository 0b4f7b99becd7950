"""The matmul of unquantized weights, and the token embedding; weights are created empty on the
target device (no CPU init of big models). The linear layers themselves are weight formats:
layers/weight_format.py, layers/formats/."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fitserve.kernels import cpu_matmul
from fitserve.kernels.dispatch import triton_gemv


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T. One CUDA row (single-stream decode) takes the Triton GEMV, which reads the
    weight faster than cuBLAS does at one row (kernels/triton_gemv.py); the rest is cuBLAS. On a CPU
    without bf16 units a bf16 matmul of several rows is done in float32 (kernels/cpu_matmul.py)."""
    if triton_gemv is not None and triton_gemv.supports(x, weight):
        return triton_gemv.gemv(x, weight)
    if cpu_matmul.takes_widened_path(x, weight):
        return cpu_matmul.linear_bf16_widened(x, weight)
    return F.linear(x, weight)


class Embedding(nn.Module):
    """Token embedding, weight [vocab_size, hidden_size]."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)
