"""KV cache groups: which layers share a block table, for models that mix sliding-window and
full-attention layers (Gemma 2 and 3). Torch-free; the cache manager, the runner and the planner
all read the layout from here, so they agree on it.

A model whose layers all have the same window (or none: Llama) has one group holding every layer,
and a block holds one token range of every layer: the layout of a model without groups.

A hybrid model's layers are grouped by window, and every group has the same number of layers (the
count of the smallest window class; the last group of a class may hold fewer): a block of the one
pool holds `num_layers_per_block` layers' K and V for `block_size` tokens, whichever group takes it,
so a block left by a windowed group serves the full-attention group and back (as vLLM's hybrid
allocator does). Each request has one block table per group. The layers at the same position of
their groups share one cache tensor (`layer_slot`): a block belongs to one group at a time, so
they never write the same memory. A windowed group's blocks that left the window are freed, so a
decoding request's windowed group holds at most ceil(window / block_size) + 1 blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KVGroup:
    sliding_window_tokens: int | None  # None: full attention (the group keeps every block)
    layer_indices: tuple[int, ...]  # the model's layers that read this group's block table


@dataclass(frozen=True, slots=True)
class KVLayout:
    groups: tuple[KVGroup, ...]  # full attention first, then by window, widest first

    @property
    def num_layers_per_block(self) -> int:
        """Layers whose K and V one block holds: the cache has this many (K, V) tensor pairs."""
        return max(len(group.layer_indices) for group in self.groups)

    @property
    def windows(self) -> tuple[int | None, ...]:
        return tuple(group.sliding_window_tokens for group in self.groups)

    @property
    def is_hybrid(self) -> bool:
        return len(self.groups) > 1

    def layer_group(self, layer: int) -> int:
        return next(g for g, group in enumerate(self.groups) if layer in group.layer_indices)

    def layer_slot(self, layer: int) -> int:
        """The cache tensor pair of `layer`: its position in its group."""
        return self.groups[self.layer_group(layer)].layer_indices.index(layer)


def kv_layout(layer_windows: Sequence[int | None]) -> KVLayout:
    """The groups of a model whose layer i attends within layer_windows[i] (None: the whole context)."""
    distinct = set(layer_windows)
    if len(distinct) == 1:
        return KVLayout((KVGroup(layer_windows[0], tuple(range(len(layer_windows)))),))
    classes = sorted(distinct, key=_window_order)
    by_class = {w: tuple(i for i, lw in enumerate(layer_windows) if lw == w) for w in classes}
    size = min(len(layers) for layers in by_class.values())
    groups = tuple(KVGroup(w, layers[start:start + size])
                   for w, layers in by_class.items() for start in range(0, len(layers), size))
    return KVLayout(groups)


def _window_order(window: int | None) -> float:
    return float("-inf") if window is None else -window


def group_blocks(window: int | None, num_tokens: int, block_size: int) -> int:
    """Blocks one group of a decoding request at `num_tokens` tokens holds: all of them, or with a
    window at most ceil(window / block_size) + 1 (the window may straddle one more block)."""
    blocks = -(-num_tokens // block_size)
    return blocks if window is None else min(blocks, -(-window // block_size) + 1)


def request_blocks(windows: Sequence[int | None], num_tokens: int, block_size: int) -> int:
    """Blocks of the pool one decoding request at `num_tokens` tokens holds over all groups."""
    return sum(group_blocks(window, num_tokens, block_size) for window in windows)


def peak_request_blocks(windows: Sequence[int | None], num_tokens: int, block_size: int, chunk_tokens: int) -> int:
    """The most blocks a request of `num_tokens` holds at once: a windowed group also holds a step's
    chunk (`chunk_tokens`, stored before the blocks it pushes out of the window are freed)."""
    full = -(-num_tokens // block_size)
    return sum(full if w is None else min(full, -(-(w + chunk_tokens) // block_size) + 1) for w in windows)


def max_request_tokens(windows: Sequence[int | None], num_blocks: int, block_size: int,
                       chunk_tokens: int) -> int | None:
    """The longest request (in tokens) whose blocks fit a pool of `num_blocks`; None when a request
    of any length fits (every group windowed and the windows fit)."""
    if all(w is not None for w in windows):
        most = sum(-(-(w + chunk_tokens) // block_size) + 1 for w in windows if w is not None)
        return None if most <= num_blocks else num_blocks * block_size // len(windows)
    low, high = 0, num_blocks * block_size  # the full group alone bounds it
    while low < high:  # the largest n with peak_request_blocks(n) <= num_blocks
        mid = (low + high + 1) // 2
        if peak_request_blocks(windows, mid, block_size, chunk_tokens) <= num_blocks:
            low = mid
        else:
            high = mid - 1
    return low
