"""The weight-format seam: how a linear layer's weights are created, loaded and applied.

A weight format (layers/formats/: `unquantized` for bf16/fp16/fp32, `fp8` for `--quantization
fp8` and `fp8_per_tensor`) is one module holding a `WeightFormat` and the `LinearLayer` it
builds. The format says which tensors a layer of a given shape holds (`weight_specs`: names,
shapes, dtypes, hence bytes); the layer allocates exactly those, takes checkpoint tensors as
they arrive (`load`: the weight and, for a quantized checkpoint, its scales), checks it is whole
(`finish_loading`) and multiplies (`forward`). Models build their projections through
`layers/formats/registry.py` `make_linear` and never look at the format again: the one thing a
model asks is `fused_input_quantization`, whether the norm or SiLU before a layer should hand it
per-token fp8 rows (`QuantizedRows`) straight from its kernel.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

# What a checkpoint tensor of a linear layer is, by the last part of its name: the weight, or
# (an fp8 checkpoint, weights/fp8_checkpoint.py) its weight scale or static input scale.
WEIGHT = "weight"
WEIGHT_SCALE = "weight_scale"
INPUT_SCALE = "input_scale"
CHECKPOINT_PIECES = (WEIGHT, WEIGHT_SCALE, INPUT_SCALE)
# An integer checkpoint's tensors of a linear layer (formats/int_quant.py): GPTQ and AWQ's, then
# compressed-tensors' (whose weight_scale is the int scales: the layer's format reads it)
INT_CHECKPOINT_PIECES = ("qweight", "qzeros", "scales", "g_idx", "weight_packed", "weight_zero_point",
                         "weight_g_idx", "weight_shape")


@dataclass(frozen=True, slots=True)
class WeightSpec:
    """One tensor a linear layer of some format holds (a parameter of that name)."""

    name: str  # the parameter's name on the layer: "weight", "weight_scale"
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def num_bytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class QuantizedRows:
    """Activations a fused kernel already quantized per token (RMSNorm, SiLU-and-multiply on CUDA),
    handed to a layer whose format has `fused_input_quantization` in place of a tensor: the bytes
    triton_fp8.quantize_per_token would produce, without its kernel and the model-dtype write before it."""

    q: torch.Tensor  # [T, K] float8_e4m3fn
    scale: torch.Tensor  # [T, 1] float32
    dtype: torch.dtype  # the model dtype, which the GEMM outputs

    @property
    def is_cuda(self) -> bool:
        return self.q.is_cuda


class LinearLayer(nn.Module):
    """y = x @ W.T for W [out_features, in_features] in some weight format; no bias (Llama has none).

    A merged projection (qkv, gate_up) is one layer whose out_features is the sum of its parts;
    `shard_sizes` names the row ranges the loader fills from separate checkpoint tensors.
    The parameters are the format's `weight_specs`, created empty on the target device.
    """

    def __init__(self, weight_format: WeightFormat, in_features: int, out_features: int | tuple[int, ...],
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.shard_sizes = out_features if isinstance(out_features, tuple) else (out_features,)
        self.in_features, self.out_features = in_features, sum(self.shard_sizes)
        self.dtype = dtype  # the serving dtype: activations in and out
        for spec in weight_format.weight_specs(in_features, self.shard_sizes, dtype):
            self.register_parameter(spec.name, nn.Parameter(
                torch.empty(spec.shape, dtype=spec.dtype, device=device), requires_grad=False))

    def shard_rows(self, shard_index: int) -> tuple[int, int]:
        """(first row, number of rows) of one checkpoint tensor in the merged weight."""
        return sum(self.shard_sizes[:shard_index]), self.shard_sizes[shard_index]

    def check_shard_shape(self, shard_index: int, loaded: torch.Tensor) -> None:
        rows = self.shard_sizes[shard_index]
        if tuple(loaded.shape) != (rows, self.in_features):
            raise ValueError(f"shard {shard_index}: expected {(rows, self.in_features)}, got {tuple(loaded.shape)}")

    def load(self, shard_index: int, piece: str, tensor: torch.Tensor) -> None:
        """One checkpoint tensor: shard `shard_index`'s `piece` (one of CHECKPOINT_PIECES).
        ValueError for a tensor this format cannot take (the loader names the checkpoint)."""
        raise NotImplementedError

    def finish_loading(self) -> None:
        """After the checkpoint: ValueError when a shard is incomplete (formats that track them)."""

    def load_shard(self, shard_index: int, loaded: torch.Tensor) -> None:
        """One checkpoint weight [shard_rows, in_features] into its row range."""
        self.load(shard_index, WEIGHT, loaded)

    def load_full(self, weight: torch.Tensor) -> None:
        """The whole merged weight [out_features, in_features] at once (tests, benchmarks)."""
        for index in range(len(self.shard_sizes)):
            start, rows = self.shard_rows(index)
            self.load_shard(index, weight[start:start + rows])


class WeightFormat(ABC):
    """One way of storing a linear layer's weights. Subclasses are frozen dataclasses."""

    name: str  # the --quantization value that selects it ("unquantized": left out)
    # Whether the layer takes QuantizedRows from the norm / SiLU-and-multiply before it (fp8 per token)
    fused_input_quantization: bool

    @abstractmethod
    def weight_specs(self, in_features: int, shard_sizes: tuple[int, ...], dtype: torch.dtype
                     ) -> tuple[WeightSpec, ...]:
        """The tensors a layer [sum(shard_sizes), in_features] holds when serving in `dtype`."""

    @abstractmethod
    def create(self, in_features: int, out_features: int | tuple[int, ...], dtype: torch.dtype,
               device: torch.device) -> LinearLayer:
        """An empty layer on `device`, to be filled by `load`."""

    def describe(self) -> str:
        """How the start-up log names it."""
        return self.name

    def for_device(self, device: torch.device) -> WeightFormat:
        """The form this format takes on `device` (fp8 on a GPU without fp8 tensor cores: weight-only)."""
        return self

    def weight_bytes(self, in_features: int, shard_sizes: tuple[int, ...], dtype: torch.dtype) -> int:
        """Device bytes of one layer's weights (with scales): what memory planning counts."""
        return sum(spec.num_bytes for spec in self.weight_specs(in_features, shard_sizes, dtype))
