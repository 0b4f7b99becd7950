"""Prefix caching through the scheduler and the engine, on a fake runner whose fake KV cache
makes any wrongly reused block change the output (tests/kv_fake_runner.py)."""

from __future__ import annotations

import random

import pytest
from kv_fake_runner import KVCheckingRunner, expected_tokens

from fitserve.core.scheduler import SchedulerLimits
from fitserve.engine.llm_engine import EngineLimits, LLMEngine
from fitserve.sampling_params import SamplingParams
from fitserve.testing import FakeDecoder

VOCAB = 1000
BLOCK = 4


def make_engine(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=256, caching=True):
    runner = KVCheckingRunner(num_blocks=num_blocks, block_size=BLOCK, vocab_size=VOCAB)
    limits = EngineLimits(VOCAB, (VOCAB - 1,), SchedulerLimits(max_num_seqs, max_num_batched_tokens, max_model_len))
    return LLMEngine(runner, FakeDecoder(), limits, enable_prefix_caching=caching)


def add(engine, rid, prompt, max_tokens):
    engine.add_request(engine.make_request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True)))


def step(engine, outputs, starts=None):
    """One step, with invariants checked; records each request's first scheduled position."""
    plan_starts = {}
    original = engine.scheduler.schedule

    def schedule():
        plan = original()
        for chunk in plan.scheduled:
            plan_starts.setdefault(chunk.request_id, chunk.num_computed_tokens)
        return plan

    engine.scheduler.schedule = schedule
    try:
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out.new_token_ids[0])
    finally:
        engine.scheduler.schedule = original
    if starts is not None:
        for rid, start in plan_starts.items():
            starts.setdefault(rid, start)
    engine.check_invariants()


def run(engine, starts=None, outputs=None, max_steps=10_000):
    """Step until idle; `outputs` (request id -> tokens so far) is extended and returned."""
    outputs = {} if outputs is None else outputs
    for _ in range(max_steps):
        if not engine.has_unfinished:
            break
        step(engine, outputs, starts)
    assert not engine.has_unfinished
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.pool.num_blocks, "blocks leaked"
    return outputs


def test_second_request_starts_after_the_cached_prefix():
    engine = make_engine()
    system = list(range(100, 130))  # 30 tokens: 7 full blocks and 2 tokens
    add(engine, "first", [*system, 1, 2, 3], max_tokens=4)
    starts: dict[str, int] = {}
    outputs = run(engine, starts)
    add(engine, "second", [*system, 7, 8], max_tokens=4)
    run(engine, starts, outputs)
    assert starts == {"first": 0, "second": 28}, "7 full blocks of the shared 30 tokens are reused"
    assert outputs["second"] == expected_tokens([*system, 7, 8], 4, VOCAB)
    stats = engine.stats()
    assert stats.prefix_cache_queried_tokens_total == 33 + 32
    assert stats.prefix_cache_hit_tokens_total == 28
    assert stats.prefix_cache_hit_rate == pytest.approx(28 / 65)


def test_requests_admitted_in_one_step_share_the_prompt():
    """n copies of one prompt (as `n > 1` fans out): the first computes it, the others reuse it
    in the same step, its K/V being written before any attention reads the cache."""
    engine = make_engine(max_num_batched_tokens=64)
    prompt = list(range(200, 221))  # 21 tokens: 5 full blocks
    for i in range(3):
        add(engine, f"copy{i}", prompt, max_tokens=6)
    starts: dict[str, int] = {}
    outputs: dict[str, list[int]] = {}
    step(engine, outputs, starts)
    assert starts == {"copy0": 0, "copy1": 20, "copy2": 20}
    assert engine.runner.num_fed_tokens == 21 + 1 + 1
    run(engine, outputs=outputs)
    for i in range(3):
        assert outputs[f"copy{i}"] == expected_tokens(prompt, 6, VOCAB)


def test_chunked_prefill_registers_blocks_chunk_by_chunk():
    engine = make_engine(max_num_batched_tokens=8, max_num_seqs=2)
    prompt = list(range(300, 340))  # 40 tokens, 5 chunks of 8
    add(engine, "a", prompt, max_tokens=2)
    outputs: dict[str, list[int]] = {}
    step(engine, outputs)
    step(engine, outputs)
    assert engine.kv_cache.pool.num_cached_blocks == 4, "16 tokens scheduled: 4 full blocks"
    starts: dict[str, int] = {}
    add(engine, "b", prompt[:20] + [1, 2, 3], max_tokens=2)
    run(engine, starts, outputs)
    assert starts["b"] == 20, "b reuses the 5 full blocks it shares with a"
    assert outputs["b"] == expected_tokens(prompt[:20] + [1, 2, 3], 2, VOCAB)
    assert outputs["a"] == expected_tokens(prompt, 2, VOCAB)


def test_preempted_request_resumes_from_its_cached_blocks():
    # 12 blocks of 4 tokens; two requests of 20 prompt + 20 output tokens (10 blocks each) cannot both finish.
    engine = make_engine(num_blocks=12, max_num_batched_tokens=64)
    prompts = {"old": list(range(10, 30)), "new": list(range(40, 60))}
    for rid, prompt in prompts.items():
        add(engine, rid, prompt, max_tokens=20)
    outputs = run(engine)
    assert engine.scheduler.num_preemptions_total > 0, "the test must preempt"
    for rid, prompt in prompts.items():
        assert outputs[rid] == expected_tokens(prompt, 20, VOCAB), rid
    resumed = engine.metrics.snapshot().prefix_cache
    assert resumed.preempted_queries > 0 and resumed.preempted_hits > 0, "the preempted request found its blocks"
    assert resumed.queries == 40, "preempted requests' lookups are not counted as new queries (vLLM's counters)"


def test_preempted_request_recomputes_less_with_caching():
    def fed_tokens(caching: bool) -> int:
        engine = make_engine(num_blocks=12, max_num_batched_tokens=64, caching=caching)
        add(engine, "old", range(10, 30), max_tokens=20)
        add(engine, "new", range(40, 60), max_tokens=20)
        run(engine)
        assert engine.scheduler.num_preemptions_total > 0
        return engine.runner.num_fed_tokens

    assert fed_tokens(caching=True) < fed_tokens(caching=False)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_workload_with_shared_prefixes_equals_caching_off(seed):
    """Prefixes shared in whole blocks and not, aborts, chunking and preemption (a small cache):
    every output equals the uncached run's, invariants hold after each step, no block leaks."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(VOCAB - 1) for _ in range(rng.randint(3, 24))] for _ in range(4)]
    plan = []
    for step_index in range(300):
        if rng.random() < 0.25:
            prompt = rng.choice(prefixes) + [rng.randrange(VOCAB - 1) for _ in range(rng.randint(0, 9))]
            plan.append((step_index, f"r{step_index}", prompt, rng.randint(1, 16), rng.random() < 0.05))

    def play(caching: bool):
        engine = make_engine(num_blocks=24, max_num_seqs=5, max_num_batched_tokens=16, caching=caching)
        outputs: dict[str, list[int]] = {}
        aborted = set()
        for step_index in range(300):
            for when, rid, prompt, max_tokens, abort in plan:
                if when == step_index:
                    add(engine, rid, prompt, max_tokens)
                if abort and when == step_index - 3:
                    engine.abort_request(rid)
                    aborted.add(rid)
            step(engine, outputs)
        run(engine, outputs=outputs)
        return outputs, aborted, engine

    cached, aborted, engine = play(caching=True)
    uncached, _, uncached_engine = play(caching=False)
    assert engine.scheduler.num_preemptions_total > 0, "the cache is small enough to preempt"
    assert engine.metrics.snapshot().prefix_cache.hits > 0
    assert engine.runner.num_fed_tokens < uncached_engine.runner.num_fed_tokens
    for _, rid, prompt, max_tokens, _ in plan:
        if rid not in aborted:
            assert cached[rid] == expected_tokens(prompt, max_tokens, VOCAB), rid
            assert cached[rid] == uncached[rid], rid
    assert not engine.kv_cache._keys, "no block hashes kept for finished requests"


def test_colliding_hashes_never_serve_a_block_computed_after_another_prefix():
    """With a hash of the tokens alone, block Y after X and block Y first collide; the
    pool's check of the stored tokens and parent hash keeps each request on its own K/V."""
    engine = make_engine(max_num_seqs=2)
    engine.kv_cache.hash_fn = lambda parent, data: hash(data)
    x, y = [1, 2, 3, 4], [5, 6, 7, 8]
    prompts = {"xy": x + y + [9], "yx": y + x + [9], "yy": y + y + [9], "xx": x + x + [9], "xy2": x + y + [10]}
    outputs: dict[str, list[int]] = {}
    for rid, prompt in prompts.items():
        add(engine, rid, prompt, max_tokens=3)
        run(engine, outputs=outputs)
    for rid, prompt in prompts.items():
        assert outputs[rid] == expected_tokens(prompt, 3, VOCAB), rid
    assert engine.metrics.snapshot().prefix_cache.hits == 4 + 8, "xx finds x (from xy), xy2 finds x and y"


def test_a_request_with_prompt_logprobs_computes_its_whole_prompt_but_shares_its_blocks():
    engine = make_engine()
    prompt = list(range(500, 521))
    engine.add_request(engine.make_request("scored", prompt, SamplingParams(max_tokens=2, prompt_logprobs=0)))
    starts: dict[str, int] = {}
    run(engine, starts)
    engine.add_request(engine.make_request("scored2", prompt, SamplingParams(max_tokens=2, prompt_logprobs=0)))
    add(engine, "plain", prompt, max_tokens=2)
    run(engine, starts)
    assert starts == {"scored": 0, "scored2": 0, "plain": 20}
    stats = engine.metrics.snapshot().prefix_cache
    assert (stats.queries, stats.hits) == (21, 20), "lookups skipped are not counted (vLLM's counters)"


def test_caching_off_counts_no_queries():
    engine = make_engine(caching=False)
    add(engine, "a", range(20), max_tokens=2)
    add(engine, "b", range(20), max_tokens=2)
    run(engine)
    stats = engine.stats()
    assert stats.prefix_cache_queried_tokens_total == 0 and stats.prefix_cache_hit_rate is None
    assert stats.enable_prefix_caching is False


def test_the_flag_is_on_by_default_and_turns_off_like_vllms():
    from fitserve.cli import build_parser, engine_config_from_args
    from fitserve.config import EngineConfig

    def parse(*flags):
        return engine_config_from_args(build_parser().parse_args(["serve", *flags])).cache.enable_prefix_caching

    assert parse() is True and EngineConfig().cache.enable_prefix_caching is True
    assert parse("--no-enable-prefix-caching") is False
    assert parse("--enable-prefix-caching") is True
