"""The unquantized weight format: bf16, fp16 or fp32 weights in the serving dtype (no --quantization).

The matmul is layers/linear.py `linear()`: the Triton GEMV for one CUDA row, cuBLAS otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fitserve.layers.linear import linear
from fitserve.layers.weight_format import WEIGHT, LinearLayer, WeightFormat, WeightSpec

FP8_CHECKPOINT_NEEDS = "an fp8 checkpoint needs --quantization fp8 or fp8_per_tensor"


class Linear(LinearLayer):
    """y = x @ W.T with W [out_features, in_features] in the serving dtype (also lm_head's layer)."""

    def __init__(self, in_features: int, out_features: int | tuple[int, ...],
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(UNQUANTIZED, in_features, out_features, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)

    def load(self, shard_index: int, piece: str, tensor: torch.Tensor) -> None:
        """Copy one checkpoint weight [shard_rows, in_features] into its row range."""
        if piece != WEIGHT:  # a scale: the checkpoint is quantized
            raise ValueError(FP8_CHECKPOINT_NEEDS)
        self.check_shard_shape(shard_index, tensor)
        if tensor.dtype.itemsize == 1:  # an fp8 tensor means nothing without its scale (the fp8 format reads both)
            raise ValueError(f"shard {shard_index} is {tensor.dtype}: an fp8 checkpoint needs --quantization fp8")
        start, rows = self.shard_rows(shard_index)
        self.weight.data[start:start + rows].copy_(tensor)


@dataclass(frozen=True, slots=True)
class UnquantizedFormat(WeightFormat):
    name: str = "unquantized"
    fused_input_quantization: bool = False

    def weight_specs(self, in_features: int, shard_sizes: tuple[int, ...], dtype: torch.dtype
                     ) -> tuple[WeightSpec, ...]:
        return (WeightSpec(WEIGHT, (sum(shard_sizes), in_features), dtype),)

    def create(self, in_features: int, out_features: int | tuple[int, ...], dtype: torch.dtype,
               device: torch.device) -> Linear:
        return Linear(in_features, out_features, dtype, device)


UNQUANTIZED = UnquantizedFormat()
