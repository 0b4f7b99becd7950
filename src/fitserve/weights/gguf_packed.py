"""A GGUF file's tensors for `--quantization gguf`: the block projections as their packed bytes.

Each projection stored in a block type (plan/gguf_bytes.py PACKED_TYPES) arrives as a
`PackedGgufTensor`: its rows [N, K / block_elements * block_bytes] of uint8, copied from the file
as stored, with q and k rows moved into HF's rope layout (a row's blocks run along K, so rows
move whole). Every other tensor (norms, embeddings, a projection in F16/F32) is dequantized to
float32 as weights/loader.py gguf_weights gives it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from fitserve.config import EngineConfig
from fitserve.plan.gguf_bytes import PACKED_TYPES, gguf_quantization, is_projection, packed_linear_bytes
from fitserve.plan.shapes import ParamCounts, resolve_dtype, with_packed_linears
from fitserve.weights.source import ModelSource

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PackedGgufTensor:
    """One projection's packed GGUF blocks, handed to a layer in place of a weight tensor."""

    data: torch.Tensor  # [N, row_bytes] uint8, rows in HF order
    ggml_type: int  # gguf.GGMLQuantizationType value
    type_name: str  # "Q4_K"
    shape: tuple[int, int]  # the weight it encodes: [N, K]

    def split_rows(self, num_rows: list[int]) -> list[PackedGgufTensor]:
        """The tensor cut into consecutive row blocks (a fused projection's parts: Phi-3's attn_qkv); a
        row's blocks run along K, so each part is whole packed rows."""
        return [replace(self, data=part, shape=(part.shape[0], self.shape[1]))
                for part in self.data.split(num_rows, dim=0)]


def gguf_packed_weights(source: ModelSource) -> Iterator[tuple[str, torch.Tensor | PackedGgufTensor]]:
    """HF-named tensors of a GGUF file: PackedGgufTensor for block projections, float32 otherwise.
    ConfigError here, when called, for a projection in a type fitserve cannot keep packed."""
    from fitserve.weights.gguf_file import open_gguf
    reader = open_gguf(source.weights_path)
    packed_linear_bytes(reader)  # the type check, before the first tensor is read
    return _packed_tensors(reader, source)


def _packed_tensors(reader: Any, source: ModelSource) -> Iterator[tuple[str, torch.Tensor | PackedGgufTensor]]:
    from fitserve.weights.gguf_file import hf_name_function, rope_rows_permuted, unpermute_rope_rows
    from fitserve.weights.gguf_moe import per_expert
    from fitserve.weights.loader import dequantized_gguf_tensor
    arch = source.arch
    to_hf_name, permuted = hf_name_function(arch), rope_rows_permuted(arch)
    for tensor in reader.tensors:
        name = to_hf_name(tensor.name)
        if name is None:
            continue
        if not (is_projection(tensor.name) and tensor.tensor_type.name in PACKED_TYPES):
            yield from per_expert(name, dequantized_gguf_tensor(tensor, name, source))  # experts: dequantized
            continue
        num_rows, in_features = (int(d) for d in reversed(tensor.shape.tolist()))
        rows = np.asarray(tensor.data, dtype=np.uint8).reshape(num_rows, -1)
        if permuted and name.endswith("self_attn.q_proj.weight"):
            rows = unpermute_rope_rows(rows, arch.num_attention_heads)
        elif permuted and name.endswith("self_attn.k_proj.weight"):
            rows = unpermute_rope_rows(rows, arch.num_key_value_heads)
        data = torch.from_numpy(np.array(rows, copy=True, order="C"))  # the file is a read-only memmap
        yield name, PackedGgufTensor(data, int(tensor.tensor_type), tensor.tensor_type.name, (num_rows, in_features))


def with_gguf_quantization(config: EngineConfig, source: ModelSource, on_gpu: bool,
                           cpu_bf16_units: bool = False) -> EngineConfig:
    """The config to serve `source` with: a .gguf model's --quantization gguf by default on a GPU, and on
    a CPU with bf16 units (AVX512_BF16 or AMX: kernels/cpu_matmul.py) serving bf16 (plan/gguf_bytes.py
    gguf_quantization); logs how the GGUF weights are held. A dummy in the Q4_K_M layout
    (weights/dummy_layouts.py) keeps its --quantization gguf."""
    if source.dummy_layout == "gguf":
        return config
    gguf_path = source.weights_path if source.kind == "gguf" else None
    cpu_bf16 = not on_gpu and resolve_dtype(config.dtype) == "bfloat16"
    quantization = gguf_quantization(config.quantization, gguf_path, on_gpu, config.tensor_parallel_size,
                                     cpu_int4=cpu_bf16 and cpu_bf16_units)
    if gguf_path is not None:
        if quantization == "gguf" and cpu_bf16:
            logger.info("GGUF weights: Q4_0/Q4_1/Q4_K projections in torch's int4 CPU layout for decode steps of up "
                        "to 8 rows, and every projection dequantized to bf16 for larger steps (--quantization gguf%s)",
                        "" if config.quantization else ", the default on a CPU with bf16 units")
        elif quantization == "gguf":
            logger.info("GGUF weights: block projections kept packed (--quantization gguf%s)",
                        "" if config.quantization else ", the default on CUDA")
        else:
            logger.info("GGUF weights: dequantized at load to the serving dtype (--quantization %s)",
                        quantization or "left out; --quantization gguf keeps them packed")
    return config if quantization == config.quantization else replace(config, quantization=quantization)


def gguf_param_counts(counts: ParamCounts, source: ModelSource, quantization: str | None) -> ParamCounts:
    """`counts` with the packed projections' bytes from the file's header under --quantization gguf."""
    if quantization != "gguf" or source.kind != "gguf":
        return counts
    from fitserve.weights.gguf_file import open_gguf
    packed = packed_linear_bytes(open_gguf(source.weights_path))
    return with_packed_linears(counts, packed.packed_params, packed.packed_bytes, extra_16bit=packed.extra_16bit)
