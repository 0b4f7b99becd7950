"""Block tables: which KV blocks hold each request's tokens, and automatic prefix caching.

Token t of a request lives in block `table[t // block_size]` at offset `t % block_size`,
so its slot is `table[t // block_size] * block_size + t % block_size`.

Prefix caching (on unless `enable_caching=False`): block i of a request is named by the
hash of (block i-1's hash, block i's token ids), so equal hashes mean equal tokens from
the first one on. A block is registered as soon as it is full of tokens scheduled for
computation (its K/V are written in that step, before any attention reads the cache), so
requests admitted later, even in the same step, share it. A new request, or a preempted
one coming back, starts from the longest run of its leading full blocks that is cached;
`num_computed_tokens` starts there and the runner computes only the rest.
docs/prefix-caching.md tells the whole story.

Sliding window (`sliding_window_tokens`, when every layer of the model has the same one): a
query at position p reads keys p - window < j <= p only, so once a request has computed c
tokens, its blocks wholly before position c - window are never read again. Each allocation
frees them (their table entries become FREED_BLOCK), so a decoding request holds at most
ceil(window / block_size) + 1 blocks whatever its length. A freed block that is cached stays
findable, like any freed cached block, until evicted: its K/V are still those of its prefix.

KV cache groups (`group_windows`, models mixing windowed and full layers: Gemma 2 and 3; see
kv_groups.py): a request has one table per group, all of the same length, each taking blocks of the
one pool; a windowed group frees what its window left, the full-attention group keeps all. An
allocation takes its blocks for every group or none. Prefix caching needs one group (a hit would
have to cover every group's window; the engine turns it off for hybrid models).
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from fitserve.core.block_pool import BlockKey, BlockPool
from fitserve.request import Request

HASH_BYTES = 16  # 128-bit block hashes: a chance collision is negligible, and hits are verified anyway
# A table entry whose block left the sliding window and was freed. The attention kernels never read
# such a block for its values (kernels/reference.py selects it away, the Triton kernels start after
# it), so any valid block id serves; 0 is also what the runner pads tables with.
FREED_BLOCK = 0


def hash_block(parent_hash: int | None, token_bytes: bytes) -> int:
    """A stable hash (the same in every process and on every machine) of a block and its prefix."""
    digest = hashlib.blake2b(digest_size=HASH_BYTES)
    digest.update(b"root" if parent_hash is None else parent_hash.to_bytes(HASH_BYTES, "little"))
    digest.update(token_bytes)
    return int.from_bytes(digest.digest(), "little")


def token_bytes(token_ids: tuple[int, ...] | list[int]) -> bytes:
    ids = array("i", token_ids)  # int32: every vocabulary fits
    if sys.byteorder == "big":
        ids.byteswap()
    return ids.tobytes()


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@dataclass(slots=True)
class PrefixCacheStats:
    """Lookups since the last `take_prefix_cache_stats()`, in tokens (vLLM's units)."""

    queries: int = 0  # tokens of new requests looked up (their prompts)
    hits: int = 0  # of those, tokens found in the cache
    preempted_queries: int = 0  # the same for preempted requests coming back (not in vLLM's counters)
    preempted_hits: int = 0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 hash_fn: Callable[[int | None, bytes], int] = hash_block,
                 sliding_window_tokens: int | None = None,
                 group_windows: tuple[int | None, ...] | None = None) -> None:
        """`group_windows`: per KV cache group its window (None: full attention); None for one group
        with `sliding_window_tokens`. Group 0's table is `block_table(request_id)`."""
        windows = group_windows if group_windows is not None else (sliding_window_tokens,)
        assert windows and all(w is None or w >= 1 for w in windows)
        assert len(windows) == 1 or not enable_caching, "prefix caching needs one KV cache group"
        self.block_size = block_size
        self.group_windows = windows
        self.num_groups = len(windows)
        self._windowed_groups = tuple(g for g, window in enumerate(windows) if window is not None)
        self.sliding_window_tokens = windows[0] if len(windows) == 1 else None  # the uniform window, if any
        self.enable_caching = enable_caching
        self.hash_fn = hash_fn  # tests force collisions through it
        self.pool = BlockPool(num_blocks)
        # Per request holding blocks: one table per group, all of the same length.
        self._tables: dict[str, list[list[int]]] = {}
        # Per live request: the keys of its full blocks computed so far (kept through preemption).
        self._keys: dict[str, list[BlockKey]] = {}
        # Per request holding blocks: how many leading blocks of its table were found or registered.
        self._num_registered: dict[str, int] = {}
        # Per request holding blocks, per group: how many leading table entries left the window (FREED_BLOCK).
        self._num_freed: dict[str, list[int]] = {}
        self._stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_free_tokens(self) -> int:
        return self.pool.num_free_blocks * self.block_size

    def block_table(self, request_id: str, group: int = 0) -> list[int]:
        tables = self._tables.get(request_id)
        return tables[group] if tables is not None else []

    def block_tables(self, request_id: str) -> list[list[int]]:
        """One table per group (empty lists for a request holding no blocks)."""
        return self._tables.get(request_id) or [[] for _ in self.group_windows]

    # -- prefix caching ------------------------------------------------------------------

    def _block_keys(self, request: Request, num_blocks: int) -> list[BlockKey]:
        """The keys of the request's first `num_blocks` full blocks (computed once, then kept)."""
        keys = self._keys.setdefault(request.request_id, [])
        size = self.block_size
        while len(keys) < num_blocks:
            start = len(keys) * size
            parent = keys[-1].block_hash if keys else None
            data = token_bytes(request.token_ids_slice(start, start + size))
            keys.append(BlockKey(self.hash_fn(parent, data), parent, data))
        return keys[:num_blocks]

    def find_cached_prefix(self, request: Request) -> list[int]:
        """The cached blocks holding the longest cached run of the request's leading full blocks.

        At most `num_tokens - 1` tokens are served from the cache: the model must compute at
        least the last token to produce logits. So a partial last block is never reused, and a
        request whose tokens all sit in cached full blocks recomputes its whole last block
        rather than its last token alone: writing one token into a cached block would change a
        block other requests may be reading, and recomputing a block costs at most
        block_size - 1 tokens more.
        """
        if not self.reads_cache(request):
            return []
        assert request.request_id not in self._tables, "only a request without blocks looks up the cache"
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for key in self._block_keys(request, max_blocks):
            block_id = self.pool.lookup(key)
            if block_id is None:
                break  # a block after a miss was computed after other tokens: useless here
            hits.append(block_id)
        return hits

    def reads_cache(self, request: Request) -> bool:
        """Whether the request may start from cached blocks. One asking for prompt logprobs may
        not (as in vLLM): the model must see every prompt position to score it. Its own blocks
        are still registered for others."""
        return self.enable_caching and request.sampling_params.prompt_logprobs is None

    def record_lookup(self, request: Request, num_hit_tokens: int) -> None:
        """Count an admitted request's lookup (not one that failed to get blocks and will retry)."""
        if not self.reads_cache(request):
            return
        if request.num_preemptions:
            self._stats.preempted_queries += request.num_tokens
            self._stats.preempted_hits += num_hit_tokens
        else:
            self._stats.queries += request.num_tokens
            self._stats.hits += num_hit_tokens

    def take_prefix_cache_stats(self) -> PrefixCacheStats:
        stats, self._stats = self._stats, PrefixCacheStats()
        return stats

    def _register_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Register the blocks filled by the first `num_tokens` tokens, not registered yet."""
        if not self.enable_caching:
            return
        rid = request.request_id
        num_full = num_tokens // self.block_size
        done = self._num_registered.get(rid, 0)
        if num_full <= done:
            return
        table = self._tables[rid][0]  # one group: see __init__
        keys = self._block_keys(request, num_full)
        for index in range(max(done, self._num_freed[rid][0]), num_full):
            self.pool.cache(table[index], keys[index])  # False for a duplicate: the first one stays found
        self._num_registered[rid] = num_full

    # -- allocation --------------------------------------------------------------------------

    def allocate_slots(self, request: Request, num_tokens: int, cached_blocks: list[int] | None = None) -> bool:
        """Grow the request's tables to hold `num_tokens` tokens in all, the first blocks being
        `cached_blocks` (from `find_cached_prefix`, for a request holding no blocks yet).

        First frees the request's blocks that left its sliding window (if any; see the module
        docstring). Returns False, changing nothing else, when the pool has too few free blocks for
        every group. On success the blocks full within `num_tokens` are registered in the prefix
        cache: the caller schedules those tokens for computation in this step. A block holding a
        token not sampled yet (async scheduling plans a step before the last one's tokens are known)
        waits for a later call: its hash needs the token.
        """
        rid = request.request_id
        cached_blocks = cached_blocks or []
        tables = self._tables.get(rid)
        assert not (cached_blocks and tables), "cached blocks start a table; they are never added to one"
        if tables is not None:  # first, so that what the window left can serve this allocation
            for group in self._windowed_groups:
                self._free_out_of_window(request, group, tables[group])
        held = len(tables[0]) if tables else len(cached_blocks)
        num_new = max(blocks_for_tokens(num_tokens, self.block_size) - held, 0)
        # Cached blocks wholly before the window of the first token computed are not even taken.
        num_behind = 0 if tables else self._num_behind_window(0, len(cached_blocks) * self.block_size)
        # A cached block that is free leaves the free queue when taken: count it with the new ones.
        num_cached_free = sum(1 for block_id in cached_blocks[num_behind:] if self.pool.ref_count(block_id) == 0)
        if num_new * self.num_groups + num_cached_free > self.pool.num_free_blocks:
            return False
        if tables is None:
            self.pool.touch(cached_blocks[num_behind:])
            first = [FREED_BLOCK] * num_behind + cached_blocks[num_behind:]
            tables = self._tables[rid] = [first] + [[] for _ in self.group_windows[1:]]
            self._num_registered[rid] = len(cached_blocks)
            self._num_freed[rid] = [num_behind] + [0] * (self.num_groups - 1)
        if num_new:
            for table in tables:
                new_blocks = self.pool.allocate(num_new)
                assert new_blocks is not None, "checked above"
                table.extend(new_blocks)
        self._register_full_blocks(request, min(num_tokens, request.num_tokens))
        return True

    def _free_out_of_window(self, request: Request, group: int, table: list[int]) -> None:
        """Free the group's blocks wholly before (num_computed_tokens - window): the queries of this
        step and later ones, at positions >= num_computed_tokens, never read them."""
        num_freed = self._num_freed[request.request_id]
        done = num_freed[group]
        num_behind = self._num_behind_window(group, request.num_computed_tokens)
        if num_behind <= done:
            return
        self.pool.free(table[done:num_behind])
        table[done:num_behind] = [FREED_BLOCK] * (num_behind - done)
        num_freed[group] = num_behind

    def _num_behind_window(self, group: int, num_computed_tokens: int) -> int:
        """Leading blocks of a group that no query at a position >= num_computed_tokens reads (0 without
        a window)."""
        window = self.group_windows[group]
        if window is None:
            return 0
        return max(0, (num_computed_tokens - window) // self.block_size)

    def num_held_blocks(self, request_id: str, group: int | None = None) -> int:
        """Blocks the request holds in `group` (None: in all groups): its tables less the entries freed
        behind the window."""
        tables = self._tables.get(request_id)
        if tables is None:
            return 0
        num_freed = self._num_freed[request_id]
        groups = range(self.num_groups) if group is None else (group,)
        return sum(len(tables[g]) - num_freed[g] for g in groups)

    def free(self, request_id: str, keep_keys: bool = False) -> None:
        """Release every block of the request, in every group (preemption or finish); unknown ids are
        a no-op.

        Cached blocks stay findable until evicted. `keep_keys` (preemption) keeps the request's
        block hashes for its return.
        """
        tables = self._tables.pop(request_id, None)
        self._num_registered.pop(request_id, None)
        num_freed = self._num_freed.pop(request_id, None)
        if not keep_keys:
            self._keys.pop(request_id, None)
        if tables:
            assert num_freed is not None
            for table, freed in zip(tables, num_freed):
                self.pool.free(table[freed:])

    # -- checks --------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        held = Counter(block for rid, tables in self._tables.items()
                       for table, freed in zip(tables, self._num_freed[rid]) for block in table[freed:])
        for block_id in range(self.pool.num_blocks):
            assert self.pool.ref_count(block_id) == held[block_id], (
                f"block {block_id}: ref count {self.pool.ref_count(block_id)} but held by {held[block_id]} tables"
            )
        assert self.pool.num_free_blocks + len(held) == self.pool.num_blocks, "free + used != all blocks"
        assert set(self._num_registered) == set(self._tables), "registration state without a table, or missing"
        assert set(self._num_freed) == set(self._tables), "window state without a table, or missing"
        for rid, tables in self._tables.items():
            assert len(tables) == self.num_groups and len({len(t) for t in tables}) == 1, f"{rid}: tables differ"
            for group, (full_table, num_freed) in enumerate(zip(tables, self._num_freed[rid])):
                assert self.group_windows[group] is not None or num_freed == 0, "blocks freed without a window"
                assert full_table[:num_freed] == [FREED_BLOCK] * num_freed, f"{rid}: a freed entry names a block"
                table = full_table[num_freed:]
                assert len(set(table)) == len(table), f"{rid}: a block twice in one table"
            self._check_cached_entries(rid)

    def _check_cached_entries(self, rid: str) -> None:
        """A cached block in a table holds exactly that request's tokens there (one group only)."""
        num_freed, keys = self._num_freed[rid][0], self._keys.get(rid, [])
        for index, block_id in enumerate(self._tables[rid][0][num_freed:], start=num_freed):
            key = self.pool.block_keys[block_id]
            if key is not None:
                assert index < self._num_registered[rid] and index < len(keys) and keys[index] == key, (
                    f"{rid}: block {block_id} at {index} is cached with other contents"
                )

    def check_request_ids(self, live_request_ids: set[str]) -> None:
        """No state kept for requests that are gone."""
        assert set(self._tables) <= live_request_ids, "blocks held by finished requests"
        assert set(self._keys) <= live_request_ids, "block hashes kept for finished requests"
