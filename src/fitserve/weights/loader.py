"""load_model: build the model on its device and fill it from GGUF, safetensors, or random values."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fitserve.config import ConfigError
from fitserve.models.llama import LlamaForCausalLM
from fitserve.models.registry import get_model_class
from fitserve.weights.source import ModelSource

DUMMY_INIT_STD = 0.02  # small enough that 32 random layers keep activations finite in bf16
DUMMY_SEED = 0


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device, progress: bool = True) -> LlamaForCausalLM:
    model_class = get_model_class(source.arch.architecture)
    model = model_class(source.arch, dtype, device)
    if source.kind == "dummy":
        _init_dummy(model)
    else:
        weights = gguf_weights(source) if source.kind == "gguf" else safetensors_weights(source.weights_path)
        bar = tqdm(weights, total=len(model.expected_weight_names()), desc=f"Loading {source.name}", unit="tensor", disable=not progress)
        loaded = model.load_weights(bar)
        missing = model.expected_weight_names() - loaded
        if missing:
            raise ConfigError(f"The checkpoint {source.weights_path} lacks {len(missing)} tensors, "
                              f"e.g. {sorted(missing)[:3]}.")
    return model.eval()


@torch.no_grad()
def _init_dummy(model: LlamaForCausalLM) -> None:
    """Random weights drawn on the model's device (no host copy), norms at one; deterministic."""
    generator = torch.Generator(device=model.device).manual_seed(DUMMY_SEED)
    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "norm.weight":
            param.fill_(1.0)
        else:
            param.normal_(0.0, DUMMY_INIT_STD, generator=generator)


def gguf_weights(source: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named float32 tensors [out, in] dequantized from a GGUF file, q/k rows in HF's rope layout."""
    from gguf.quants import dequantize

    from fitserve.weights.gguf_file import hf_tensor_name, open_gguf, unpermute_rope_rows
    reader = open_gguf(source.weights_path)
    arch = source.arch
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            continue
        # ggml lists dims fastest first (ne0 = in_features); numpy's shape is the reverse: [out, in]
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        if name.endswith("self_attn.q_proj.weight"):
            values = unpermute_rope_rows(values, arch.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            values = unpermute_rope_rows(values, arch.num_key_value_heads)
        if not values.flags.writeable or not values.flags.c_contiguous:  # F32 tensors are read-only memmaps
            values = np.array(values, copy=True, order="C")
        yield name, torch.from_numpy(values)


def safetensors_weights(folder: str | None) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors from every *.safetensors file of a checkpoint folder."""
    from safetensors import safe_open
    files = sorted(Path(folder or ".").glob("*.safetensors"))
    if not files:
        raise ConfigError(f"No *.safetensors files in {folder!r} (fitserve does not read .bin checkpoints).")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
