"""Linear layers whose weights are created empty on the target device (no CPU init of big models)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fitserve.kernels.dispatch import triton_gemv


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T. One CUDA row (single-stream decode) takes the Triton GEMV, which reads the
    weight faster than cuBLAS does at one row (kernels/triton_gemv.py); the rest is cuBLAS."""
    if triton_gemv is not None and triton_gemv.supports(x, weight):
        return triton_gemv.gemv(x, weight)
    return F.linear(x, weight)


class Linear(nn.Module):
    """y = x @ W.T with W [out_features, in_features]; no bias (Llama has none).

    A merged projection (qkv, gate_up) is one Linear whose out_features is the sum of its
    parts; `shard_sizes` names the row ranges the loader fills from separate checkpoint tensors.
    """

    def __init__(self, in_features: int, out_features: int | tuple[int, ...],
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.shard_sizes = out_features if isinstance(out_features, tuple) else (out_features,)
        total = sum(self.shard_sizes)
        self.weight = nn.Parameter(torch.empty(total, in_features, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)

    def load_shard(self, shard_index: int, loaded: torch.Tensor) -> None:
        """Copy one checkpoint tensor [shard_rows, in_features] into its row range."""
        start = sum(self.shard_sizes[:shard_index])
        rows = self.shard_sizes[shard_index]
        if tuple(loaded.shape) != (rows, self.weight.shape[1]):
            raise ValueError(f"shard {shard_index}: expected {(rows, self.weight.shape[1])}, got {tuple(loaded.shape)}")
        if loaded.dtype.itemsize == 1:  # an fp8 tensor means nothing without its scale (Fp8Linear reads both)
            raise ValueError(f"shard {shard_index} is {loaded.dtype}: an fp8 checkpoint needs --quantization fp8")
        self.weight.data[start:start + rows].copy_(loaded)


class Embedding(nn.Module):
    """Token embedding, weight [vocab_size, hidden_size]."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)
