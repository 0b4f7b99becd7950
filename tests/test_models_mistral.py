"""Mistral's sliding window against transformers on tiny random checkpoints (float32, CPU): v0.1's
window on every layer (shorter here than prompt plus output), through the paged cache and through
the engine, which frees the blocks the window leaves; v0.2's null window attends over everything.
Qwen2 with use_sliding_window on some layers (max_window_layers) is compared the same way."""

from __future__ import annotations

import pytest
import torch
import transformers

from fitserve.models.llama import LlamaForCausalLM
from hf_compare_helpers import check_engine_greedy, check_prefill_and_decode, load_ours, save_random_checkpoint

TINY = dict(vocab_size=311, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            rope_theta=10000.0)
WINDOW = 7  # shorter than every prompt plus its 20 outputs in check_engine_greedy
LONG_PROMPTS = [list(range(3, 40)), [7, 8, 9], list(range(100, 112))]


def write_mistral(folder, sliding_window):
    torch.manual_seed(0)
    config = transformers.MistralConfig(**TINY, sliding_window=sliding_window)
    return save_random_checkpoint(folder, transformers.MistralForCausalLM(config).eval())


def test_v01_window_matches_transformers_through_the_paged_cache(tmp_path):
    hf = write_mistral(tmp_path, WINDOW)
    source, ours = load_ours(tmp_path)
    assert isinstance(ours, LlamaForCausalLM) and source.arch.uniform_sliding_window == WINDOW
    assert all(layer.self_attn.attn.sliding_window == WINDOW for layer in ours.layers)
    check_prefill_and_decode(ours, hf, prompts=LONG_PROMPTS, num_decode_steps=6)


@pytest.mark.parametrize("block_size", [4, 16])
def test_the_engine_with_a_window_generates_transformers_greedy_tokens(tmp_path, block_size):
    check_engine_greedy(tmp_path, write_mistral(tmp_path, WINDOW), block_size=block_size)


def test_v02_null_window_attends_over_everything(tmp_path):
    hf = write_mistral(tmp_path, None)
    source, ours = load_ours(tmp_path)
    assert source.arch.sliding_window is None
    assert all(layer.self_attn.attn.sliding_window is None for layer in ours.layers)
    check_prefill_and_decode(ours, hf, prompts=LONG_PROMPTS, num_decode_steps=2)


def test_qwen2_windowed_layers_after_max_window_layers_match_transformers(tmp_path):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    hf = save_random_checkpoint(tmp_path, transformers.Qwen2ForCausalLM(config).eval())
    source, ours = load_ours(tmp_path)
    assert [layer.self_attn.attn.sliding_window for layer in ours.layers] == [None, WINDOW]
    assert source.arch.uniform_sliding_window is None  # mixed layers: KV cache groups (kv_groups.py)
    check_prefill_and_decode(ours, hf, prompts=LONG_PROMPTS, num_decode_steps=4)
