"""The model seam: what an architecture module under models/ provides, and what it is built with.

An architecture is one module (models/llama.py is the example) holding a class that satisfies
`CausalLM`, registered under its Hugging Face architecture name in models/registry.py. The
class is built as `cls(arch, dtype, device, quantization=..., tp=..., fuse_rotary_store=...)`
(`ModelClass`); it makes its linear layers through `LayerBuild.linear` (the weight-format
seam, layers/weight_format.py), so it never looks at the format, and maps the checkpoint's
HF tensor names onto its parameters in `load_weights`. models/loader.py does the rest for every
architecture: reading GGUF or safetensors (only this rank's slice, `checkpoint_slice`), dummy
weights (`checkpoint_tensor_shapes`), the missing-tensor check and finishing the layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from fitserve.arch_config import ArchConfig
from fitserve.forward_batch import ForwardBatch
from fitserve.layers.formats.registry import get_weight_format
from fitserve.layers.parallel import SINGLE, TensorParallel, TensorShard
from fitserve.layers.weight_format import LinearLayer, WeightFormat


@dataclass(frozen=True, slots=True)
class LayerBuild:
    """What every layer of one model is built with."""

    dtype: torch.dtype  # the serving dtype: activations, embeddings, norms
    device: torch.device
    weight_format: WeightFormat  # the blocks' linear layers (embeddings and lm_head stay in dtype)
    tp: TensorParallel = SINGLE
    fuse_rotary_store: bool = True  # layers/attention.py PagedAttention: rotary + KV store in one CUDA kernel

    @classmethod
    def for_model(cls, dtype: torch.dtype, device: torch.device, quantization: str | WeightFormat | None,
                  tp: TensorParallel, fuse_rotary_store: bool) -> LayerBuild:
        """The build of a model's blocks: `quantization`'s format in the form it takes on `device`
        (fp8 on a GPU without fp8 tensor cores: weight-only)."""
        return cls(dtype, device, get_weight_format(quantization).for_device(device), tp, fuse_rotary_store)

    def linear(self, in_features: int, out_features: int | tuple[int, ...]) -> LinearLayer:
        """A block's projection [sum(out_features), in_features] in the model's weight format."""
        return self.weight_format.create(in_features, out_features, self.dtype, self.device)


class CausalLM(Protocol):
    """A causal LM over a flat token batch (an nn.Module)."""

    full_arch: ArchConfig  # the whole model
    arch: ArchConfig  # this rank's shard (ArchConfig.shard)
    dtype: torch.dtype
    device: torch.device

    def __call__(self, batch: ForwardBatch) -> torch.Tensor:
        """The final hidden states [T, H] of every fed token (nn.Module calls forward)."""
        ...

    def bind_kv_cache(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                      kv_groups: list[int] | None = None) -> None:
        """Per layer (K, V), each [num_blocks, block_size, num_kv_heads, head_dim], and the KV cache group
        whose block table it reads (None: all group 0); owned by the runner."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, vocab] float32."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named checkpoint tensors (weights and, quantized, their scales) into the
        parameters; returns the names taken. ValueError for a tensor of the wrong name or shape."""
        ...

    def checkpoint_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every HF-named weight of a complete unquantized checkpoint and its full shape."""
        ...

    def checkpoint_slice(self, hf_name: str) -> TensorShard | None:
        """This rank's slice of a checkpoint tensor; None when the rank holds all of it."""
        ...

    def expected_weight_names(self) -> set[str]:
        """HF names a complete checkpoint provides (for the missing-tensor check)."""
        ...

    def eval(self) -> CausalLM: ...

    def named_modules(self) -> Iterable[tuple[str, torch.nn.Module]]: ...


class ModelClass(Protocol):
    """How models/registry.py builds an architecture."""

    def __call__(self, arch: ArchConfig, dtype: torch.dtype, device: torch.device, *,
                 quantization: str | None = None, tp: TensorParallel = SINGLE,
                 fuse_rotary_store: bool = True) -> CausalLM: ...
