"""Phi-3 matches transformers on a tiny random checkpoint (float32, CPU): its fused qkv_proj and
gate_up_proj tensors are split at load into the shared layers; what fitserve cannot compute
exactly (yarn scaling) is refused; a sliding window is attended as transformers does.
LongRoPE and a partial rotary factor: tests/test_phi3_longrope*.py."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import transformers

from fitserve.arch_config import ArchConfig
from fitserve.config import ConfigError, EngineConfig
from fitserve.layers.parallel import TensorParallel
from fitserve.models.loader import dummy_weights
from fitserve.models.phi3 import Phi3ForCausalLM
from fitserve.plan.shapes import counts_from_arch, model_param_counts, weight_bytes
from fitserve.weights.loader import safetensors_weights
from fitserve.weights.source import resolve_model_source
from hf_compare_helpers import check_engine_greedy, check_prefill_and_decode, load_ours, save_random_checkpoint

TINY = dict(vocab_size=311, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def write_phi3(folder, **config):
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(**{**TINY, **config})).eval()
    return save_random_checkpoint(folder, hf)


@pytest.mark.parametrize("tied", [False, True])
def test_batched_prefill_and_decode_match_hf(tmp_path, tied):
    hf = write_phi3(tmp_path, tie_word_embeddings=tied)
    names = set(hf.state_dict())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names
    source, ours = load_ours(tmp_path)
    assert isinstance(ours, Phi3ForCausalLM) and source.arch.max_position_embeddings == 256
    check_prefill_and_decode(ours, hf)


def test_the_engine_generates_transformers_greedy_tokens(tmp_path):
    check_engine_greedy(tmp_path, write_phi3(tmp_path))


def test_a_sliding_window_shorter_than_the_context_matches_transformers(tmp_path):
    """transformers masks keys older than the window; the whole max_position_embeddings is served, and
    the engine, freeing the blocks the window leaves, generates transformers' tokens."""
    window = 9
    hf = write_phi3(tmp_path, sliding_window=window)
    source, ours = load_ours(tmp_path)
    assert source.arch.max_position_embeddings == 256 and source.arch.uniform_sliding_window == window
    check_prefill_and_decode(ours, hf, prompts=[list(range(3, 30)), [7, 8, 9]], num_decode_steps=6)
    check_engine_greedy(tmp_path, hf, block_size=4)


@pytest.mark.parametrize("tied", [False, True])
def test_plan_weight_bytes_are_the_models_bytes(tmp_path, tied):
    write_phi3(tmp_path, tie_word_embeddings=tied)
    source, ours = load_ours(tmp_path)
    held_bytes = sum(t.numel() * t.element_size() for t in [*ours.parameters(), *ours.buffers()])
    from_config = counts_from_arch(source.arch)
    from_headers = model_param_counts(source.arch, str(tmp_path))
    assert from_headers.source == "safetensors headers" and replace(from_headers, source="config.json") == from_config
    assert weight_bytes(from_headers, "float32", None).total_bytes == held_bytes
    assert from_headers.num_linear_tensors == 4 * source.arch.num_hidden_layers  # fused tensors count once


@pytest.mark.parametrize("whole", [True, False])  # handed whole, or read as the rank's slice
def test_a_tensor_parallel_rank_takes_its_rows_of_the_fused_tensors(tmp_path, whole):
    hf = write_phi3(tmp_path)
    source = resolve_model_source(EngineConfig(model=str(tmp_path)))
    rank1 = Phi3ForCausalLM(source.arch, torch.float32, torch.device("cpu"), tp=TensorParallel(rank=1, size=2))
    state = hf.state_dict()
    assert rank1.checkpoint_slice("model.layers.0.self_attn.qkv_proj.weight") is None  # read whole, split here
    loaded = rank1.load_weights(state.items() if whole else safetensors_weights(str(tmp_path), rank1.checkpoint_slice))
    assert loaded == rank1.expected_weight_names() | ({"lm_head.weight"} & set(state))
    q, k, v = state["model.layers.1.self_attn.qkv_proj.weight"].split([64, 32, 32])
    want = torch.cat([q[32:], k[16:], v[16:]])  # rank 1: heads 2-3 of q, KV head 1
    torch.testing.assert_close(rank1.layers[1].self_attn.qkv_proj.weight, want, rtol=0, atol=0)


def test_dummy_weights_are_the_fused_checkpoint_shapes():
    arch = ArchConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=64, architecture="Phi3ForCausalLM")
    model = Phi3ForCausalLM(arch, torch.float32, torch.device("cpu"))
    assert model.load_weights(dummy_weights(model)) == model.expected_weight_names()


def test_yarn_scaling_is_refused(tmp_path):
    """transformers reads a Phi-3 "yarn" rope_scaling as LongRoPE; fitserve serves "longrope" / "su" only
    (tests/test_phi3_longrope.py)."""
    write_phi3(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters", None)
    rope = {"type": "yarn", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_scaling": rope}))
    with pytest.raises(ConfigError, match="'yarn' is not supported"):
        resolve_model_source(EngineConfig(model=str(tmp_path)))


def test_a_partial_rotary_factor_is_refused_for_other_architectures(tmp_path):
    """Phi-3 serves it (tests/test_phi3_longrope_partial.py); Llama's q/k rows are not reordered for it."""
    write_phi3(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "partial_rotary_factor": 0.75,
                                                      "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match="partial_rotary_factor 0.75"):
        resolve_model_source(EngineConfig(model=str(tmp_path)))


def test_plan_counts_phi3_minis_published_parameters():
    """Phi-3-mini-4k's config.json: 3,821,079,552 parameters, its whole 4096-token context served with a
    2047-token window on every layer."""
    arch = ArchConfig.from_hf_config({
        "architectures": ["Phi3ForCausalLM"], "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096,
        "sliding_window": 2047, "rope_scaling": None, "tie_word_embeddings": False})
    assert counts_from_arch(arch).num_params == 3_821_079_552 and arch.max_position_embeddings == 4096
    assert arch.uniform_sliding_window == 2047
