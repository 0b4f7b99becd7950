"""The async engine with the fake runner: concurrency, aborts, failure handling."""

import asyncio

import pytest

from fitserve.core.scheduler import SchedulerLimits
from fitserve.engine.async_engine import AsyncEngine
from fitserve.engine.errors import EngineDeadError, InvalidRequestError
from fitserve.engine.llm_engine import EngineLimits, LLMEngine
from fitserve.sampling_params import SamplingParams
from fitserve.testing import FakeDecoder, FakeRunner

VOCAB = 1000


def make_async_engine(runner=None, max_model_len=128):
    runner = runner or FakeRunner(num_blocks=64, block_size=4, vocab_size=VOCAB)
    limits = EngineLimits(VOCAB, (VOCAB - 1,), SchedulerLimits(8, 32, max_model_len))
    return AsyncEngine(LLMEngine(runner, FakeDecoder(), limits), "fake", FakeDecoder()).start()


async def collect(engine, request_id, prompt, **params):
    outputs = []
    async for out in engine.generate(request_id, prompt, SamplingParams(**params)):
        outputs.append(out)
    return outputs


def test_concurrent_requests_all_finish_with_their_own_tokens():
    engine = make_async_engine()

    async def main():
        prompts = {f"r{i}": [10 * i + 1, 10 * i + 2] for i in range(20)}
        results = await asyncio.gather(*(collect(engine, rid, p, max_tokens=6) for rid, p in prompts.items()))
        return prompts, results

    try:
        prompts, results = asyncio.run(main())
        for (rid, prompt), outs in zip(prompts.items(), results):
            assert [o.new_token_ids[0] for o in outs] == [prompt[-1] + k for k in range(1, 7)]
            assert "".join(o.new_text for o in outs) == "".join(f" {prompt[-1] + k}" for k in range(1, 7))
            assert outs[-1].finished and outs[-1].num_output_tokens == 6
        engine.engine.check_invariants()
    finally:
        engine.shutdown()


def test_closing_the_stream_aborts_and_frees_blocks():
    engine = make_async_engine()

    async def main():
        stream = engine.generate("long", list(range(1, 40)), SamplingParams(max_tokens=80))
        first = await stream.__anext__()
        assert not first.finished
        await stream.aclose()  # what the server does when the client disconnects
        for _ in range(100):
            if not engine.engine.has_unfinished:
                break
            await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
        assert not engine.engine.has_unfinished
        assert engine.engine.kv_cache.num_free_blocks == 64
        engine.engine.check_invariants()
    finally:
        engine.shutdown()


def test_invalid_request_raises_before_any_output():
    engine = make_async_engine(max_model_len=16)

    async def main():
        with pytest.raises(InvalidRequestError) as info:
            await collect(engine, "too-long", list(range(1, 15)), max_tokens=10)
        assert "maximum context length is 16" in str(info.value)
        with pytest.raises(InvalidRequestError):
            await collect(engine, "bad-token", [VOCAB + 5], max_tokens=2)
        # The engine keeps serving others.
        outs = await collect(engine, "ok", [1], max_tokens=2)
        assert outs[-1].finished

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


class ExplodingRunner(FakeRunner):
    def execute(self, scheduler_output):
        if self.num_steps >= 2:
            raise RuntimeError("device fell over")
        return super().execute(scheduler_output)


def test_engine_failure_fails_requests_and_health():
    engine = make_async_engine(runner=ExplodingRunner(num_blocks=64, block_size=4, vocab_size=VOCAB))

    async def main():
        with pytest.raises(EngineDeadError):
            await collect(engine, "doomed", [1, 2, 3], max_tokens=50)
        with pytest.raises(EngineDeadError):
            await collect(engine, "after", [1], max_tokens=2)

    try:
        asyncio.run(main())
        assert not engine.is_healthy()
    finally:
        engine.shutdown()
