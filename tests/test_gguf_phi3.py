"""Phi-3 GGUF files (`phi3`): a tiny transformers Phi-3 written with the gguf package's writer as
llama.cpp's converter lays it out (fused attn_qkv, and ffn_up holding gate and up; tests/gguf_writer.py),
loaded through fitserve and compared with transformers' Phi3ForCausalLM loading the same file, through
the paged cache (float32 logits within hf_compare_helpers.LOGITS_TOL, greedy tokens fed back equal).
Malformed LongRoPE metadata is refused before any tensor is read; LongRoPE and partial rotary files:
tests/test_phi3_longrope*.py."""

from __future__ import annotations

import gguf
import numpy as np
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
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
            eos_token_id=95, pad_token_id=0, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
PROMPTS = [[5, 17, 81, 44, 9, 50, 3], list(range(3, 60, 3))]
CPU = torch.device("cpu")


def tiny_phi3() -> transformers.Phi3ForCausalLM:
    torch.manual_seed(0)
    return randomize(transformers.Phi3ForCausalLM(transformers.Phi3Config(**TINY)))


def write_phi3_file(path, hf, quantized: bool = False, half: bool = False, rotary_dim: int | None = None,
                    extra_tensors: dict[str, np.ndarray] | None = None, window: int | None = None) -> None:
    cfg = hf.config

    def header(writer: gguf.GGUFWriter) -> None:
        add_common_header(writer, cfg)
        writer.add_rope_dimension_count(rotary_dim or cfg.hidden_size // cfg.num_attention_heads)
        if window:
            writer.add_sliding_window(window)

    tensors = {**gguf_tensors(hf, gguf.MODEL_ARCH.PHI3), **(extra_tensors or {})}
    assert "blk.0.attn_qkv.weight" in tensors and tensors["blk.0.ffn_up.weight"].shape == (2 * 96, 64)
    write_gguf(path, "phi3", tensors, header, tokenizer="llama",
               quantized=lambda n: quantized and n.startswith("blk.") and "norm" not in n,
               half=lambda n: half and "norm" not in n)  # F16 as llama.cpp's converter stores matrices


def test_a_phi3_file_matches_transformers_loading_it(tmp_path):
    hf = tiny_phi3()
    path = tmp_path / "tiny-phi3.gguf"
    write_phi3_file(path, hf, half=True)  # F16 matrices, F32 norms
    source = resolve_model_source(EngineConfig(model=str(path)))
    assert (source.arch.architecture, source.arch.head_dim, source.arch.sliding_window) == (
        "Phi3ForCausalLM", 16, None)
    ours = load_model(source, torch.float32, CPU, progress=False)
    check_prefill_and_decode(ours, transformers_from_gguf(path, transformers.Phi3ForCausalLM), prompts=PROMPTS)


def test_phi3_fused_projections_kept_packed_equal_dequantized(tmp_path):
    """Q8_0 attn_qkv and ffn_up (fused) are cut into whole packed rows (--quantization gguf) and give
    the logits of the model dequantized at load."""
    path = tmp_path / "tiny-phi3-q8.gguf"
    write_phi3_file(path, tiny_phi3(), quantized=True)
    source = resolve_model_source(EngineConfig(model=str(path)))
    logits = []
    for quantization in (None, "gguf"):
        model = load_model(source, torch.float32, CPU, progress=False, quantization=quantization)
        assert len([m for m in model.modules() if isinstance(m, GgufLinear)]) == (0 if quantization is None else 8)
        logits.append(PagedDriver(model, num_blocks=8, block_size=16).step([("a", PROMPTS[0])]))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_the_sliding_window_key_is_read(tmp_path):
    path = tmp_path / "tiny-phi3-window.gguf"
    write_phi3_file(path, tiny_phi3(), window=2047)
    assert resolve_model_source(EngineConfig(model=str(path))).arch.uniform_sliding_window == 2047


@pytest.mark.parametrize("extra, rotary_dim, match", [
    ({"rope_factors_long.weight": np.ones(8, np.float32)}, None, "LongRoPE needs both factor lists"),
    ({"rope_factors_long.weight": np.ones(8, np.float32), "rope_factors_short.weight": np.ones(8, np.float32)},
     12, "short_factor has 8 entries, but the model rotates 12 dimensions"),
])
def test_what_fitserve_cannot_compute_is_refused_from_the_metadata(tmp_path, extra, rotary_dim, match):
    """Refused while the source is resolved (the header only), before a model is built or a tensor read."""
    path = tmp_path / "tiny-phi3-refused.gguf"
    write_phi3_file(path, tiny_phi3(), rotary_dim=rotary_dim, extra_tensors=extra)
    with pytest.raises(ConfigError, match=match):
        resolve_model_source(EngineConfig(model=str(path)))
