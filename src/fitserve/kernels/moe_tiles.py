"""The fused MoE kernel's tiles (kernels/triton_moe.py) by batch size.

A batch of T tokens with k experts each makes T*k token choices over E experts; the tiles that run
fastest depend mostly on the mean rows an expert gets, T*k/E (a single decode gives each chosen expert
one row, a 2048-token prefill chunk of Mixtral 512). `moe_tiles.json` beside this file holds the
tiles `benchmarks/moe_tune.py` measured fastest at a range of batch sizes on one card (it names the
card, the shape and the commit); a batch takes the entry of the smallest measured size at or above
its rows per expert, and the largest beyond the last. Without the file, DEFAULT_TABLE: the tiles used
before any were measured. No triton import here, so the choice is tested on the CPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

TILES_PATH = Path(__file__).with_name("moe_tiles.json")

# One grouped GEMM's tile: (BLOCK_N, BLOCK_K, num_warps, num_stages).
GemmTile = tuple[int, int, int, int]


@dataclass(frozen=True)
class MoeConfig:
    """The tiles of one fused_moe call: BLOCK_M rows of one expert per program (the align step pads
    each expert's run to it, so both GEMMs share it) and each GEMM's own tile."""
    block_m: int
    gate_up: GemmTile
    down: GemmTile


# (the largest mean rows per expert an entry serves, its tiles), bounds ascending, the last infinite
Table = list[tuple[float, MoeConfig]]

DEFAULT_TABLE: Table = [
    (32.0, MoeConfig(16, (64, 64, 4, 3), (64, 64, 4, 3))),
    (math.inf, MoeConfig(64, (64, 32, 4, 3), (64, 32, 4, 3))),
]
# float32 (the GPU tests' exact checks) doubles every tile's bytes: small tiles whatever the batch.
FLOAT32_CONFIG = MoeConfig(16, (64, 32, 4, 2), (64, 32, 4, 2))


def config_from(entry: dict) -> MoeConfig:
    block_m, gate_up, down = entry["block_m"], tuple(entry["gate_up"]), tuple(entry["down"])
    sizes = (block_m, *gate_up[:2], *down[:2])
    if len(gate_up) != 4 or len(down) != 4 or any(size < 16 or size & (size - 1) for size in sizes):
        raise ValueError(f"a tile's block sizes are powers of two from 16, with warps and stages: {entry}")
    return MoeConfig(block_m, gate_up, down)


def load_table(path: Path = TILES_PATH) -> Table:
    """moe_tiles.json's entries as a Table; DEFAULT_TABLE where there is no file."""
    if not path.exists():
        return DEFAULT_TABLE
    entries = json.loads(path.read_text())["tiles"]
    bounds = [float(entry["max_rows_per_expert"]) for entry in entries]
    if not entries or bounds != sorted(set(bounds)):
        raise ValueError(f"{path}: the entries' max_rows_per_expert must ascend, without repeats")
    table = [(bound, config_from(entry)) for bound, entry in zip(bounds, entries)]
    table[-1] = (math.inf, table[-1][1])  # the largest measured batch's tiles serve every larger one
    return table


TABLE = load_table()


def config_for(num_choices: int, num_experts: int, dtype: torch.dtype, table: Table | None = None) -> MoeConfig:
    """The tiles for this many token choices over this many experts."""
    if dtype == torch.float32:
        return FLOAT32_CONFIG
    rows_per_expert = num_choices / num_experts
    return next(config for bound, config in (table or TABLE) if rows_per_expert <= bound)
