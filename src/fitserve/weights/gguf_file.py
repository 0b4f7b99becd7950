"""GGUF metadata and tensor names for Llama-architecture files, read with gguf.GGUFReader (torch-free)."""

from __future__ import annotations

import functools
import os
import re
from typing import Any

import numpy as np
from gguf import GGUFReader

from fitserve.arch_config import ArchConfig
from fitserve.config import ConfigError

# GGUF tensor name (per block or global) -> HF checkpoint name
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")
SKIPPED_TENSORS = ("rope_freqs.weight",)  # llama.cpp's precomputed rope factors; we derive them


def open_gguf(path: str) -> GGUFReader:
    """A parsed GGUF file; parsing costs ~2 s (the token and merge arrays), so resolving the source,
    building the tokenizer and loading the weights share one parse of an unchanged file."""
    stat = os.stat(path)
    return _open_gguf(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1)  # one model per process; the reader only memory-maps the file
def _open_gguf(path: str, size_bytes: int, mtime_ns: int) -> GGUFReader:
    return GGUFReader(path)


def field_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_tensor_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None for skipped tensors."""
    if gguf_name in SKIPPED_TENSORS:
        return None
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.match(gguf_name)
    if not match or match.group(2) not in _BLOCK_NAMES:
        raise ConfigError(f"GGUF tensor {gguf_name!r} is not part of a Llama model.")
    return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.weight"


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: [out, in] interleaved rope pairs -> HF's half-split layout.

    The converter regrouped each head's rows as (head_dim/2, 2) pairs from HF's (2, head_dim/2)
    halves; swapping the two axes back restores HF order.
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    return (weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def arch_from_gguf(reader: GGUFReader) -> ArchConfig:
    """ArchConfig from `llama.*` and `tokenizer.ggml.*` metadata."""
    arch_name = field_value(reader, "general.architecture")
    if arch_name != "llama":
        raise ConfigError(f"GGUF architecture {arch_name!r} is not supported; fitserve reads 'llama' files.")

    def key(name: str, default: Any = None) -> Any:
        value = field_value(reader, f"llama.{name}", default)
        if value is None:
            raise ConfigError(f"GGUF file lacks llama.{name}.")
        return value

    num_heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    tokens_field = reader.fields.get("tokenizer.ggml.tokens")
    vocab_size = int(field_value(reader, "llama.vocab_size", 0)) or (len(tokens_field.data) if tokens_field else 0)
    if not vocab_size:
        raise ConfigError("GGUF file has neither llama.vocab_size nor tokenizer.ggml.tokens.")
    tensor_names = {t.name for t in reader.tensors}
    eos = field_value(reader, "tokenizer.ggml.eos_token_id")
    return ArchConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(key("attention.head_count_kv", num_heads)),
        head_dim=int(key("rope.dimension_count", hidden // num_heads)),
        # stored as float32: 1e-5 reads back as 9.99999975e-06; the shortest float32 repr restores 1e-05
        rms_norm_eps=float(str(np.float32(key("attention.layer_norm_rms_epsilon", 1e-5)))),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        max_position_embeddings=int(key("context_length", 8192)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        torch_dtype="float32",  # GGUF is dequantized; the serving dtype comes from --dtype
    )
