"""KV cache groups (models mixing sliding-window and full layers: Gemma 2/3) in the cache manager and
the scheduler, with the fake runner: one table per group from one pool; a windowed group frees what its
window left (at most ceil(window / block_size) + 1 blocks while decoding), the full group keeps all;
allocation takes every group's blocks or none; preemption, abort and finish free every group."""

from __future__ import annotations

import pytest

from fitserve.core.interfaces import KVCapacity
from fitserve.core.kv_cache_manager import FREED_BLOCK, KVCacheManager
from fitserve.core.scheduler import SchedulerLimits
from fitserve.engine.llm_engine import EngineLimits, LLMEngine
from fitserve.kv_groups import KVGroup, kv_layout, max_request_tokens, peak_request_blocks, request_blocks
from fitserve.request import Request
from fitserve.sampling_params import SamplingParams
from fitserve.testing import FakeDecoder, FakeRunner

VOCAB = 1000
BLOCK_SIZE = 4
WINDOW = 10
GROUPS = (None, WINDOW)  # Gemma 2's two groups


def make_engine(windows=GROUPS, num_blocks: int = 96, max_num_seqs: int = 8, max_num_batched_tokens: int = 16,
                async_scheduling: bool = False) -> LLMEngine:
    runner = FakeRunner(num_blocks=num_blocks, block_size=BLOCK_SIZE, vocab_size=VOCAB)
    runner.capacity = KVCapacity(num_blocks, BLOCK_SIZE, group_windows=windows)
    limits = EngineLimits(vocab_size=VOCAB, eos_token_ids=(VOCAB - 1,),
                          scheduler=SchedulerLimits(max_num_seqs, max_num_batched_tokens, max_model_len=512))
    return LLMEngine(runner, FakeDecoder(), limits, async_scheduling=async_scheduling)


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


def test_layouts_group_layers_by_window_in_groups_of_equal_size():
    assert kv_layout([None] * 4).groups == (KVGroup(None, (0, 1, 2, 3)),)
    assert kv_layout([8] * 3).groups == (KVGroup(8, (0, 1, 2)),) and not kv_layout([8] * 3).is_hybrid
    gemma2 = kv_layout([8, None, 8, None])
    assert gemma2.groups == (KVGroup(None, (1, 3)), KVGroup(8, (0, 2))) and gemma2.num_layers_per_block == 2
    gemma3_1b = kv_layout([None if (i + 1) % 6 == 0 else 512 for i in range(26)])  # global: 5, 11, 17, 23
    assert gemma3_1b.windows == (None,) + (512,) * 6 and gemma3_1b.num_layers_per_block == 4
    assert gemma3_1b.groups[0].layer_indices == (5, 11, 17, 23) and gemma3_1b.groups[-1].layer_indices == (24, 25)
    assert [gemma3_1b.layer_slot(i) for i in (0, 5, 6, 11, 24, 25)] == [0, 0, 1, 1, 0, 1]
    assert gemma3_1b.layer_group(0) == 1 and gemma3_1b.layer_group(23) == 0 and gemma3_1b.layer_group(25) == 6
    assert kv_layout([None, 64, 32, 64]).windows == (None, 64, 64, 32)


def test_request_blocks_count_windowed_groups_by_their_window():
    assert request_blocks((None, 8), 100, 4) == 25 + 3
    assert request_blocks((None, 8), 6, 4) == 2 + 2
    assert peak_request_blocks((None, 8), 100, 4, chunk_tokens=16) == 25 + 7
    assert max_request_tokens((None,), 10, 4, 16) == 40  # the whole pool
    assert max_request_tokens((8,), 10, 4, 16) is None  # a window alone fits: any length
    assert max_request_tokens((None, 8), 40, 4, 16) == (40 - 7) * 4


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_long_decode_bounds_the_windowed_group_while_the_full_group_grows(async_scheduling):
    engine = make_engine(async_scheduling=async_scheduling)
    prompt = list(range(1, 30))
    add(engine, "r", prompt, max_tokens=100)
    held: list[tuple[int, int]] = []

    def on_step(engine):
        full, windowed = (engine.kv_cache.num_held_blocks("r", g) for g in (0, 1))
        held.append((full, windowed))
        assert engine.kv_cache.pool.num_used_blocks == full + windowed

    assert run(engine, on_step)["r"] == expected_tokens(prompt, 100)
    bound = -(-WINDOW // BLOCK_SIZE) + 1
    assert max(w for _, w in held[-80:]) <= bound, "the windowed group frees what its window left"
    assert max(f for f, _ in held) == -(-(29 + 99) // BLOCK_SIZE), "the full group keeps every block"
    assert engine.kv_cache.num_free_blocks == 96


def test_the_tables_of_a_request_have_one_length_and_freed_entries_in_the_windowed_group_only():
    manager = KVCacheManager(num_blocks=64, block_size=BLOCK_SIZE, enable_caching=False, group_windows=(None, 6, 6))
    request = Request("r", list(range(40)), SamplingParams(max_tokens=2))
    assert manager.allocate_slots(request, 40)
    assert manager.num_free_blocks == 64 - 3 * 10
    request.num_computed_tokens = 40
    request.output_token_ids.append(7)
    assert manager.allocate_slots(request, 41)
    full, first, second = manager.block_tables("r")
    num_freed = (40 - 6) // BLOCK_SIZE
    assert len(full) == len(first) == len(second) == 11 and manager.num_held_blocks("r", 0) == 11
    assert first[:num_freed] == second[:num_freed] == [FREED_BLOCK] * num_freed
    assert len({*full, *first[num_freed:], *second[num_freed:]}) == 11 + 2 * (11 - num_freed), "no block shared"
    assert manager.num_held_blocks("r") == 11 + 2 * (11 - num_freed)
    manager.check_invariants()
    manager.free("r")
    manager.check_invariants()
    assert manager.num_free_blocks == 64


def test_an_allocation_takes_every_groups_blocks_or_none():
    manager = KVCacheManager(num_blocks=5, block_size=BLOCK_SIZE, enable_caching=False, group_windows=(None, 6))
    request = Request("r", list(range(12)), SamplingParams(max_tokens=1))
    assert not manager.allocate_slots(request, 12), "3 blocks per group do not fit 5"
    assert manager.num_free_blocks == 5 and manager.block_tables("r") == [[], []]
    assert manager.allocate_slots(request, 8)
    assert manager.num_free_blocks == 1
    manager.check_invariants()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_mixed_batch_with_preemption_gives_its_tokens_and_returns_every_block(async_scheduling):
    """A pool too small for all at once (prefills beside decodes, preemptions), then the pool is full again."""
    engine = make_engine(num_blocks=40, max_num_seqs=4, async_scheduling=async_scheduling)
    prompts = {f"r{i}": [i + 1] * (5 + 7 * i) for i in range(6)}
    for rid, prompt in prompts.items():
        add(engine, rid, prompt, max_tokens=30)
    got = run(engine)
    assert got == {rid: expected_tokens(p, 30) for rid, p in prompts.items()}
    assert engine.scheduler.num_preemptions_total > 0, "the pool is small enough to preempt"
    assert engine.kv_cache.num_free_blocks == 40 and engine.kv_cache.pool.num_used_blocks == 0


def test_an_abort_frees_every_groups_blocks():
    engine = make_engine(windows=(None, WINDOW, WINDOW))
    add(engine, "a", list(range(1, 40)), max_tokens=50)
    add(engine, "b", list(range(1, 9)), max_tokens=50)
    for _ in range(12):
        engine.step()
        engine.check_invariants()
    assert engine.kv_cache.num_held_blocks("a", 1) > 0 and engine.kv_cache.num_held_blocks("a", 2) > 0
    engine.abort_request("a")
    engine.abort_request("b")
    engine.check_invariants()
    assert engine.kv_cache.num_free_blocks == 96


def test_prefix_caching_is_off_for_a_hybrid_model_and_on_for_one_group(caplog):
    with caplog.at_level("INFO"):
        assert not make_engine().kv_cache.enable_caching
    assert "Prefix caching is off" in caplog.text
    assert make_engine(windows=(WINDOW,)).kv_cache.enable_caching


def test_a_request_is_checked_against_what_every_group_needs():
    """The full group bounds a request's length; the windowed group takes its window besides."""
    engine = make_engine(num_blocks=20)
    assert engine.request_limits.num_kv_tokens == (20 - (-(-(WINDOW + 16) // BLOCK_SIZE) + 1)) * BLOCK_SIZE
