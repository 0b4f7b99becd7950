"""The block pool and the block tables: ref counts, the free queue, and prefix caching."""

import pytest

from fitserve.core.block_pool import BlockKey, BlockPool
from fitserve.core.kv_cache_manager import KVCacheManager, hash_block, token_bytes
from fitserve.request import Request
from fitserve.sampling_params import SamplingParams


def key(tokens, parent=None, block_hash=None):
    data = token_bytes(tokens)
    return BlockKey(hash_block(parent, data) if block_hash is None else block_hash, parent, data)


def request(rid, tokens):
    return Request(rid, tuple(tokens), SamplingParams(max_tokens=8))


def test_allocate_until_empty_then_none():
    pool = BlockPool(4)
    first = pool.allocate(3)
    assert first is not None and len(set(first)) == 3
    assert pool.allocate(2) is None, "a request larger than the free pool gets nothing"
    assert pool.num_free_blocks == 1, "a failed allocation takes no block"
    assert pool.allocate(1) is not None
    assert pool.allocate(1) is None
    pool.check_invariants()


def test_shared_block_is_free_only_after_last_reference():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.touch([block])
    pool.free([block])
    assert pool.ref_count(block) == 1 and pool.num_free_blocks == 1
    pool.free([block])
    assert pool.ref_count(block) == 0 and pool.num_free_blocks == 2
    pool.check_invariants()


def test_double_free_is_caught():
    pool = BlockPool(2)
    blocks = pool.allocate(1)
    pool.free(blocks)
    with pytest.raises(AssertionError):
        pool.free(blocks)


def test_freed_cached_block_is_found_until_evicted_least_recently_freed_first():
    pool = BlockPool(4)
    a, b, c, d = pool.allocate(4)
    for block, tokens in ((a, [1]), (b, [2]), (c, [3])):
        assert pool.cache(block, key(tokens))
    pool.free([a])
    pool.free([b])
    pool.free([c, d])  # d holds nothing: it is reused before any cached block
    pool.check_invariants()
    assert pool.num_free_blocks == 4 and pool.num_cached_blocks == 3
    assert pool.lookup(key([2])) == b, "a free cached block is still found"
    assert pool.allocate(1) == [d]
    assert pool.allocate(1) == [a], "then the least recently freed cached block"
    assert pool.lookup(key([1])) is None and pool.num_evictions_total == 1
    pool.check_invariants()
    pool.touch([b])  # a hit on a free cached block takes it out of the free queue
    assert pool.ref_count(b) == 1 and pool.num_free_blocks == 1
    assert pool.allocate(1) == [c], "b is held now: c is the only free block left"
    assert pool.allocate(1) is None
    pool.check_invariants()


def test_a_tables_blocks_are_evicted_tail_first():
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    parent = None
    for index, block in enumerate(blocks):
        block_key = key([index], parent)
        pool.cache(block, block_key)
        parent = block_key.block_hash
    pool.free(blocks)
    assert pool.allocate(1) == [blocks[2]]
    assert pool.allocate(1) == [blocks[1]]
    pool.check_invariants()


def test_hash_collisions_are_never_served():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    assert pool.cache(a, key([1, 2], block_hash=7))
    assert pool.lookup(key([1, 2], block_hash=7)) == a
    assert pool.lookup(key([9, 9], block_hash=7)) is None, "same hash, other tokens"
    assert pool.lookup(key([1, 2], parent=5, block_hash=7)) is None, "same hash and tokens, other prefix"
    assert not pool.cache(b, key([9, 9], block_hash=7)), "a second block under a taken hash stays uncached"
    assert pool.block_keys[b] is None
    pool.free([a, b])
    pool.check_invariants()


def test_reset_prefix_cache_forgets_every_block():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache(a, key([1]))
    pool.cache(b, key([2]))
    pool.free([a])
    pool.reset_prefix_cache()
    assert pool.num_cached_blocks == 0 and pool.lookup(key([1])) is None
    pool.check_invariants()
    pool.free([b])
    pool.check_invariants()


def test_manager_grows_tables_by_whole_blocks():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    a, b = request("a", range(9)), request("b", range(100, 121))
    assert manager.allocate_slots(a, 5)  # 2 blocks
    assert len(manager.block_table("a")) == 2
    assert manager.allocate_slots(a, 8)  # still 2 blocks
    assert len(manager.block_table("a")) == 2
    assert manager.allocate_slots(a, 9)
    assert len(manager.block_table("a")) == 3
    assert not manager.allocate_slots(b, 21), "6 blocks requested, 5 free"
    assert manager.block_table("b") == []
    manager.check_invariants()
    manager.free("a")
    assert manager.num_free_blocks == 8
    manager.check_invariants()


def test_second_request_reuses_full_blocks_but_never_the_partial_one():
    manager = KVCacheManager(num_blocks=16, block_size=4)
    first = request("first", range(10))  # blocks [0-3] [4-7], partial [8, 9]
    assert manager.find_cached_prefix(first) == []
    assert manager.allocate_slots(first, 10)
    manager.check_invariants()
    table = manager.block_table("first")
    assert manager.pool.num_cached_blocks == 2, "the two full blocks are registered when scheduled"

    same_prefix = request("same", [*range(8), 50, 51, 52])
    assert manager.find_cached_prefix(same_prefix) == table[:2]
    longer = request("longer", [*range(10), 60, 61])  # shares 10 tokens, but block 3 is partial in `first`
    assert manager.find_cached_prefix(longer) == table[:2]
    other_first_block = request("other", [0, 1, 2, 99, *range(4, 10)])
    assert manager.find_cached_prefix(other_first_block) == [], "a block after a miss is useless"

    hits = manager.find_cached_prefix(same_prefix)
    assert manager.allocate_slots(same_prefix, 11, hits)
    assert manager.block_table("same")[:2] == table[:2]
    assert [manager.pool.ref_count(b) for b in table[:3]] == [2, 2, 1]
    manager.check_invariants()
    manager.free("first")
    manager.free("same")
    manager.check_invariants()
    assert manager.num_free_blocks == 16


def test_a_prompt_cached_in_full_blocks_recomputes_its_last_block():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    first = request("first", range(8))
    manager.allocate_slots(first, 8)
    manager.free("first")
    again = request("again", range(8))
    hits = manager.find_cached_prefix(again)
    assert len(hits) == 1, "8 cached tokens, but the last one must be computed: the whole last block is"
    assert manager.allocate_slots(again, 8, hits)
    manager.check_invariants()


def test_allocation_counts_free_cached_hits_and_changes_nothing_when_short():
    manager = KVCacheManager(num_blocks=4, block_size=4)
    manager.allocate_slots(request("a", range(12)), 12)  # 3 blocks, cached
    manager.free("a")
    b = request("b", [*range(12), 7, 7, 7, 7, 7])  # 17 tokens: 3 cached + 2 new blocks, 4 free in all
    hits = manager.find_cached_prefix(b)
    assert len(hits) == 3
    assert not manager.allocate_slots(b, 17, hits), "3 free cached + 2 new blocks > 4 free blocks"
    assert manager.block_table("b") == [] and manager.num_free_blocks == 4 and manager.pool.num_cached_blocks == 3
    manager.check_invariants()
    assert manager.allocate_slots(b, 16, hits)  # 3 cached + 1 new
    assert manager.num_free_blocks == 0
    manager.check_invariants()


def test_forced_hash_collisions_are_verified_against_tokens_and_prefix():
    constant = KVCacheManager(num_blocks=8, block_size=2, hash_fn=lambda parent, data: 1)
    constant.allocate_slots(request("a", [1, 2, 3, 4]), 4)
    assert constant.find_cached_prefix(request("b", [5, 6, 7])) == [], "equal hashes, other tokens"
    assert len(constant.find_cached_prefix(request("c", [1, 2, 3]))) == 1
    constant.check_invariants()

    tokens_only = KVCacheManager(num_blocks=8, block_size=2, hash_fn=lambda parent, data: hash(data))
    tokens_only.allocate_slots(request("a", [1, 2, 3, 4, 5]), 5)  # blocks [1, 2] then [3, 4]
    # [3, 4] as a first block has the hash and tokens of a's second block, but not its prefix.
    assert tokens_only.find_cached_prefix(request("b", [3, 4, 9])) == []
    tokens_only.check_invariants()


def test_caching_off_finds_nothing():
    manager = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)
    manager.allocate_slots(request("a", range(9)), 9)
    manager.free("a")
    assert manager.find_cached_prefix(request("b", range(9))) == []
    assert manager.pool.num_cached_blocks == 0
    manager.check_invariants()


def test_block_hashes_are_stable_across_processes_and_machines():
    """blake2b of fixed bytes: these numbers must never change (Python's hash() would, per process)."""
    first = hash_block(None, token_bytes([1, 2, 3, 4]))
    assert first == 316656693404356750158835375371187905469
    assert hash_block(first, token_bytes([5, 6, 7, 8])) == 301578022036340368991699359984980636342
    assert token_bytes([1, 258]) == b"\x01\x00\x00\x00\x02\x01\x00\x00", "int32, little-endian"
