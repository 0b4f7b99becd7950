"""A uniform sliding window in the cache manager: the blocks a request's window has left are freed
as it decodes (so it holds at most ceil(window / block_size) + 1), through preemption and prefix
caching, with the fake runner; invariants after every step."""

from __future__ import annotations

import pytest

from fitserve.core.interfaces import KVCapacity
from fitserve.core.kv_cache_manager import FREED_BLOCK, KVCacheManager
from fitserve.core.scheduler import SchedulerLimits
from fitserve.engine.llm_engine import EngineLimits, LLMEngine
from fitserve.request import Request
from fitserve.sampling_params import SamplingParams
from fitserve.testing import FakeDecoder, FakeRunner

VOCAB = 1000
BLOCK_SIZE = 4


def make_engine(window: int | None, num_blocks: int = 64, max_num_seqs: int = 8, max_num_batched_tokens: int = 16,
                enable_prefix_caching: bool = True, async_scheduling: bool = False) -> LLMEngine:
    runner = FakeRunner(num_blocks=num_blocks, block_size=BLOCK_SIZE, vocab_size=VOCAB)
    runner.capacity = KVCapacity(num_blocks, BLOCK_SIZE, sliding_window_tokens=window)
    limits = EngineLimits(vocab_size=VOCAB, eos_token_ids=(VOCAB - 1,),
                          scheduler=SchedulerLimits(max_num_seqs, max_num_batched_tokens, max_model_len=512))
    return LLMEngine(runner, FakeDecoder(), limits, enable_prefix_caching=enable_prefix_caching,
                     async_scheduling=async_scheduling)


def add(engine: LLMEngine, request_id: str, prompt: list[int], max_tokens: int) -> None:
    engine.add_request(engine.make_request(request_id, prompt, SamplingParams(max_tokens=max_tokens)))


def expected_tokens(prompt: list[int], num: int) -> list[int]:
    return [(prompt[-1] + 1 + i) % VOCAB for i in range(num)]


def run(engine: LLMEngine, on_step=None) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished:
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        engine.check_invariants()
        if on_step is not None:
            on_step(engine)
    return tokens


@pytest.mark.parametrize("window", [1, 10, 16])
def test_a_long_decode_holds_a_bounded_number_of_blocks(window):
    engine = make_engine(window)
    prompt = list(range(1, 30))
    add(engine, "r", prompt, max_tokens=150)
    bound = -(-window // BLOCK_SIZE) + 1
    most = []

    def held(engine):
        most.append(engine.kv_cache.num_held_blocks("r"))
        assert engine.kv_cache.pool.num_used_blocks == most[-1]

    assert run(engine, held)["r"] == expected_tokens(prompt, 150)
    decode_held = most[-100:]
    assert max(decode_held) <= bound, f"held {max(decode_held)} blocks, bound {bound}"
    assert engine.kv_cache.num_free_blocks == 64


def test_without_a_window_every_block_is_kept():
    engine = make_engine(None)
    add(engine, "r", list(range(1, 30)), max_tokens=60)
    most = []
    run(engine, lambda e: most.append(e.kv_cache.num_held_blocks("r")))
    assert max(most) == -(-(29 + 59) // BLOCK_SIZE)


def test_the_freed_entries_name_the_freed_block_and_the_rest_cover_the_window():
    manager = KVCacheManager(num_blocks=32, block_size=BLOCK_SIZE, sliding_window_tokens=6)
    request = Request("r", list(range(40)), SamplingParams(max_tokens=1))
    assert manager.allocate_slots(request, 40)
    table = list(manager.block_table("r"))
    request.num_computed_tokens = 40
    request.output_token_ids.append(7)
    assert manager.allocate_slots(request, 41)
    after = manager.block_table("r")
    num_freed = (40 - 6) // BLOCK_SIZE  # blocks wholly before position 34: 0..7
    assert after[:num_freed] == [FREED_BLOCK] * num_freed and after[num_freed:10] == table[num_freed:]
    assert manager.num_held_blocks("r") == 11 - num_freed
    manager.check_invariants()
    manager.free("r")
    manager.check_invariants()
    assert manager.num_free_blocks == 32


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_many_requests_with_preemption_and_a_shared_prefix_give_their_tokens(async_scheduling):
    """A pool too small for all at once: preemptions; a shared prompt prefix: cache hits on blocks
    that other requests' windows freed (still holding their prefix's K/V)."""
    engine = make_engine(12, num_blocks=14, max_num_seqs=4, async_scheduling=async_scheduling)
    shared = list(range(100, 124))
    prompts = {f"r{i}": shared + [i + 1] * (i % 3 + 1) for i in range(6)}
    for rid, prompt in prompts.items():
        add(engine, rid, prompt, max_tokens=40)
    got = run(engine)
    assert got == {rid: expected_tokens(p, 40) for rid, p in prompts.items()}
    assert engine.scheduler.num_preemptions_total > 0, "the pool is small enough to preempt"
    assert engine.kv_cache.num_free_blocks == 14


def test_a_cached_prefix_freed_by_a_window_is_found_again():
    manager = KVCacheManager(num_blocks=32, block_size=BLOCK_SIZE, sliding_window_tokens=4)
    first = Request("a", list(range(20)), SamplingParams(max_tokens=4))
    assert manager.allocate_slots(first, 20)
    table = list(manager.block_table("a"))
    first.num_computed_tokens = 20
    first.output_token_ids.append(5)
    assert manager.allocate_slots(first, 21)  # blocks 0..3 (positions < 16) leave the window
    assert manager.block_table("a")[:4] == [FREED_BLOCK] * 4
    second = Request("b", list(range(20)) + [9], SamplingParams(max_tokens=1))
    hits = manager.find_cached_prefix(second)
    assert hits == table[:5], "freed blocks keep their K/V and stay found until evicted"
    assert manager.allocate_slots(second, 21, hits)
    manager.check_invariants()


def test_a_request_admitted_on_a_long_cached_prefix_takes_only_the_blocks_of_its_window():
    manager = KVCacheManager(num_blocks=32, block_size=BLOCK_SIZE, sliding_window_tokens=5)
    first = Request("a", list(range(40)), SamplingParams(max_tokens=1))
    assert manager.allocate_slots(first, 40)
    table = list(manager.block_table("a"))
    manager.free("a")
    second = Request("b", list(range(40)) + [3], SamplingParams(max_tokens=1))
    hits = manager.find_cached_prefix(second)
    assert hits == table
    assert manager.allocate_slots(second, 41, hits)
    num_behind = (40 - 5) // BLOCK_SIZE
    assert manager.block_table("b")[:num_behind] == [FREED_BLOCK] * num_behind
    assert manager.num_held_blocks("b") == 11 - num_behind
    manager.check_invariants()


def test_with_a_window_a_request_longer_than_the_cache_is_accepted():
    engine = make_engine(8, num_blocks=12)  # 48 tokens of cache
    prompt = list(range(1, 41))
    add(engine, "r", prompt, max_tokens=100)
    assert run(engine)["r"] == expected_tokens(prompt, 100)


def test_the_blocks_behind_the_window_serve_the_same_requests_next_block():
    """A full pool: the block the request needs next comes from what its window left, no preemption."""
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE, sliding_window_tokens=4)
    request = Request("r", list(range(16)), SamplingParams(max_tokens=4))
    assert manager.allocate_slots(request, 16) and manager.num_free_blocks == 0
    request.num_computed_tokens = 16
    request.output_token_ids.append(1)
    assert manager.allocate_slots(request, 17)
    assert manager.num_held_blocks("r") == 2 and manager.block_table("r")[:3] == [FREED_BLOCK] * 3
    manager.check_invariants()
