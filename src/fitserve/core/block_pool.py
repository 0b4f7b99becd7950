"""The pool of KV-cache blocks: which are free, how many tables hold each one, and which
full blocks are cached for reuse by a later request with the same prefix.

A block is shared when its reference count exceeds one. With prefix caching, a full block
is registered under its `BlockKey` (the hash of its tokens and of its whole prefix, plus the
tokens themselves); a later request that finds it takes one more reference instead of
recomputing its K/V. A cached block whose last reference is dropped stays in the free queue
with its contents: it is found again until `allocate` takes it for other tokens (eviction),
least recently freed first. The pool never decides what to evict or preempt beyond that:
`allocate` returns None when it cannot serve the whole request, and the caller decides.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BlockKey:
    """What identifies a full block's contents: its tokens, after which prefix."""

    block_hash: int  # hash of (parent_hash, token_bytes): names the whole prefix up to this block's end
    parent_hash: int | None  # the previous block's block_hash; None for a request's first block
    token_bytes: bytes  # the block's token ids (int32), compared on every hit so a collision is never served


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        # Free blocks, next to be reused first. Blocks holding no cached contents go to the
        # front; cached ones to the back, so among them the least recently freed is evicted
        # first. An OrderedDict removes a cached block from the middle in O(1) on a hit.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_keys: list[BlockKey | None] = [None] * num_blocks  # set while a block is cached
        self._cached: dict[int, int] = {}  # block_hash -> block id
        self.num_evictions_total = 0  # cached blocks reallocated for other tokens

    @property
    def num_free_blocks(self) -> int:
        """Blocks no table holds, cached ones included (they are evicted on demand)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0.0 to 1.0 (cached free blocks count as free, as in vLLM)."""
        return self.num_used_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Take `num_blocks` free blocks (ref count 1 each, no cached contents), or None if
        fewer are free. A cached block taken here is evicted: it can no longer be found."""
        if num_blocks > len(self._free):
            return None
        block_ids = [self._free.popitem(last=False)[0] for _ in range(num_blocks)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
            if self.block_keys[block_id] is not None:
                self._uncache(block_id)
                self.num_evictions_total += 1
        return block_ids

    def touch(self, block_ids: list[int]) -> None:
        """Add one reference to each block; a free (cached) block leaves the free queue."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                assert self.block_keys[block_id] is not None, f"free block {block_id} is not cached: nothing to reuse"
                del self._free[block_id]
            self._ref_counts[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; a block whose count reaches 0 is free again.

        Blocks are released in reverse, so a request's tail blocks, the least likely to be
        shared by a later prefix, are evicted before its head (whose blocks a later request
        must find first: a lookup stops at the first block it misses).
        """
        for block_id in reversed(block_ids):
            count = self._ref_counts[block_id]
            assert count > 0, f"block {block_id} freed more often than allocated"
            self._ref_counts[block_id] = count - 1
            if count == 1:
                self._free[block_id] = None
                if self.block_keys[block_id] is None:  # nothing worth keeping: reuse it first
                    self._free.move_to_end(block_id, last=False)

    # -- prefix caching --------------------------------------------------------------------

    def lookup(self, key: BlockKey) -> int | None:
        """The cached block with exactly these contents after exactly this prefix, or None.

        A hash match alone is not enough: the stored tokens and parent hash must equal the
        key's, so two blocks whose hashes collide can never be confused.
        """
        block_id = self._cached.get(key.block_hash)
        if block_id is None or self.block_keys[block_id] != key:
            return None
        return block_id

    def cache(self, block_id: int, key: BlockKey) -> bool:
        """Register a full block held by a table; False (and nothing changes) when another
        block already holds these contents: the first one stays the one found."""
        assert self._ref_counts[block_id] > 0, f"block {block_id} is free: only held blocks are cached"
        assert self.block_keys[block_id] is None, f"block {block_id} is cached already"
        if key.block_hash in self._cached:
            return False
        self._cached[key.block_hash] = block_id
        self.block_keys[block_id] = key
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (held blocks keep their K/V; they are just not found)."""
        for block_id in list(self._cached.values()):
            self._uncache(block_id)
            if self._ref_counts[block_id] == 0:
                self._free.move_to_end(block_id, last=False)

    def _uncache(self, block_id: int) -> None:
        key = self.block_keys[block_id]
        assert key is not None and self._cached.get(key.block_hash) == block_id
        del self._cached[key.block_hash]
        self.block_keys[block_id] = None

    def check_invariants(self) -> None:
        assert len(self._free) + self.num_used_blocks == self.num_blocks
        for block_id, count in enumerate(self._ref_counts):
            assert count >= 0, f"block {block_id} has a negative ref count"
            assert (count == 0) == (block_id in self._free), f"block {block_id}: ref count {count} vs free queue"
        for block_hash, block_id in self._cached.items():
            key = self.block_keys[block_id]
            assert key is not None and key.block_hash == block_hash, f"block {block_id}: hash map vs its key"
        num_keyed = sum(key is not None for key in self.block_keys)
        assert num_keyed == len(self._cached), "a block has a key but cannot be found by it"
        seen_cached = False
        for block_id in self._free:  # uncached free blocks come first, then cached ones
            is_cached = self.block_keys[block_id] is not None
            assert is_cached or not seen_cached, f"free block {block_id} holds nothing but is behind cached blocks"
            seen_cached |= is_cached
