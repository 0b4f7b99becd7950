"""GGUF metadata and tensor names for Llama- and Gemma 3-architecture files, read with gguf.GGUFReader
(torch-free), and the dispatch to the other architectures' modules: Qwen2/Qwen3 (weights/gguf_qwen.py),
Phi-3 (gguf_phi3.py), Gemma 2 (gguf_gemma2.py), Mixtral and Qwen3-MoE (gguf_moe.py).

A `llama` file is Llama's, Mistral's when it names a sliding window (`llama.attention.sliding_window`;
llama.cpp writes Mistral as `llama`), Mixtral's when it has experts (`llama.expert_count`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace
import os
import re
from typing import Any

import numpy as np
from gguf import GGUFReader

from fitserve.arch_config import ArchConfig, LinearRopeScaling
from fitserve.config import ConfigError

# GGUF tensor name (per block or global) -> HF checkpoint name
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
BLOCK_NAMES = {
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


def metadata_key(reader: GGUFReader, prefix: str) -> Callable[..., Any]:
    """key(name, default=None): the value of `<prefix>.<name>`, else `default`; ConfigError naming the
    key when both are missing."""
    def key(name: str, default: Any = None) -> Any:
        value = field_value(reader, f"{prefix}.{name}", default)
        if value is None:
            raise ConfigError(f"GGUF file lacks {prefix}.{name}.")
        return value
    return key


def float32_value(value: Any) -> float:
    """A float32 metadata value as written: 1e-5 reads back as 9.99999975e-06, whose shortest float32
    repr restores 1e-05."""
    return float(str(np.float32(value)))


def eos_ids_with(reader: GGUFReader, *turn_tokens: str) -> tuple[int, ...]:
    """The file's eos id, then the ids of `turn_tokens` (a chat turn's end, as llama.cpp's EOT) in its vocabulary."""
    tokens = field_value(reader, "tokenizer.ggml.tokens") or []
    eos = field_value(reader, "tokenizer.ggml.eos_token_id")
    ids = (() if eos is None else (int(eos),)) + tuple(i for i, t in enumerate(tokens) if t in turn_tokens)
    return tuple(dict.fromkeys(ids))


def hf_tensor_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None for skipped tensors."""
    if gguf_name in SKIPPED_TENSORS:
        return None
    return block_tensor_name(gguf_name, BLOCK_NAMES, "a Llama model")


def block_tensor_name(gguf_name: str, block_names: dict[str, str], model: str) -> str:
    """A global tensor's HF name, or 'blk.N.<part>.weight' -> 'model.layers.N.<block_names[part]>.weight';
    a name outside both is a ConfigError saying it is not part of `model`."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.match(gguf_name)
    if not match or match.group(2) not in block_names:
        raise ConfigError(f"GGUF tensor {gguf_name!r} is not part of {model}.")
    return f"model.layers.{match.group(1)}.{block_names[match.group(2)]}.weight"


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: [out, in] interleaved rope pairs -> HF's half-split layout.

    The converter regrouped each head's rows as (head_dim/2, 2) pairs from HF's (2, head_dim/2)
    halves; swapping the two axes back restores HF order.
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    return (weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


GGUF_ARCHITECTURES = ("llama", "gemma2", "gemma3", "phi3", "qwen2", "qwen3", "qwen3moe")  # the files fitserve reads


def arch_from_gguf(reader: GGUFReader) -> ArchConfig:
    """ArchConfig from the file's `<general.architecture>.*` and `tokenizer.ggml.*` metadata; ConfigError
    for an architecture fitserve does not read, before any tensor is read."""
    from fitserve.weights import gguf_gemma2, gguf_moe, gguf_phi3, gguf_qwen

    arch_name = field_value(reader, "general.architecture")
    if arch_name == "gemma3":
        return gemma3_arch_from_gguf(reader)
    if arch_name == "gemma2":
        return gguf_gemma2.gemma2_arch_from_gguf(reader)
    if arch_name == "phi3":
        return gguf_phi3.phi3_arch_from_gguf(reader)
    if arch_name == gguf_moe.QWEN3_MOE_GGUF_ARCH:
        return gguf_moe.qwen3moe_arch_from_gguf(reader)
    if arch_name in gguf_qwen.QWEN_GGUF_ARCHITECTURES:
        return gguf_qwen.qwen_arch_from_gguf(reader, arch_name)
    if arch_name != "llama":
        raise ConfigError(f"GGUF architecture {arch_name!r} is not supported; fitserve reads "
                          f"{', '.join(repr(a) for a in GGUF_ARCHITECTURES)} files (docs/models.md).")
    return gguf_moe.with_llama_experts(reader, with_llama_window(reader, llama_arch_from_gguf(reader)))


def with_llama_window(reader: GGUFReader, arch: ArchConfig) -> ArchConfig:
    """A `llama` file naming a sliding window is Mistral's (v0.1: 4096 tokens on every layer)."""
    window = field_value(reader, "llama.attention.sliding_window")
    if not window:
        return arch
    return replace(arch, architecture="MistralForCausalLM", sliding_window=int(window))


def llama_arch_from_gguf(reader: GGUFReader) -> ArchConfig:
    """ArchConfig from `llama.*` and `tokenizer.ggml.*` metadata."""
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


# Gemma 3 (llama.cpp's convert_hf_to_gguf Gemma3Model): Gemma's block names, q/k rows unpermuted (rope in
# the half-split NEOX layout, as transformers), and every norm weight stored as 1 + w.
GEMMA3_GGUF_ARCH = "gemma3"
_GEMMA3_BLOCK_NAMES = {
    **{k: v for k, v in BLOCK_NAMES.items() if k != "ffn_norm"},
    "ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
GEMMA_NORM_SHIFT = 1.0  # the converter adds 1 to Gemma's (1 + w) norm weights; transformers holds w
# What llama.cpp fixes for Gemma 3 rather than writing to the file (llama-model.cpp, LLM_ARCH_GEMMA3)
GEMMA3_SLIDING_WINDOW_PATTERN = 6  # one global layer in six
GEMMA3_LOCAL_ROPE_BASE = 10_000.0
GEMMA3_27B_BLOCKS = 62  # the 27B scales queries by (hidden / heads) ** -0.5, the others by head_dim ** -0.5
GEMMA_END_OF_TURN = "<end_of_turn>"  # ends a chat turn: an eos besides the file's own (as llama.cpp's EOT)


def gemma3_hf_tensor_name(gguf_name: str) -> str | None:
    """'blk.3.ffn_norm.weight' -> 'model.layers.3.pre_feedforward_layernorm.weight' (Gemma's names)."""
    return block_tensor_name(gguf_name, _GEMMA3_BLOCK_NAMES, "a Gemma 3 text model")


def gemma3_arch_from_gguf(reader: GGUFReader) -> ArchConfig:
    """ArchConfig of a Gemma 3 text model from `gemma3.*` metadata, with llama.cpp's fixed values for
    what the file leaves out (the local layers' rope base and pattern, the query scale)."""
    def key(name: str, default: Any = None) -> Any:
        value = field_value(reader, f"{GEMMA3_GGUF_ARCH}.{name}", default)
        if value is None:
            raise ConfigError(f"GGUF file lacks {GEMMA3_GGUF_ARCH}.{name}.")
        return value

    num_layers, num_heads = int(key("block_count")), int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    head_dim = int(key("attention.key_length", 256))
    pattern = field_value(reader, f"{GEMMA3_GGUF_ARCH}.attention.sliding_window_pattern")
    if isinstance(pattern, list):  # newer files: one flag per layer, True = local
        layer_types = ["sliding_attention" if local else "full_attention" for local in pattern]
    else:
        every = int(pattern or GEMMA3_SLIDING_WINDOW_PATTERN)
        layer_types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(num_layers)]
    scaling_type = field_value(reader, f"{GEMMA3_GGUF_ARCH}.rope.scaling.type", "none")
    rope_scaling = None
    if scaling_type == "linear":
        rope_scaling = LinearRopeScaling(float(key("rope.scaling.factor")))
    elif scaling_type not in ("none", None):
        raise ConfigError(f"GGUF rope scaling {scaling_type!r} is not supported for Gemma 3 (only 'linear').")
    tokens = field_value(reader, "tokenizer.ggml.tokens") or []
    eos = field_value(reader, "tokenizer.ggml.eos_token_id")
    eos_ids = (() if eos is None else (int(eos),)) + tuple(
        i for i, token in enumerate(tokens) if token == GEMMA_END_OF_TURN)
    return ArchConfig(
        vocab_size=int(field_value(reader, f"{GEMMA3_GGUF_ARCH}.vocab_size", 0)) or len(tokens),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=int(key("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(str(np.float32(key("attention.layer_norm_rms_epsilon", 1e-6)))),
        rope_theta=float(key("rope.freq_base", 1_000_000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(key("context_length", 131072)),
        tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors},
        bos_token_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(eos_ids)),
        architecture="Gemma3ForCausalLM",
        torch_dtype="float32",  # GGUF is dequantized; the serving dtype comes from --dtype
        qk_norm=True,
        sliding_window=int(key("attention.sliding_window")),
        layer_types=tuple(layer_types),
        query_pre_attn_scalar=float(hidden // num_heads if num_layers == GEMMA3_27B_BLOCKS else head_dim),
        sandwich_norms=True,
        rope_local_theta=float(key("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE)),
    )


def hf_name_function(arch: ArchConfig) -> Callable[[str], str | None]:
    """The GGUF -> HF tensor-name mapping of a file's architecture (arch_from_gguf's `architecture`).

    A stacked experts tensor (`blk.N.ffn_gate_exps`) maps to a name holding gguf_moe.EXPERT_PLACEHOLDER,
    which the readers fill in for each expert (gguf_moe.per_expert)."""
    from fitserve.weights import gguf_gemma2, gguf_moe, gguf_phi3, gguf_qwen

    names = {"Gemma3ForCausalLM": gemma3_hf_tensor_name, "Gemma2ForCausalLM": gguf_gemma2.gemma2_hf_tensor_name,
             "Phi3ForCausalLM": gguf_phi3.phi3_hf_tensor_name, "MixtralForCausalLM": gguf_moe.mixtral_hf_tensor_name,
             "Qwen3MoeForCausalLM": gguf_moe.qwen3moe_hf_tensor_name,
             **{a: gguf_qwen.qwen_hf_tensor_name for a in gguf_qwen.QWEN_GGUF_ARCHITECTURES.values()}}
    return names.get(arch.architecture, hf_tensor_name)


def rope_rows_permuted(arch: ArchConfig) -> bool:
    """Whether the file's q/k rows are in llama.cpp's interleaved rope order (unpermute_rope_rows): the
    converter permutes them for `llama` files only (Llama, Mistral, Mixtral); the other architectures'
    are stored as transformers holds them."""
    return arch.architecture in ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")


def norms_shifted(arch: ArchConfig) -> bool:
    """Whether the file holds Gemma's norm weights as 1 + w (gemma3_norm_from_gguf undoes it): Gemma 2 and 3."""
    return arch.architecture in ("Gemma2ForCausalLM", "Gemma3ForCausalLM")


def gemma3_norm_from_gguf(hf_name: str, values: np.ndarray) -> np.ndarray:
    """A norm weight as transformers holds it (w, applied as 1 + w): the file holds 1 + w."""
    return values - np.float32(GEMMA_NORM_SHIFT) if hf_name.endswith("norm.weight") else values
