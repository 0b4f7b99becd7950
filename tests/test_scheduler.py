"""Scheduler and engine tests with the fake runner: invariants after every step."""

import random

from fitserve.core.interfaces import KVCapacity
from fitserve.core.scheduler import SchedulerLimits
from fitserve.engine.llm_engine import EngineLimits, LLMEngine
from fitserve.sampling_params import SamplingParams
from fitserve.testing import FakeDecoder, FakeRunner

VOCAB = 1000


def make_engine(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=256):
    runner = FakeRunner(num_blocks=num_blocks, block_size=block_size, vocab_size=VOCAB)
    limits = EngineLimits(
        vocab_size=VOCAB,
        eos_token_ids=(VOCAB - 1,),
        scheduler=SchedulerLimits(max_num_seqs, max_num_batched_tokens, max_model_len),
    )
    return LLMEngine(runner, FakeDecoder(), limits)


def run_to_completion(engine, max_steps=10_000):
    """Step until idle, checking invariants and the budget after every step."""
    outputs = {}
    for _ in range(max_steps):
        if not engine.has_unfinished:
            break
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        engine.check_invariants()
    assert not engine.has_unfinished
    return outputs


def expected_tokens(prompt, num):
    last, tokens = prompt[-1], []
    for _ in range(num):
        last = (last + 1) % VOCAB
        tokens.append(last)
    return tokens


def add(engine, request_id, prompt, **params):
    engine.add_request(engine.make_request(request_id, prompt, SamplingParams(**params)))


def test_single_request_generates_max_tokens():
    engine = make_engine()
    add(engine, "r", [1, 2, 3], max_tokens=5)
    outputs = run_to_completion(engine)["r"]
    assert [o.new_token_ids[0] for o in outputs] == [4, 5, 6, 7, 8]
    assert outputs[-1].finished and outputs[-1].finish_reason == "length"
    assert [o.finished for o in outputs[:-1]] == [False] * 4
    assert engine.kv_cache.num_free_blocks == 64


def test_step_respects_token_budget_and_max_num_seqs():
    engine = make_engine(max_num_seqs=3, max_num_batched_tokens=10)
    for i in range(6):
        add(engine, f"r{i}", list(range(10, 27)), max_tokens=4)  # 17-token prompts need chunking
    seen_chunked = False
    while engine.has_unfinished:
        plan = engine.scheduler.schedule()
        assert plan.num_batched_tokens <= 10
        assert len(plan.scheduled) <= 3
        seen_chunked |= any(not c.samples for c in plan.scheduled)
        engine.scheduler.update_from_output(plan, engine.runner.execute(plan))
        engine.scheduler.check_invariants()
    assert seen_chunked, "17-token prompts under a 10-token budget must be chunked"


def test_chunked_prefill_feeds_every_prompt_token_once():
    engine = make_engine(max_num_batched_tokens=7)
    prompt = list(range(100, 130))
    add(engine, "r", prompt, max_tokens=2)
    fed = []
    while engine.has_unfinished:
        plan = engine.scheduler.schedule()
        for chunk in plan.scheduled:
            assert chunk.num_computed_tokens == len(fed)
            fed.extend(chunk.token_ids)
        engine.scheduler.update_from_output(plan, engine.runner.execute(plan))
    assert fed[: len(prompt)] == prompt
    assert fed[len(prompt)] == prompt[-1] + 1  # the first sampled token is fed back next step


def test_eos_and_stop_token_ids_finish_with_stop():
    engine = make_engine()
    add(engine, "eos", [VOCAB - 3], max_tokens=10)  # samples VOCAB-2, then VOCAB-1 = EOS
    add(engine, "stop_id", [5], max_tokens=10, stop_token_ids=(8,))
    add(engine, "ignore", [VOCAB - 3], max_tokens=4, ignore_eos=True)
    outputs = run_to_completion(engine)
    assert outputs["eos"][-1].finish_reason == "stop" and len(outputs["eos"]) == 2
    assert outputs["stop_id"][-1].finish_reason == "stop" and outputs["stop_id"][-1].stop_reason == 8
    assert outputs["ignore"][-1].finish_reason == "length" and len(outputs["ignore"]) == 4


def test_preemption_keeps_outputs_identical():
    """A cache too small for all requests forces preemption; outputs must not change."""
    rng = random.Random(0)
    prompts = {f"r{i}": [rng.randrange(VOCAB - 50) for _ in range(rng.randint(3, 20))] for i in range(12)}
    engine = make_engine(num_blocks=20, block_size=4, max_num_seqs=8, max_num_batched_tokens=24)
    for rid, prompt in prompts.items():
        add(engine, rid, prompt, max_tokens=24, ignore_eos=True)
    outputs = run_to_completion(engine)
    assert engine.scheduler.num_preemptions_total > 0, "the test must actually preempt"
    for rid, prompt in prompts.items():
        tokens = [o.new_token_ids[0] for o in outputs[rid]]
        assert tokens == expected_tokens(prompt, 24), rid
    assert engine.kv_cache.num_free_blocks == 20


def test_abort_frees_blocks_and_runner_is_told():
    engine = make_engine()
    add(engine, "a", list(range(1, 30)), max_tokens=50)
    add(engine, "b", list(range(1, 10)), max_tokens=3)
    engine.step()
    engine.step()
    assert engine.kv_cache.block_table("a")
    engine.abort_request("a")
    engine.check_invariants()
    assert not engine.kv_cache.block_table("a")
    run_to_completion(engine)
    assert "a" not in engine.runner.live_request_ids
    assert engine.kv_cache.num_free_blocks == 64
    engine.abort_request("a")  # aborting twice, or a finished request, is harmless
    engine.abort_request("never-existed")
    engine.check_invariants()


def test_max_model_len_caps_generation():
    engine = make_engine(max_model_len=12)
    add(engine, "r", [1] * 8, max_tokens=None)
    outputs = run_to_completion(engine)["r"]
    assert len(outputs) == 4 and outputs[-1].finish_reason == "length"


def test_random_workload_keeps_invariants():
    rng = random.Random(1)
    engine = make_engine(num_blocks=30, block_size=4, max_num_seqs=5, max_num_batched_tokens=16)
    live = set()
    for step in range(400):
        if rng.random() < 0.3:
            rid = f"r{step}"
            add(engine, rid, [rng.randrange(VOCAB - 1) for _ in range(rng.randint(1, 30))],
                max_tokens=rng.randint(1, 30), ignore_eos=True)
            live.add(rid)
        if live and rng.random() < 0.05:
            engine.abort_request(rng.choice(sorted(live)))
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
        engine.check_invariants()
    run_to_completion(engine)
    assert engine.kv_cache.num_free_blocks == 30


def test_min_tokens_keeps_eos_and_stop_ids_from_ending_early():
    engine = make_engine()
    # The fake runner counts up from the prompt's last token: VOCAB - 1 (EOS) comes first.
    add(engine, "eos", [VOCAB - 2], max_tokens=10, min_tokens=3)
    add(engine, "stop-id", [4], max_tokens=10, min_tokens=2, stop_token_ids=(5,))
    add(engine, "plain", [VOCAB - 2], max_tokens=10)
    outputs = run_to_completion(engine)
    assert [o.new_token_ids[0] for o in outputs["plain"]] == [VOCAB - 1]
    eos = outputs["eos"]
    assert len(eos) == 10 and eos[-1].finish_reason == "length"  # EOS came only at token 1, then never again
    stop_id = outputs["stop-id"]
    assert len(stop_id) == 10 and stop_id[-1].finish_reason == "length"
