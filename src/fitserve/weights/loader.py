"""Weight readers: HF-named tensors from a GGUF file or a safetensors checkpoint folder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fitserve.config import ConfigError
from fitserve.weights.source import ModelSource


# A GGUF tensor's raw data, its GGML type and its [out, in] shape -> float32 values, or None for a type it
# does not take. models/loader.py passes kernels/gguf.py's torch dequantization (bit-identical to gguf's
# numpy one, about 4x faster: weights/ does not import kernels/); without one, gguf's numpy code runs.
BlockDequantizer = Callable[[np.ndarray, int, tuple[int, ...]], "np.ndarray | None"]


def gguf_weights(source: ModelSource, dequantize_blocks: BlockDequantizer | None = None,
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named float32 tensors [out, in] dequantized from a GGUF file, q/k rows in HF's rope layout, experts
    one by one."""
    from fitserve.weights import gguf_file, gguf_moe
    reader = gguf_file.open_gguf(source.weights_path)
    to_hf_name = gguf_file.hf_name_function(source.arch)
    for tensor in reader.tensors:
        name = to_hf_name(tensor.name)
        if name is not None:  # a stacked experts tensor [E, ...] goes on as E tensors, one per expert
            yield from gguf_moe.per_expert(name, dequantized_gguf_tensor(tensor, name, source, dequantize_blocks))


def dequantized_gguf_tensor(tensor: Any, name: str, source: ModelSource,
                            dequantize_blocks: BlockDequantizer | None = None) -> torch.Tensor:
    """One GGUF tensor (a gguf ReaderTensor, HF name `name`) as float32 [out, in] (a bias [out]): a llama
    file's rope rows unpermuted, a Gemma 2/3 file's norms back to transformers' w (gemma3_norm_from_gguf)."""
    from gguf.quants import dequantize

    from fitserve.weights import gguf_file
    arch = source.arch
    # ggml lists dims fastest first (ne0 = in_features); numpy's shape is the reverse: [out, in]
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    values = None if dequantize_blocks is None else dequantize_blocks(tensor.data, int(tensor.tensor_type), shape)
    if values is None:
        values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
    if gguf_file.norms_shifted(arch):
        values = gguf_file.gemma3_norm_from_gguf(name, values)
    elif gguf_file.rope_rows_permuted(arch) and name.endswith("self_attn.q_proj.weight"):
        values = gguf_file.unpermute_rope_rows(values, arch.num_attention_heads)
    elif gguf_file.rope_rows_permuted(arch) and name.endswith("self_attn.k_proj.weight"):
        values = gguf_file.unpermute_rope_rows(values, arch.num_key_value_heads)
    if not values.flags.writeable or not values.flags.c_contiguous:  # F32 tensors are read-only memmaps
        values = np.array(values, copy=True, order="C")
    return torch.from_numpy(values)


class Slice(Protocol):
    """A part of a tensor along one dimension (layers.parallel.TensorShard)."""

    dim: int
    start: int
    length: int


def safetensors_weights(folder: str | None, select: Callable[[str], Slice | None] | None = None,
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors from every *.safetensors file of a checkpoint folder; with `select`, a
    tensor it names a slice of is read only as that slice (a tensor-parallel rank's part)."""
    from safetensors import safe_open
    files = sorted(Path(folder or ".").glob("*.safetensors"))
    if not files:
        raise ConfigError(f"No *.safetensors files in {folder!r} (fitserve does not read .bin checkpoints).")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                part = select(key) if select is not None else None
                if part is None:
                    yield key, f.get_tensor(key)
                    continue
                index = [slice(None)] * part.dim + [slice(part.start, part.start + part.length)]
                yield key, f.get_slice(key)[tuple(index)]
