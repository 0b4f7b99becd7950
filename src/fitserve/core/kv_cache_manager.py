"""Block tables: which KV blocks hold each request's tokens.

Token t of a request lives in block `table[t // block_size]` at offset `t % block_size`,
so its slot is `table[t // block_size] * block_size + t % block_size`.
"""

from __future__ import annotations

from collections import Counter

from fitserve.core.block_pool import BlockPool


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_free_tokens(self) -> int:
        return self.pool.num_free_blocks * self.block_size

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def num_blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """New blocks the request needs so that `num_tokens` tokens fit in its table."""
        held = len(self._tables.get(request_id, ()))
        return max(blocks_for_tokens(num_tokens, self.block_size) - held, 0)

    def allocate_slots(self, request_id: str, num_tokens: int) -> bool:
        """Grow the request's table to hold `num_tokens` tokens in all.

        Returns False, changing nothing, when the pool has too few free blocks.
        """
        num_new = self.num_blocks_needed(request_id, num_tokens)
        if num_new == 0:
            self._tables.setdefault(request_id, [])
            return True
        new_blocks = self.pool.allocate(num_new)
        if new_blocks is None:
            return False
        self._tables.setdefault(request_id, []).extend(new_blocks)
        return True

    def free(self, request_id: str) -> None:
        """Release every block of the request (preemption or finish); unknown ids are a no-op."""
        table = self._tables.pop(request_id, None)
        if table:
            self.pool.free(table)

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        held = Counter(block for table in self._tables.values() for block in table)
        for block_id in range(self.pool.num_blocks):
            assert self.pool.ref_count(block_id) == held[block_id], (
                f"block {block_id}: ref count {self.pool.ref_count(block_id)} but held by {held[block_id]} tables"
            )
        assert self.pool.num_free_blocks + len(held) == self.pool.num_blocks, "free + used != all blocks"
