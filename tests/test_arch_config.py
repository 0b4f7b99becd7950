"""ArchConfig's per-layer sliding windows."""

from __future__ import annotations

import pytest

from fitserve.arch_config import ArchConfig
from fitserve.config import ConfigError

SHAPES = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
              num_key_value_heads=1, head_dim=8)


def test_no_window_means_every_layer_attends_over_the_whole_context():
    arch = ArchConfig(**SHAPES)
    assert [arch.layer_window(i) for i in range(3)] == [None, None, None]


def test_a_window_without_layer_types_applies_to_every_layer():
    arch = ArchConfig(**SHAPES, sliding_window=4096)
    assert [arch.layer_window(i) for i in range(3)] == [4096, 4096, 4096]


def test_layer_types_pick_the_windowed_layers():
    arch = ArchConfig(**SHAPES, sliding_window=512,
                      layer_types=("sliding_attention", "sliding_attention", "full_attention"))
    assert [arch.layer_window(i) for i in range(3)] == [512, 512, None]


def test_layer_types_must_name_every_layer():
    with pytest.raises(ConfigError, match="layer_types has 2 entries for 3 layers"):
        ArchConfig(**SHAPES, sliding_window=512, layer_types=("sliding_attention", "full_attention"))


def _hf(arch: str, **cfg) -> ArchConfig:
    base = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, architectures=[arch])
    return ArchConfig.from_hf_config({**base, **cfg})


def test_mistral_v01_windows_every_layer_and_v02_has_no_window():
    v01 = _hf("MistralForCausalLM", sliding_window=4096)
    assert [v01.layer_window(i) for i in range(4)] == [4096] * 4 and v01.uniform_sliding_window == 4096
    v02 = _hf("MistralForCausalLM", sliding_window=None)
    assert v02.sliding_window is None and v02.uniform_sliding_window is None
    assert _hf("LlamaForCausalLM", sliding_window=64).sliding_window is None  # Llama has no window


def test_phi3_windows_every_layer_and_serves_its_whole_context():
    phi3 = _hf("Phi3ForCausalLM", sliding_window=2047, max_position_embeddings=4096)
    assert phi3.max_position_embeddings == 4096 and phi3.uniform_sliding_window == 2047


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_qwen_windows_the_layers_from_max_window_layers_on_when_use_sliding_window(arch):
    """transformers' Qwen2Config/Qwen3Config: layer i slides when use_sliding_window and i >= max_window_layers."""
    off = _hf(arch, sliding_window=64, max_window_layers=1)
    assert off.sliding_window is None
    mixed = _hf(arch, use_sliding_window=True, sliding_window=64, max_window_layers=1)
    assert [mixed.layer_window(i) for i in range(4)] == [None, 64, 64, 64] and mixed.uniform_sliding_window is None
    every = _hf(arch, use_sliding_window=True, sliding_window=64, max_window_layers=0)
    assert [every.layer_window(i) for i in range(4)] == [64] * 4 and every.uniform_sliding_window == 64
    none = _hf(arch, use_sliding_window=True, sliding_window=64)  # the default 28 >= 4 layers
    assert none.sliding_window is None
    named = _hf(arch, use_sliding_window=True, sliding_window=64,
                layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"])
    assert [named.layer_window(i) for i in range(4)] == [None, 64, None, 64]


def test_mixed_layers_have_no_uniform_window():
    arch = ArchConfig(**SHAPES, sliding_window=512,
                      layer_types=("sliding_attention", "full_attention", "sliding_attention"))
    assert arch.uniform_sliding_window is None
