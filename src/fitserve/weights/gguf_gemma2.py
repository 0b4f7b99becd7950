"""GGUF files of Gemma 2 (`gemma2`), as llama.cpp's converter writes them (torch-free).

Gemma 3's layout without the q/k norms (gguf_file.py): four norms a layer, each stored as 1 + w
(gguf_file.gemma3_norm_from_gguf undoes it), q/k rows unpermuted, the embeddings tied. The
metadata carries the soft-caps (`gemma2.attn_logit_softcapping`, `gemma2.final_logit_softcapping`)
and the window (`gemma2.attention.sliding_window`); what llama.cpp fixes rather than writing
(llama-model.cpp, LLM_ARCH_GEMMA2) is taken from there: every other layer local from layer 0, the
soft-caps' and the window's defaults, and the query scale.
"""

from __future__ import annotations

from gguf import GGUFReader

from fitserve.arch_config import ArchConfig
from fitserve.weights import gguf_file

GEMMA2_GGUF_ARCH = "gemma2"
GEMMA2_SLIDING_WINDOW_PATTERN = 2  # layers 0, 2, 4, ... are local (llama.cpp's set_swa_pattern(2))
GEMMA2_DEFAULT_WINDOW_TOKENS = 4096  # llama.cpp's n_swa when the file names none
GEMMA2_DEFAULT_ATTN_SOFTCAP = 50.0  # llama.cpp's f_attn_logit_softcapping default
GEMMA2_DEFAULT_FINAL_SOFTCAP = 30.0  # llama.cpp's f_final_logit_softcapping default
GEMMA2_27B_BLOCKS = 46  # the 27B scales queries by (hidden / heads) ** -0.5, the others by head_dim ** -0.5
_GEMMA2_BLOCK_NAMES = {
    **{k: v for k, v in gguf_file.BLOCK_NAMES.items() if k != "ffn_norm"},
    "ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def gemma2_hf_tensor_name(gguf_name: str) -> str | None:
    """'blk.3.post_ffw_norm.weight' -> 'model.layers.3.post_feedforward_layernorm.weight' (Gemma's names)."""
    return gguf_file.block_tensor_name(gguf_name, _GEMMA2_BLOCK_NAMES, "a Gemma 2 model")


def gemma2_arch_from_gguf(reader: GGUFReader) -> ArchConfig:
    """ArchConfig of Gemma 2 from `gemma2.*` metadata, with llama.cpp's values for what the file leaves out."""
    key = gguf_file.metadata_key(reader, GEMMA2_GGUF_ARCH)
    num_layers, num_heads = int(key("block_count")), int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    head_dim = int(key("attention.key_length", hidden // num_heads))
    tokens = gguf_file.field_value(reader, "tokenizer.ggml.tokens") or []
    return ArchConfig(
        vocab_size=int(gguf_file.field_value(reader, f"{GEMMA2_GGUF_ARCH}.vocab_size", 0)) or len(tokens),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=int(key("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=gguf_file.float32_value(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        max_position_embeddings=int(key("context_length", 8192)),
        tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors},
        bos_token_id=gguf_file.field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=gguf_file.eos_ids_with(reader, gguf_file.GEMMA_END_OF_TURN),
        architecture="Gemma2ForCausalLM",
        torch_dtype="float32",  # GGUF is dequantized or packed; the serving dtype comes from --dtype
        sliding_window=int(key("attention.sliding_window", GEMMA2_DEFAULT_WINDOW_TOKENS)),
        layer_types=tuple("sliding_attention" if (i + 1) % GEMMA2_SLIDING_WINDOW_PATTERN else "full_attention"
                          for i in range(num_layers)),
        query_pre_attn_scalar=float(hidden // num_heads if num_layers == GEMMA2_27B_BLOCKS else head_dim),
        attn_logit_softcap=gguf_file.float32_value(key("attn_logit_softcapping", GEMMA2_DEFAULT_ATTN_SOFTCAP)),
        final_logit_softcap=gguf_file.float32_value(key("final_logit_softcapping", GEMMA2_DEFAULT_FINAL_SOFTCAP)),
        sandwich_norms=True,
    )
