"""GGUF files of Qwen2/2.5 (`qwen2`) and Qwen3 (`qwen3`), as llama.cpp's converter writes them (torch-free).

Against a `llama` file: the metadata keys start with the architecture's name; Qwen2's q, k and v
carry a bias (`blk.N.attn_q.bias`), Qwen3's q and k heads an RMSNorm (`attn_q_norm`,
`attn_k_norm`) and its head size is `attention.key_length`; the q/k rows are stored as transformers
holds them (the converter permutes rope rows for `llama` files only).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from gguf import GGUFReader

from fitserve.arch_config import ArchConfig
from fitserve.config import ConfigError
from fitserve.weights import gguf_file

QWEN_GGUF_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_QK_NORM_GGUF_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM"}  # gguf_moe: experts
_QWEN_BLOCK_NAMES = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_TENSOR_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def qwen_hf_tensor_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.bias' -> 'model.layers.3.self_attn.q_proj.bias'; the Llama names otherwise."""
    if gguf_name in gguf_file.SKIPPED_TENSORS:
        return None
    match = _TENSOR_RE.match(gguf_name)
    if match is None:
        return gguf_file.hf_tensor_name(gguf_name)
    layer, part, kind = match.groups()
    hf_part = _QWEN_BLOCK_NAMES.get(part) or gguf_file.BLOCK_NAMES.get(part)
    if hf_part is None or (kind == "bias" and part not in ("attn_q", "attn_k", "attn_v")):
        raise ConfigError(f"GGUF tensor {gguf_name!r} is not part of a Qwen2/Qwen3 model.")
    return f"model.layers.{layer}.{hf_part}.{kind}"


def qwen_arch_from_gguf(reader: GGUFReader, gguf_arch: str) -> ArchConfig:
    """ArchConfig from `qwen2.*`, `qwen3.*` or (its attention: gguf_moe.py adds the experts) `qwen3moe.*` metadata."""
    def key(name: str, default: Any = None) -> Any:
        value = gguf_file.field_value(reader, f"{gguf_arch}.{name}", default)
        if value is None:
            raise ConfigError(f"GGUF file lacks {gguf_arch}.{name}.")
        return value

    num_heads, hidden = int(key("attention.head_count")), int(key("embedding_length"))
    tokens = gguf_file.field_value(reader, "tokenizer.ggml.tokens") or []
    eos = gguf_file.field_value(reader, "tokenizer.ggml.eos_token_id")
    architecture = {**QWEN_GGUF_ARCHITECTURES, **_QK_NORM_GGUF_ARCHITECTURES}[gguf_arch]
    return ArchConfig(
        vocab_size=int(gguf_file.field_value(reader, f"{gguf_arch}.vocab_size", 0)) or len(tokens),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(key("attention.head_count_kv", num_heads)),
        head_dim=int(key("attention.key_length", hidden // num_heads)),
        rms_norm_eps=float(str(np.float32(key("attention.layer_norm_rms_epsilon", 1e-6)))),
        rope_theta=float(key("rope.freq_base", 1_000_000.0)),
        max_position_embeddings=int(key("context_length", 32768)),
        tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors},
        bos_token_id=gguf_file.field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        architecture=architecture,
        torch_dtype="float32",  # GGUF is dequantized or packed; the serving dtype comes from --dtype
        qkv_bias=architecture == "Qwen2ForCausalLM",
        qk_norm=architecture in _QK_NORM_GGUF_ARCHITECTURES.values(),
    )
