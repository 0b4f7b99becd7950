"""Test helper: a tiny transformers model written as a GGUF file the way llama.cpp's converter lays it
out (convert_hf_to_gguf.py), with the gguf package's own writer and tensor-name map, and the same file
read back by transformers' GGUF loader.

What the converter does per architecture, redone here: `llama` files (Llama, Mistral, Mixtral) permute
the q/k rows into llama.cpp's interleaved rope order and stack each layer's experts into
ffn_{gate,up,down}_exps; Gemma's norms are stored as 1 + w and its tied lm_head is left out; Phi-3's
fused qkv_proj and gate_up_proj are written as they are (attn_qkv, ffn_up); Qwen3-MoE stacks its experts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gguf
import numpy as np
import torch
import transformers

VOCAB = [chr(c) for c in range(ord("!"), ord("!") + 94)] + ["12", "<|eot|>"]  # 96 tokens, the last one eos
QUANT_TYPE = gguf.GGMLQuantizationType.Q8_0  # cheap to write, and kept packed by --quantization gguf


def randomize(model: transformers.PreTrainedModel, router_std: float = 1.0) -> transformers.PreTrainedModel:
    """Norms drawn around 1 (transformers starts them at 1, or at 0 for Gemma, which would hide a wrong
    shift) and routers spread out so top-k choices are stable under float32 rounding; eval mode."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name.endswith("mlp.gate.weight") or name.endswith("block_sparse_moe.gate.weight"):
                param.normal_(0.0, router_std)
    return model.eval()


def permute_rope_rows(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF's half-split rope rows -> interleaved pairs, per head."""
    return (weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_tensors(model: transformers.PreTrainedModel, gguf_arch: gguf.MODEL_ARCH) -> dict[str, np.ndarray]:
    """The model's float32 tensors under their GGUF names, transformed as the converter does."""
    cfg = model.config
    name_map = gguf.get_tensor_name_map(gguf_arch, cfg.num_hidden_layers)
    is_llama, is_gemma = gguf_arch == gguf.MODEL_ARCH.LLAMA, gguf_arch == gguf.MODEL_ARCH.GEMMA2
    out: dict[str, np.ndarray] = {}
    for hf_name, tensor in model.state_dict().items():
        values = tensor.float().numpy().copy()
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if ".experts." in hf_name:  # transformers 5 holds experts stacked: gate_up_proj [E, 2I, H], down_proj [E, H, I]
            block = f"blk.{hf_name.split('.')[2]}"
            if hf_name.endswith("gate_up_proj"):
                gate, up = np.split(values, 2, axis=1)
                out[f"{block}.ffn_gate_exps.weight"], out[f"{block}.ffn_up_exps.weight"] = gate, up
            else:
                out[f"{block}.ffn_down_exps.weight"] = values
            continue
        module, _, kind = hf_name.rpartition(".")
        if module.endswith(".mlp.gate") or module.endswith(".block_sparse_moe.gate"):
            name = f"blk.{hf_name.split('.')[2]}.ffn_gate_inp"
        else:
            name = name_map.get_name(module)
        assert name is not None, hf_name
        if is_llama and module.endswith("q_proj"):
            values = permute_rope_rows(values, cfg.num_attention_heads)
        elif is_llama and module.endswith("k_proj"):
            values = permute_rope_rows(values, cfg.num_key_value_heads)
        if is_gemma and module.endswith("norm"):
            values = values + 1.0
        out[f"{name}.{kind}"] = values
    return out


def write_gguf(path, gguf_arch: str, tensors: dict[str, np.ndarray], header: Callable[[gguf.GGUFWriter], None],
               quantized: Callable[[str], bool] = lambda name: False, tokenizer: str = "gpt2",
               half: Callable[[str], bool] = lambda name: False) -> None:
    """A GGUF file of `tensors` (the `quantized` ones in QUANT_TYPE, the `half` ones in F16, the rest F32),
    its metadata written by `header`, and a 96-token vocabulary (byte-level BPE, or SentencePiece pieces
    with scores for `llama`)."""
    writer = gguf.GGUFWriter(str(path), gguf_arch)
    header(writer)
    writer.add_tokenizer_model(tokenizer)
    writer.add_token_list(VOCAB)
    writer.add_token_types([gguf.TokenType.NORMAL] * (len(VOCAB) - 1) + [gguf.TokenType.CONTROL])
    if tokenizer == "gpt2":
        writer.add_token_merges(["1 2"])
    else:
        writer.add_token_scores([-float(i) for i in range(len(VOCAB))])
    writer.add_eos_token_id(len(VOCAB) - 1)
    writer.add_pad_token_id(0)  # transformers' Phi-3 config defaults to 32000, outside this vocabulary
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}<|eot|>{% endfor %}")
    for name, values in tensors.items():
        if quantized(name):
            writer.add_tensor(name, gguf.quants.quantize(values, QUANT_TYPE), raw_dtype=QUANT_TYPE)
        elif half(name):
            writer.add_tensor(name, values.astype(np.float16))
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_common_header(writer: gguf.GGUFWriter, cfg: Any, rope_theta: float | None = None) -> None:
    """The keys every architecture's file has, from a transformers config."""
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(rope_theta if rope_theta is not None else cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)


def transformers_from_gguf(path, model_class: type, **config_overrides: Any) -> transformers.PreTrainedModel:
    """transformers' model of the file's config (with `config_overrides` for what its GGUF reader leaves
    at a default), holding the tensors its GGUF reader dequantizes and renames (from_pretrained(gguf_file=)
    wants accelerate, which fitserve does not install)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    config = transformers.AutoConfig.from_pretrained(str(path), gguf_file=str(path))
    for key, value in config_overrides.items():
        setattr(config, key, value)
    model = model_class(config).eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    if "lm_head.weight" in missing:
        model.tie_weights()
    return model
