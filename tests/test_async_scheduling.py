"""Async scheduling: step n+1 is planned and launched before step n's tokens are read.

Outputs must be exactly the synchronous engine's. Decodes planned ahead feed a placeholder the
runner fills from the step in flight; requests that end on EOS or a stop string run one wasted
row whose token is dropped; nothing may leak.
"""

import random

import pytest
from kv_fake_runner import KVCheckingRunner, expected_tokens

from fitserve.core.outputs import PLACEHOLDER_TOKEN_ID
from fitserve.core.scheduler import SchedulerLimits
from fitserve.engine.llm_engine import EngineLimits, LLMEngine
from fitserve.sampling_params import SamplingParams
from fitserve.testing import FakeDecoder, FakeRunner

VOCAB = 100
EOS = VOCAB - 1


class RecordingRunner(FakeRunner):
    """Counts the placeholder rows it is handed, and the order of launches and results."""

    def __init__(self, num_blocks: int, events: list[str] | None = None) -> None:
        super().__init__(num_blocks=num_blocks, block_size=4, vocab_size=VOCAB)
        self.num_placeholders = 0
        self.events = events if events is not None else []

    def execute_async(self, scheduler_output, previous=None):
        self.num_placeholders += sum(chunk.feeds_placeholder for chunk in scheduler_output.scheduled)
        self.events.append("launch")
        return _Pending(super().execute_async(scheduler_output, previous and previous.ready), self.events)


class _Pending:
    """The engine's handle on a step: records when the engine reads it."""

    def __init__(self, ready, events):
        self.ready, self.events = ready, events

    def result(self):
        self.events.append("result")
        return self.ready.result()


def make_engine(async_scheduling, num_blocks=24, max_num_seqs=6, max_model_len=128, runner=None):
    runner = runner or RecordingRunner(num_blocks)
    limits = EngineLimits(vocab_size=VOCAB, eos_token_ids=(EOS,),
                          scheduler=SchedulerLimits(max_num_seqs, 16, max_model_len))
    return LLMEngine(runner, FakeDecoder(), limits, async_scheduling=async_scheduling)


def run(engine, results=None, max_steps=5_000):
    results = {} if results is None else results
    for _ in range(max_steps):
        if not engine.has_unfinished:
            break
        collect(engine.step(), results)
        engine.check_invariants()
    assert not engine.has_unfinished
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.pool.num_blocks, "blocks leaked"
    assert engine.metrics.num_tracked_requests == 0
    return results


def collect(outputs, results):
    for out in outputs:
        tokens, text, finish = results.get(out.request_id, ((), "", None))
        assert finish is None, f"{out.request_id} got an output after its last one"
        results[out.request_id] = (tokens + out.new_token_ids, text + out.new_text,
                                   (out.finish_reason, out.stop_reason) if out.finished else None)


def add_workload(engine, seed, num_requests=30):
    rng = random.Random(seed)
    for i in range(num_requests):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 25))]
        stop = (f" {rng.randrange(VOCAB)}",) if rng.random() < 0.5 else ()
        params = SamplingParams(max_tokens=rng.randint(1, 40), stop=stop, ignore_eos=rng.random() < 0.3,
                                min_tokens=rng.choice([0, 0, 2]), include_stop_str_in_output=rng.random() < 0.5)
        engine.add_request(engine.make_request(f"r{i}", prompt, params))


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_outputs_equal_the_synchronous_engine_with_stops_eos_and_preemption(seed):
    sync, ahead = make_engine(False), make_engine(True)
    add_workload(sync, seed)
    add_workload(ahead, seed)
    expected, got = run(sync), run(ahead)
    assert got == expected
    assert ahead.scheduler.num_preemptions_total > 0, "the workload must preempt"
    assert {reason for _, _, (reason, _) in got.values()} == {"stop", "length"}
    assert ahead.runner.num_placeholders > 0 and sync.runner.num_placeholders == 0


def test_the_next_step_is_launched_before_the_last_one_is_read():
    events = []
    engine = make_engine(True, runner=RecordingRunner(64, events))
    engine.add_request(engine.make_request("r", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True)))
    outputs = [engine.step() for _ in range(5)]
    assert not engine.has_unfinished
    steps = "".join({"launch": "L", "result": "R"}[e] for e in events)
    # Four sampling steps, each launched before the one before it is read. The fourth token ends
    # the request (max_tokens), which is known when planning a fifth: the last call only reads.
    assert steps == "LLRLRLRR", steps
    assert [o.new_token_ids for step in outputs for o in step] == [(4,), (5,), (6,), (7,)]
    assert engine.runner.num_placeholders == 3


def test_a_request_ending_on_eos_wastes_one_row_and_its_token_is_dropped():
    engine = make_engine(True)
    # (last + 1) % VOCAB: from 97 the fake samples 98, then 99 = EOS, then (in the wasted row) 0.
    engine.add_request(engine.make_request("r", [97], SamplingParams(max_tokens=10)))
    results = run(engine)
    assert results["r"][0] == (98, 99) and results["r"][2] == ("stop", None)
    assert engine.runner.num_placeholders == 2, "the row after EOS was planned before EOS was read"


def test_requests_at_the_context_limit_are_not_planned_past_it():
    engine = make_engine(True, max_model_len=8)
    engine.add_request(engine.make_request("r", [1, 2, 3, 4, 5], SamplingParams(max_tokens=None, ignore_eos=True)))
    results = run(engine)
    assert results["r"][0] == (6, 7, 8) and results["r"][2] == ("length", None)


def test_abort_while_a_step_is_in_flight_leaks_nothing():
    engine = make_engine(True)
    engine.add_request(engine.make_request("a", [1, 2], SamplingParams(max_tokens=20, ignore_eos=True)))
    engine.add_request(engine.make_request("b", [5, 6], SamplingParams(max_tokens=5, ignore_eos=True)))
    results = {}
    for _ in range(3):
        collect(engine.step(), results)
    engine.abort_request("a")  # its next token is being sampled by the step in flight
    engine.check_invariants()
    run(engine, results)
    assert results["b"][0] == (7, 8, 9, 10, 11)
    assert results["a"][2] is None and len(results["a"][0]) < 20


@pytest.mark.parametrize("seed", [1, 2])
def test_prefix_caching_never_serves_a_block_holding_a_placeholder(seed):
    """On the fake KV cache any block reused with other contents changes the output: with shared
    prefixes, preemption and planning ahead every output is still the uncached one."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(VOCAB - 1) for _ in range(rng.randint(3, 24))] for _ in range(4)]
    prompts = [rng.choice(prefixes) + [rng.randrange(VOCAB - 1) for _ in range(rng.randint(0, 9))] for _ in range(40)]
    lengths = [rng.randint(1, 16) for _ in prompts]
    engine = make_engine(True, runner=KVCheckingRunner(num_blocks=24, block_size=4, vocab_size=VOCAB),
                         max_num_seqs=5, max_model_len=256)
    results = {}
    for i, (prompt, max_tokens) in enumerate(zip(prompts, lengths)):
        engine.add_request(engine.make_request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
        if i % 3 == 0:
            collect(engine.step(), results)
            engine.check_invariants()
    run(engine, results)
    assert engine.scheduler.num_preemptions_total > 0
    assert engine.metrics.snapshot().prefix_cache.hits > 0
    for i, (prompt, max_tokens) in enumerate(zip(prompts, lengths)):
        assert list(results[f"r{i}"][0]) == expected_tokens(prompt, max_tokens, VOCAB)


def test_the_runner_without_a_previous_step_never_sees_a_placeholder():
    runner = FakeRunner(num_blocks=8, block_size=4, vocab_size=VOCAB)
    engine = make_engine(False, runner=runner)
    engine.add_request(engine.make_request("r", [1], SamplingParams(max_tokens=3, ignore_eos=True)))
    plans = []
    original = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: plans.append(original()) or plans[-1]
    run(engine)
    assert all(PLACEHOLDER_TOKEN_ID not in chunk.token_ids for plan in plans for chunk in plan.scheduled)
