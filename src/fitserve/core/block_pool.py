"""The pool of KV-cache blocks: which are free, and how many tables hold each one.

A block is shared when its reference count exceeds one (prefix caching will share full
blocks whose `block_hash` matches). The pool never decides what to evict or preempt:
`allocate` returns None when it cannot serve the whole request, and the caller decides.
"""

from __future__ import annotations

from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        # Free blocks, least recently freed first: prefix caching will evict from the left.
        self._free: deque[int] = deque(range(num_blocks))
        # Reserved for prefix caching: the hash of a full block's tokens and its prefix.
        self.block_hashes: list[int | None] = [None] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0.0 to 1.0."""
        return self.num_used_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Take `num_blocks` free blocks (ref count 1 each), or None if fewer are free."""
        if num_blocks > len(self._free):
            return None
        block_ids = [self._free.popleft() for _ in range(num_blocks)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
            self.block_hashes[block_id] = None
        return block_ids

    def share(self, block_ids: list[int]) -> None:
        """Add one reference to blocks already in use."""
        for block_id in block_ids:
            assert self._ref_counts[block_id] > 0, f"block {block_id} is free and cannot be shared"
            self._ref_counts[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; a block whose count reaches 0 is free again.

        Blocks are released in reverse so that a request's tail blocks, the least likely to
        be shared by a later prefix, are the first to be reused.
        """
        for block_id in reversed(block_ids):
            count = self._ref_counts[block_id]
            assert count > 0, f"block {block_id} freed more often than allocated"
            self._ref_counts[block_id] = count - 1
            if count == 1:
                self._free.append(block_id)

    def check_invariants(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "a block is in the free queue twice"
        for block_id, count in enumerate(self._ref_counts):
            assert count >= 0, f"block {block_id} has a negative ref count"
            assert (count == 0) == (block_id in free), f"block {block_id}: ref count {count} vs free queue"
