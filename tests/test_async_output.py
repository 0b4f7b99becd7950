"""Async output processing: a step's tokens are detokenized while the next step runs.

The outputs must be exactly those of the synchronous engine; only when they are handed out
changes (one step later).
"""

import random

import pytest

from fitserve.core.scheduler import SchedulerLimits
from fitserve.engine.llm_engine import EngineLimits, LLMEngine
from fitserve.sampling_params import SamplingParams
from fitserve.testing import FakeDecoder, FakeRunner

VOCAB = 100


def make_engine(async_output, runner=None, decoder=None, num_blocks=24, max_num_seqs=6, async_scheduling=False):
    runner = runner or FakeRunner(num_blocks=num_blocks, block_size=4, vocab_size=VOCAB)
    limits = EngineLimits(vocab_size=VOCAB, eos_token_ids=(VOCAB - 1,),
                          scheduler=SchedulerLimits(max_num_seqs, 16, 128))
    return LLMEngine(runner, decoder or FakeDecoder(), limits, async_output=async_output,
                     async_scheduling=async_scheduling)


def run(engine, max_steps=5_000):
    results = {}
    for _ in range(max_steps):
        if not engine.has_unfinished:
            break
        for out in engine.step():
            tokens, text, finish = results.get(out.request_id, ((), "", None))
            assert finish is None, f"{out.request_id} got an output after its last one"
            results[out.request_id] = (tokens + out.new_token_ids, text + out.new_text,
                                       (out.finish_reason, out.stop_reason) if out.finished else None)
        engine.check_invariants()
    assert not engine.has_unfinished
    return results


def add_workload(engine, seed):
    rng = random.Random(seed)
    for i in range(30):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 25))]
        stop = (f" {rng.randrange(VOCAB)}",) if rng.random() < 0.5 else ()
        params = SamplingParams(max_tokens=rng.randint(1, 40), stop=stop, ignore_eos=rng.random() < 0.3,
                                include_stop_str_in_output=rng.random() < 0.5)
        engine.add_request(engine.make_request(f"r{i}", prompt, params))


def test_outputs_equal_the_synchronous_engine_with_stops_eos_and_preemption():
    sync, overlapped = make_engine(False), make_engine(True)
    add_workload(sync, 3)
    add_workload(overlapped, 3)
    expected, got = run(sync), run(overlapped)
    assert got == expected
    assert overlapped.scheduler.num_preemptions_total > 0, "the workload must preempt"
    assert {reason for _, _, (reason, _) in got.values()} == {"stop", "length"}
    assert any(isinstance(stop, str) for _, _, (_, stop) in got.values()), "some request must end on a stop string"
    assert overlapped.kv_cache.num_free_blocks == 24


class _DeferredRunner(FakeRunner):
    """execute_async returns at once; the step 'runs' in result(), as on a GPU stream."""

    def __init__(self, events):
        super().__init__(num_blocks=64, block_size=4, vocab_size=VOCAB)
        self.events = events

    def execute_async(self, scheduler_output, previous=None):
        self.events.append("launch")
        runner = self

        class Pending:
            def result(self):
                runner.events.append("result")
                return FakeRunner.execute(runner, scheduler_output)

        return Pending()


class _LoggingDecoder(FakeDecoder):
    def __init__(self, events):
        self.events = events

    def decode(self, token_ids, skip_special_tokens=True):
        self.events.append("decode")
        return super().decode(token_ids, skip_special_tokens)


def test_detokenization_runs_between_launch_and_result():
    events = []
    engine = make_engine(True, runner=_DeferredRunner(events), decoder=_LoggingDecoder(events))
    engine.add_request(engine.make_request("r", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True)))
    run(engine)
    steps = "".join({"launch": "L", "result": "R", "decode": "d"}[e] for e in events).split("L")[1:]
    assert steps[0] == "R", "the first step has nothing to detokenize yet"
    assert all(s.startswith("d") and s.endswith("R") for s in steps[1:]), steps
    assert len(steps) == 5, "four sampling steps, then one that tells the runner to forget the request"


def test_abort_while_the_final_output_is_pending():
    engine = make_engine(True)
    engine.add_request(engine.make_request("r", [1, 2, 3], SamplingParams(max_tokens=1, ignore_eos=True)))
    assert engine.step() == []  # sampled and finished, output held for the next step
    assert engine.has_unfinished
    engine.abort_request("r")
    engine.check_invariants()
    assert engine.step() == []
    assert not engine.has_unfinished
    assert engine.metrics.num_tracked_requests == 0
    engine.check_invariants()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_random_arrivals_and_aborts_leak_nothing(async_scheduling):
    rng = random.Random(7 + async_scheduling)
    engine = make_engine(True, num_blocks=30, max_num_seqs=5, async_scheduling=async_scheduling)
    live = set()
    for step in range(400):
        if rng.random() < 0.3:
            rid = f"r{step}"
            engine.add_request(engine.make_request(rid, [rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))],
                                                   SamplingParams(max_tokens=rng.randint(1, 30), stop=(" 5",))))
            live.add(rid)
        if live and rng.random() < 0.08:
            engine.abort_request(rng.choice(sorted(live)))
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
        engine.check_invariants()
    run(engine)
    assert engine.kv_cache.num_free_blocks == 30
    assert engine.metrics.num_tracked_requests == 0


def test_deliver_gets_the_outputs_before_the_step_waits_for_the_device():
    events = []
    engine = make_engine(True, runner=_DeferredRunner(events))
    engine.add_request(engine.make_request("r", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True)))
    delivered = []

    def deliver(outputs):
        events.append("deliver")
        delivered.extend(outputs)

    while engine.has_unfinished:
        assert engine.step(deliver=deliver) == []
    steps = "".join({"launch": "L", "result": "R", "deliver": "o"}[e] for e in events).split("L")[1:]
    assert steps == ["R", "oR", "oR", "oR"]
    assert [o.new_token_ids[0] for o in delivered] == [4, 5, 6] and delivered[-1].finished
