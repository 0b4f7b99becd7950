import pytest

from fitserve.core.block_pool import BlockPool
from fitserve.core.kv_cache_manager import KVCacheManager


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
    pool.share([block])
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


def test_manager_grows_tables_by_whole_blocks():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    assert manager.allocate_slots("a", 5)  # 2 blocks
    assert len(manager.block_table("a")) == 2
    assert manager.allocate_slots("a", 8)  # still 2 blocks
    assert len(manager.block_table("a")) == 2
    assert manager.allocate_slots("a", 9)
    assert len(manager.block_table("a")) == 3
    assert not manager.allocate_slots("b", 21), "6 blocks requested, 5 free"
    assert manager.block_table("b") == []
    manager.check_invariants()
    manager.free("a")
    assert manager.num_free_blocks == 8
    manager.check_invariants()
