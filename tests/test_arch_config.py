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
