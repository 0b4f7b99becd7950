"""GGUF files of Phi-3 (`phi3`), as llama.cpp's converter writes them (torch-free).

The converter keeps Phi-3's fused projections: `blk.N.attn_qkv.weight` holds transformers'
`self_attn.qkv_proj` ([q rows | k rows | v rows], hidden) and `blk.N.ffn_up.weight` its
`mlp.gate_up_proj` ([gate rows | up rows], hidden); models/phi3.py splits both at load, as for a
safetensors checkpoint. The q/k rows are not permuted (Phi-3's rope is the half-split NEOX one).

LongRoPE (Phi-3-mini-128k, Phi-3.5, Phi-3-medium-128k; longrope.py): the converter writes the two
factor lists as tensors, `rope_factors_long.weight` and `rope_factors_short.weight` (float32
[rotary_dim / 2], transformers' long_factor and short_factor), and the metadata
`phi3.rope.scaling.original_context_length` (original_max_position_embeddings; absent: the file's
context_length, as llama.cpp reads it), `phi3.rope.scaling.attn_factor` (absent: transformers'
default) and `phi3.context_length` (max_position_embeddings). They are read here, from the header and
those two small tensors, into the ArchConfig; the weight readers skip them (phi3_hf_tensor_name: None).

A `rope.dimension_count` below the head size is a partial rotary (Phi-4-mini: 96 of 128), served as a
checkpoint's partial_rotary_factor (ArchConfig.rotary_dim). Refused before any tensor is read: a file
with only one of the two factor tensors, or factor lists that are not rope.dimension_count / 2 long.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from gguf import GGUFReader

from fitserve.arch_config import ArchConfig
from fitserve.config import ConfigError
from fitserve.longrope import LongRopeScaling, default_attention_factor
from fitserve.weights import gguf_file

PHI3_GGUF_ARCH = "phi3"
LONG_FACTORS_TENSOR, SHORT_FACTORS_TENSOR = "rope_factors_long.weight", "rope_factors_short.weight"
LONGROPE_TENSORS = (LONG_FACTORS_TENSOR, SHORT_FACTORS_TENSOR)  # LongRoPE's factor lists, not model weights
PHI3_END_OF_TURN = "<|end|>"  # ends a chat turn (Phi-3's generation_config.json lists it as an eos)
_PHI3_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
    "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


def phi3_hf_tensor_name(gguf_name: str) -> str | None:
    """'blk.3.attn_qkv.weight' -> 'model.layers.3.self_attn.qkv_proj.weight', 'blk.3.ffn_up.weight' ->
    'model.layers.3.mlp.gate_up_proj.weight' (gate and up fused); None for LongRoPE's factor tensors."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name in LONGROPE_TENSORS:
        return None  # read into ArchConfig.rope_scaling (phi3_longrope), not a weight
    match = _BLOCK_RE.match(gguf_name)
    if not match or match.group(2) not in _PHI3_BLOCK_NAMES:
        raise ConfigError(f"GGUF tensor {gguf_name!r} is not part of a Phi-3 model.")
    return f"model.layers.{match.group(1)}.{_PHI3_BLOCK_NAMES[match.group(2)]}.weight"


def phi3_arch_from_gguf(reader: GGUFReader) -> ArchConfig:
    """ArchConfig from `phi3.*` metadata and, for LongRoPE, its two factor tensors."""
    key = gguf_file.metadata_key(reader, PHI3_GGUF_ARCH)
    tensor_names = {t.name for t in reader.tensors}
    num_heads, hidden = int(key("attention.head_count")), int(key("embedding_length"))
    head_dim = hidden // num_heads
    rotary_dim = int(key("rope.dimension_count", head_dim))  # below head_dim: a partial rotary (Phi-4-mini)
    window = gguf_file.field_value(reader, f"{PHI3_GGUF_ARCH}.attention.sliding_window")
    tokens: list[Any] = gguf_file.field_value(reader, "tokenizer.ggml.tokens") or []
    return ArchConfig(
        vocab_size=int(gguf_file.field_value(reader, f"{PHI3_GGUF_ARCH}.vocab_size", 0)) or len(tokens),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(key("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=gguf_file.float32_value(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=phi3_longrope(reader),
        rotary_dim=None if rotary_dim == head_dim else rotary_dim,
        max_position_embeddings=int(key("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=gguf_file.field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=gguf_file.eos_ids_with(reader, PHI3_END_OF_TURN),
        architecture="Phi3ForCausalLM",
        torch_dtype="float32",  # GGUF is dequantized or packed; the serving dtype comes from --dtype
        sliding_window=int(window) if window else None,
    )


def phi3_longrope(reader: GGUFReader) -> LongRopeScaling | None:
    """LongRoPE from the factor tensors and `phi3.rope.scaling.*` (module docstring); None without them."""
    tensors = {t.name: t for t in reader.tensors if t.name in LONGROPE_TENSORS}
    if not tensors:
        return None
    if len(tensors) != len(LONGROPE_TENSORS):
        raise ConfigError(f"This Phi-3 GGUF file holds {', '.join(tensors)} but not "
                          f"{', '.join(set(LONGROPE_TENSORS) - set(tensors))}: LongRoPE needs both factor lists.")
    key = gguf_file.metadata_key(reader, PHI3_GGUF_ARCH)
    context_tokens = int(key("context_length", 4096))
    original_tokens = int(key("rope.scaling.original_context_length", context_tokens))
    attn_factor = gguf_file.field_value(reader, f"{PHI3_GGUF_ARCH}.rope.scaling.attn_factor")
    attention = (gguf_file.float32_value(attn_factor) if attn_factor is not None
                 else default_attention_factor(context_tokens, original_tokens))
    return LongRopeScaling(short_factor=_factors(tensors[SHORT_FACTORS_TENSOR]),
                           long_factor=_factors(tensors[LONG_FACTORS_TENSOR]),
                           original_max_position_embeddings=original_tokens, attention_factor=attention,
                           served_context_tokens=context_tokens)


def _factors(tensor: Any) -> tuple[float, ...]:
    """A factor tensor's values (float32 as the converter writes them, each read back as the shortest
    decimal of its float32, as config.json spells it; F16 read as well)."""
    from gguf.quants import dequantize

    values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(-1)
    return tuple(gguf_file.float32_value(v) for v in values)
