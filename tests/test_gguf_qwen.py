"""Qwen2 and Qwen3 GGUF files: a tiny checkpoint written by transformers, converted to GGUF here with the
gguf package's writer as llama.cpp's converter lays it out (`qwen2.*` / `qwen3.*` keys, q/k/v biases or
q/k norms, rope rows unpermuted), loaded through fitserve and compared with transformers."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers
from hf_compare_helpers import check_prefill_and_decode

from fitserve.config import EngineConfig
from fitserve.layers.formats.gguf import GgufLinear
from fitserve.models.loader import load_model
from fitserve.weights.source import resolve_model_source

BLOCK_PARTS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
VOCAB = [chr(c) for c in range(ord("!"), ord("!") + 94)] + ["12", "<|im_end|>"]  # 96 tokens


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{BLOCK_PARTS[part]}.{kind}"


def tiny_qwen(arch: str) -> transformers.PreTrainedModel:
    common = dict(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    if arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=32, **common))
    with torch.no_grad():  # random biases and norms, which transformers starts at 0 and 1
        for name, param in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                param.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return model.eval()


def write_gguf(path, arch: str, model, quantize_projections: bool = False) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    cfg = model.config
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "qwen3":
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(VOCAB)
    writer.add_token_types([gguf.TokenType.NORMAL] * (len(VOCAB) - 1) + [gguf.TokenType.CONTROL])
    writer.add_token_merges(["1 2"])
    writer.add_eos_token_id(len(VOCAB) - 1)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}")
    for name, tensor in model.state_dict().items():
        values = tensor.float().numpy()
        if quantize_projections and values.ndim == 2 and "layers" in name:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_gguf_matches_transformers(tmp_path, arch):
    hf = tiny_qwen(arch)
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(path, arch, hf)
    source = resolve_model_source(EngineConfig(model=str(path)))
    assert source.arch.architecture == {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    assert source.arch.head_dim == (32 if arch == "qwen3" else 16)
    ours = load_model(source, torch.float32, torch.device("cpu"), progress=False)
    check_prefill_and_decode(ours, hf, prompts=[[5, 17, 81, 44, 9, 50, 3], list(range(3, 60, 3))])


def test_qwen_gguf_projections_kept_packed_equal_dequantized(tmp_path):
    hf = tiny_qwen("qwen2")
    path = tmp_path / "tiny-qwen2-q8.gguf"
    write_gguf(path, "qwen2", hf, quantize_projections=True)
    source = resolve_model_source(EngineConfig(model=str(path)))
    from paged_helpers import PagedDriver

    logits = []
    for quantization in (None, "gguf"):
        model = load_model(source, torch.float32, torch.device("cpu"), progress=False, quantization=quantization)
        packed = [m for m in model.modules() if isinstance(m, GgufLinear)]
        assert len(packed) == (0 if quantization is None else 4 * 2)
        logits.append(PagedDriver(model, num_blocks=8, block_size=16).step([("a", [5, 17, 81, 44, 9])]))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_qwen_gguf_tokenizer_splits_digits_as_qwen_does(tmp_path):
    """Qwen's pre-tokenizer splits digits one by one, so the merge "1 2" never applies (GPT-2's would
    make "12" one token): the tokenizer comes from transformers' converter for the architecture."""
    from fitserve.engine.tokenizer import gguf_tokenizer

    path = tmp_path / "tiny-qwen2.gguf"
    write_gguf(path, "qwen2", tiny_qwen("qwen2"))
    tokenizer = gguf_tokenizer(str(path))
    ids = tokenizer.encode("12", add_special_tokens=False)
    assert ids == [VOCAB.index("1"), VOCAB.index("2")]
    assert np.array_equal(tokenizer.encode("<|im_end|>", add_special_tokens=False), [len(VOCAB) - 1])
