"""Phi-3 with a partial rotary factor (Phi-4-mini: 96 of each head's 128 dims rotate), alone and with
LongRoPE, matches transformers on tiny random checkpoints (float32, CPU): models/phi3.py reorders each
q and k head's rows at load (layers/rotary.partial_rotary_order) so that the shared table and kernels
rotate the right pairs. From safetensors, from GGUF (dequantized and packed), and a tensor-parallel
rank's rows."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf_writer import add_common_header, gguf_tensors, write_gguf
from hf_compare_helpers import check_engine_greedy, check_prefill_and_decode, save_random_checkpoint
from paged_helpers import PagedDriver

from fitserve.arch_config import ArchConfig
from fitserve.config import ConfigError, EngineConfig
from fitserve.layers.parallel import TensorParallel
from fitserve.layers.rotary import partial_rotary_order
from fitserve.models.loader import load_model
from fitserve.models.phi3 import Phi3ForCausalLM
from fitserve.weights.source import resolve_model_source

CPU = torch.device("cpu")
HEAD_DIM, ROTARY_DIM, ORIGINAL_TOKENS, MAX_TOKENS = 16, 12, 32, 256  # 0.75 of the head, as Phi-4-mini
BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=MAX_TOKENS, bos_token_id=1, eos_token_id=95,
            pad_token_id=0, tie_word_embeddings=False)
PROMPT_20 = [(7 * j + 3) % 96 for j in range(20)]
PROMPT_48 = [(5 * j + 11) % 96 for j in range(48)]


def _factors(seed: int) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(1.0, 4.0), 4) for _ in range(ROTARY_DIM // 2)]


LONGROPE = dict(original_max_position_embeddings=ORIGINAL_TOKENS, partial_rotary_factor=0.75,
                rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                 "short_factor": _factors(1), "long_factor": _factors(2)})
PLAIN = dict(partial_rotary_factor=0.75,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75})


def write_checkpoint(folder, rope: dict) -> transformers.Phi3ForCausalLM:
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(**BASE, **rope)).eval()
    return save_random_checkpoint(folder, hf)


def test_the_order_pairs_rotated_dims_at_half_the_head():
    order = partial_rotary_order(16, 12)
    assert order == [0, 1, 2, 3, 4, 5, 12, 13, 6, 7, 8, 9, 10, 11, 14, 15]
    assert [order[j + 8] - order[j] for j in range(6)] == [6] * 6  # transformers' pairs (i, i + R/2)
    assert partial_rotary_order(16, 16) == list(range(16))


def test_a_partial_rotary_matches_transformers(tmp_path):
    hf = write_checkpoint(tmp_path, PLAIN)
    source = resolve_model_source(EngineConfig(model=str(tmp_path)))
    assert (source.arch.rotary_dim, source.arch.rotated_dims, source.arch.rope_scaling) == (ROTARY_DIM, 12, None)
    ours = load_model(source, torch.float32, CPU, progress=False)
    check_prefill_and_decode(ours, hf, prompts=[PROMPT_48, PROMPT_20[:7]], num_decode_steps=4)
    check_engine_greedy(tmp_path, hf)


def test_without_the_reordering_the_logits_differ(tmp_path, monkeypatch):
    """The reordering is what makes the match: skipping it breaks it."""
    hf = write_checkpoint(tmp_path, PLAIN)
    source = resolve_model_source(EngineConfig(model=str(tmp_path)))
    monkeypatch.setattr(Phi3ForCausalLM, "_partial_rotary_rows", lambda self, part: part)
    ours = load_model(source, torch.float32, CPU, progress=False)
    with torch.no_grad():
        expected = hf(torch.tensor([PROMPT_20])).logits[0, -1]
    assert (PagedDriver(ours).step([("a", PROMPT_20)])[0] - expected).abs().max() > 1e-3


@pytest.mark.parametrize("max_model_len, prompts", [(ORIGINAL_TOKENS, [PROMPT_20]), (MAX_TOKENS, [PROMPT_48])])
def test_phi4_mini_like_longrope_with_a_partial_rotary_matches_transformers(tmp_path, max_model_len, prompts):
    hf = write_checkpoint(tmp_path, LONGROPE)
    source = resolve_model_source(EngineConfig(model=str(tmp_path)))
    assert len(source.arch.rope_scaling.short_factor) == ROTARY_DIM // 2
    source = replace(source, arch=source.arch.served_at(max_model_len))
    ours = load_model(source, torch.float32, CPU, progress=False)
    check_prefill_and_decode(ours, hf, prompts=prompts, num_decode_steps=4)


@pytest.mark.parametrize("partial, match", [
    (0.5625, "rotary dimensions \\(9\\) must be an even number"),  # 9 of 16
])
def test_an_odd_rotary_dim_is_refused(tmp_path, partial, match):
    write_checkpoint(tmp_path, PLAIN)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"]["partial_rotary_factor"] = partial
    config["partial_rotary_factor"] = partial
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=match):
        resolve_model_source(EngineConfig(model=str(tmp_path)))


def test_longrope_factor_lists_follow_the_rotary_dims():
    cfg = {"architectures": ["Phi3ForCausalLM"], **{k: v for k, v in BASE.items() if k != "tie_word_embeddings"},
           "partial_rotary_factor": 0.75, "original_max_position_embeddings": 32,
           "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}}
    with pytest.raises(ConfigError, match="short_factor has 8 entries, but the model rotates 12 dimensions"):
        ArchConfig.from_hf_config(cfg)


def test_a_tensor_parallel_rank_takes_its_heads_reordered(tmp_path):
    hf = write_checkpoint(tmp_path, PLAIN)
    source = resolve_model_source(EngineConfig(model=str(tmp_path)))
    whole = Phi3ForCausalLM(source.arch, torch.float32, CPU)
    rank1 = Phi3ForCausalLM(source.arch, torch.float32, CPU, tp=TensorParallel(rank=1, size=2))
    for model in (whole, rank1):
        model.load_weights(hf.state_dict().items())
    q_k = whole.layers[0].self_attn.qkv_proj.weight  # [q 64 | k 32 | v 32] rows, reordered per head
    want = torch.cat([q_k[32:64], q_k[64 + 16:96], q_k[96 + 16:]])  # rank 1: q heads 2-3, KV head 1
    torch.testing.assert_close(rank1.layers[0].self_attn.qkv_proj.weight, want, rtol=0, atol=0)


# -- GGUF: rope.dimension_count 12 of 16, the LongRoPE factor tensors -------------------------------------------


def write_gguf_file(path, hf, quantized: bool) -> None:
    cfg, rope = hf.config, LONGROPE["rope_parameters"]

    def header(writer: gguf.GGUFWriter) -> None:
        add_common_header(writer, cfg)
        writer.add_rope_dimension_count(ROTARY_DIM)
        writer.add_rope_scaling_orig_ctx_len(ORIGINAL_TOKENS)

    tensors = {**gguf_tensors(hf, gguf.MODEL_ARCH.PHI3),
               "rope_factors_long.weight": np.array(rope["long_factor"], np.float32),
               "rope_factors_short.weight": np.array(rope["short_factor"], np.float32)}
    write_gguf(path, "phi3", tensors, header, tokenizer="llama",
               quantized=lambda n: quantized and n.startswith("blk.") and "norm" not in n)


def test_a_partial_rotary_gguf_file_gives_the_checkpoints_logits(tmp_path):
    hf = write_checkpoint(tmp_path / "hf", LONGROPE)
    path = tmp_path / "tiny-phi4-mini.gguf"
    write_gguf_file(path, hf, quantized=False)
    from_gguf = resolve_model_source(EngineConfig(model=str(path)))
    assert from_gguf.arch.rotary_dim == ROTARY_DIM
    logits = [PagedDriver(load_model(source, torch.float32, CPU, progress=False)).step([("a", PROMPT_48)])
              for source in (from_gguf, resolve_model_source(EngineConfig(model=str(tmp_path / "hf"))))]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_packed_q8_rows_are_reordered_as_dequantized_ones(tmp_path):
    """--quantization gguf keeps attn_qkv packed: its q and k rows move whole, as the dequantized ones."""
    path = tmp_path / "tiny-phi4-mini-q8.gguf"
    write_gguf_file(path, write_checkpoint(tmp_path / "hf", LONGROPE), quantized=True)
    source = resolve_model_source(EngineConfig(model=str(path)))
    logits = [PagedDriver(load_model(source, torch.float32, CPU, progress=False, quantization=q)).step(
        [("a", PROMPT_48)]) for q in (None, "gguf")]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_phi4_mini_and_phi35_mini_config_json_shapes():
    """Phi-4-mini (head 128, 96 rotated, 48 factors) and Phi-3.5-mini (head 96, 48 factors): both
    131072 positions over 4096 of pre-training, so an attention factor of sqrt(1 + ln 32 / ln 4096)."""
    common = {"architectures": ["Phi3ForCausalLM"], "hidden_size": 3072, "intermediate_size": 8192,
              "num_hidden_layers": 32, "vocab_size": 32064, "max_position_embeddings": 131072,
              "original_max_position_embeddings": 4096}
    factors = {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.5] * 48}
    phi4 = ArchConfig.from_hf_config({**common, "num_attention_heads": 24, "num_key_value_heads": 8,
                                      "partial_rotary_factor": 0.75, "rope_scaling": factors})
    phi35 = ArchConfig.from_hf_config({**common, "num_attention_heads": 32, "rope_scaling": factors})
    assert (phi4.head_dim, phi4.rotary_dim, phi35.head_dim, phi35.rotary_dim) == (128, 96, 96, None)
    for arch in (phi4, phi35):
        assert arch.rope_scaling.attention_factor == pytest.approx(1.1902380714238083)
        assert arch.rope_scaling.ext_factors == (1.5,) * 48
        assert arch.served_at(4096).rope_scaling.ext_factors == (1.0,) * 48
