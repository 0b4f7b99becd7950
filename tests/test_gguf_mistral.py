"""Mistral and Mixtral GGUF files (llama.cpp writes both as architecture `llama`): a tiny transformers model
written with the gguf package's writer as llama.cpp's converter lays it out (tests/gguf_writer.py), loaded
through fitserve and compared with transformers, through the paged cache (float32 logits within
hf_compare_helpers.LOGITS_TOL, so the greedy tokens fed back are equal).

Mistral: `llama.attention.sliding_window`, shorter here than the prompts, makes the file Mistral's; the
reference is transformers' MistralForCausalLM loading the same file (its GGUF reader takes a `llama` file
named "mistral" as Mistral, but leaves the window at its config default, so the test sets it).
Mixtral: `llama.expert_count` and the stacked ffn_*_exps tensors; transformers' GGUF reader builds a
Llama model of such a file, so the reference is transformers' MixtralForCausalLM the file was written from.
"""

from __future__ import annotations

import gguf
import pytest
import torch
import transformers
from gguf_writer import add_common_header, gguf_tensors, randomize, transformers_from_gguf, write_gguf
from hf_compare_helpers import check_prefill_and_decode

from fitserve.config import ConfigError, EngineConfig
from fitserve.layers.formats.gguf import GgufLinear
from fitserve.models.loader import load_model
from fitserve.weights.source import resolve_model_source
from paged_helpers import PagedDriver

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
WINDOW = 5  # tokens; the prompts below are longer
PROMPTS = [[5, 17, 81, 44, 9, 50, 3], list(range(3, 60, 3))]
CPU = torch.device("cpu")


def write_llama_file(path, hf, name: str, **extra: int) -> None:
    cfg = hf.config

    def header(writer: gguf.GGUFWriter) -> None:
        add_common_header(writer, cfg)
        writer.add_name(name)
        writer.add_rope_dimension_count(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        if "sliding_window" in extra:
            writer.add_sliding_window(extra["sliding_window"])
        if "num_experts" in extra:
            writer.add_expert_count(extra["num_experts"])
            writer.add_expert_used_count(cfg.num_experts_per_tok)

    quantized = extra.get("quantized", False)
    write_gguf(path, "llama", gguf_tensors(hf, gguf.MODEL_ARCH.LLAMA), header,
               quantized=lambda n: bool(quantized) and n.startswith("blk.") and ".attn_" in n and "norm" not in n)


def test_a_llama_file_with_a_window_is_mistral_and_matches_transformers(tmp_path):
    torch.manual_seed(0)
    hf = randomize(transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=WINDOW, **TINY)))
    path = tmp_path / "tiny-mistral.gguf"
    write_llama_file(path, hf, "tiny-mistral", sliding_window=WINDOW)
    source = resolve_model_source(EngineConfig(model=str(path)))
    assert (source.arch.architecture, source.arch.uniform_sliding_window) == ("MistralForCausalLM", WINDOW)
    ours = load_model(source, torch.float32, CPU, progress=False)
    assert all(layer.self_attn.attn.sliding_window == WINDOW for layer in ours.layers)
    reference = transformers_from_gguf(path, transformers.MistralForCausalLM, sliding_window=WINDOW)
    check_prefill_and_decode(ours, reference, prompts=PROMPTS)


def test_a_llama_file_without_a_window_attends_over_everything(tmp_path):
    torch.manual_seed(0)
    hf = randomize(transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None, **TINY)))
    path = tmp_path / "tiny-mistral-v02.gguf"
    write_llama_file(path, hf, "tiny-mistral-v0.2")
    source = resolve_model_source(EngineConfig(model=str(path)))
    assert (source.arch.architecture, source.arch.sliding_window) == ("LlamaForCausalLM", None)
    check_prefill_and_decode(load_model(source, torch.float32, CPU, progress=False), hf, prompts=PROMPTS)


def tiny_mixtral(num_experts: int = 4) -> transformers.MixtralForCausalLM:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(num_local_experts=num_experts, num_experts_per_tok=2, **TINY)
    return randomize(transformers.MixtralForCausalLM(config))


def test_a_llama_file_with_experts_is_mixtral_and_matches_transformers(tmp_path):
    hf = tiny_mixtral()
    path = tmp_path / "tiny-mixtral.gguf"
    write_llama_file(path, hf, "tiny-mixtral", num_experts=4)
    source = resolve_model_source(EngineConfig(model=str(path)))
    arch = source.arch
    assert (arch.architecture, arch.num_experts, arch.num_experts_per_tok, arch.moe_intermediate_size) == (
        "MixtralForCausalLM", 4, 2, TINY["intermediate_size"])
    ours = load_model(source, torch.float32, CPU, progress=False)
    check_prefill_and_decode(ours, hf, prompts=PROMPTS)


def test_mixtral_attention_kept_packed_equals_dequantized(tmp_path):
    """Q8_0 attention projections (q/k rows permuted in the file): packed (--quantization gguf) and
    dequantized at load give the same logits; the experts, stacked 3-D tensors, are dequantized."""
    path = tmp_path / "tiny-mixtral-q8.gguf"
    write_llama_file(path, tiny_mixtral(), "tiny-mixtral", num_experts=4, quantized=True)
    source = resolve_model_source(EngineConfig(model=str(path)))
    logits = []
    for quantization in (None, "gguf"):
        model = load_model(source, torch.float32, CPU, progress=False, quantization=quantization)
        assert len([m for m in model.modules() if isinstance(m, GgufLinear)]) == (0 if quantization is None else 4)
        logits.append(PagedDriver(model, num_blocks=8, block_size=16).step([("a", PROMPTS[0])]))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_a_file_whose_experts_disagree_with_its_metadata_is_refused(tmp_path):
    path = tmp_path / "tiny-mixtral-bad.gguf"
    write_llama_file(path, tiny_mixtral(num_experts=4), "tiny-mixtral", num_experts=3)
    source = resolve_model_source(EngineConfig(model=str(path)))
    with pytest.raises(ConfigError, match="expert"):
        load_model(source, torch.float32, CPU, progress=False)
