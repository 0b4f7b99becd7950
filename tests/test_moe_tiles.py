"""The fused MoE kernel's tile table (kernels/moe_tiles.py): which tiles a batch gets, and what a
tiles file must hold. CPU only: the table is data and a lookup; the tiles themselves run in
tests/test_triton_moe.py on the GPU."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fitserve.kernels import moe_tiles
from fitserve.kernels.moe_tiles import MoeConfig


def write(path, tiles):
    path.write_text(json.dumps({"card": "test", "tiles": tiles}))
    return path


def entry(bound, block_m, block_n=64):
    return {"max_rows_per_expert": bound, "block_m": block_m, "gate_up": [block_n, 64, 4, 3], "down": [64, 128, 8, 4]}


def test_a_batch_takes_the_smallest_measured_size_at_or_above_its_rows_per_expert(tmp_path):
    table = moe_tiles.load_table(write(tmp_path / "t.json", [entry(0.25, 16), entry(8, 32), entry(512, 64, 128)]))
    assert table[-1][0] == math.inf  # the largest measured size serves every larger batch

    def block_m(num_tokens, top_k=2, experts=8):
        return moe_tiles.config_for(num_tokens * top_k, experts, torch.bfloat16, table).block_m

    assert block_m(1) == 16  # 0.25 rows per expert: the single decode's entry
    assert block_m(2) == 32  # 0.5: above the first bound
    assert block_m(32) == 32  # 8.0 exactly
    assert block_m(33) == 64
    assert block_m(100_000) == 64
    assert table[1][1] == MoeConfig(32, (64, 64, 4, 3), (64, 128, 8, 4))


def test_float32_always_gets_the_small_tiles(tmp_path):
    table = moe_tiles.load_table(write(tmp_path / "t.json", [entry(4, 128)]))
    assert moe_tiles.config_for(4096, 8, torch.float32, table) == moe_tiles.FLOAT32_CONFIG
    assert moe_tiles.config_for(4096, 8, torch.bfloat16, table).block_m == 128


def test_without_a_file_the_default_table(tmp_path):
    assert moe_tiles.load_table(tmp_path / "absent.json") is moe_tiles.DEFAULT_TABLE


@pytest.mark.parametrize("tiles, message", [
    ([entry(8, 16), entry(2, 32)], "ascend"),
    ([entry(8, 16), entry(8, 32)], "ascend"),
    ([], "ascend"),
    ([entry(8, 24)], "powers of two"),
    ([{**entry(8, 16), "down": [64, 64, 4]}], "powers of two"),
])
def test_a_malformed_file_is_refused(tmp_path, tiles, message):
    with pytest.raises(ValueError, match=message):
        moe_tiles.load_table(write(tmp_path / "t.json", tiles))


def test_the_shipped_table_loads_and_covers_every_batch():
    table = moe_tiles.load_table()
    assert table[-1][0] == math.inf and [bound for bound, _ in table] == sorted(bound for bound, _ in table)
    for num_tokens in (1, 7, 20, 256, 2048, 8192):
        assert moe_tiles.config_for(num_tokens * 2, 8, torch.bfloat16).block_m in (16, 32, 64, 128, 256)
