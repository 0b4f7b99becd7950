"""The seams: every runner implements ModelRunner and every engine client EngineClient in full,
the engine passes shutdown on to its runner, and `stats()` is an EngineStats read by attribute."""

from __future__ import annotations

from dataclasses import FrozenInstanceError

import pytest
from fake_engine import FakeEngine, FakeTokenizer
from fastapi.testclient import TestClient
from kv_fake_runner import KVCheckingRunner
from tiny_model import tiny_engine_config, write_tiny_model

from fitserve.core.engine_stats import EngineStats
from fitserve.core.interfaces import ModelRunner
from fitserve.core.scheduler import SchedulerLimits
from fitserve.engine.async_engine import AsyncEngine
from fitserve.engine.client import EngineClient
from fitserve.engine.llm_engine import EngineLimits, LLMEngine
from fitserve.sampling_params import SamplingParams
from fitserve.server.app import build_app
from fitserve.testing import FakeDecoder, FakeRunner

VOCAB_SIZE = 1000


def llm_engine(runner: FakeRunner) -> LLMEngine:
    limits = EngineLimits(VOCAB_SIZE, (VOCAB_SIZE - 1,), SchedulerLimits(8, 64, 256))
    return LLMEngine(runner, FakeDecoder(), limits)


@pytest.mark.parametrize("runner_type", [FakeRunner, KVCheckingRunner])
def test_the_fake_runners_implement_the_whole_protocol(runner_type):
    assert isinstance(runner_type(), ModelRunner)


def test_the_torch_runner_implements_the_whole_protocol(tmp_path):
    from fitserve.startup import build_engine  # torch: only this test needs it

    built = build_engine(tiny_engine_config(write_tiny_model(tmp_path / "tiny")), progress=False)
    try:
        assert isinstance(built.engine.runner, ModelRunner)
    finally:
        built.engine.shutdown()
        built.engine.shutdown()  # idempotent


def test_engine_clients_implement_the_whole_protocol():
    assert isinstance(FakeEngine(), EngineClient)
    engine = AsyncEngine(llm_engine(FakeRunner()), "fake", FakeTokenizer(), default_sampling_params={"top_k": 5})
    assert isinstance(engine, EngineClient)
    assert (engine.max_logprobs, engine.default_sampling_params, engine.startup_info) == (20, {"top_k": 5}, None)
    assert engine.num_requests_in_flight == 0


def test_shutdown_reaches_the_runner():
    runner = FakeRunner()
    llm_engine(runner).shutdown()
    assert runner.num_shutdowns == 1
    engine = AsyncEngine(llm_engine(runner), "fake", FakeTokenizer()).start()
    engine.shutdown()
    assert runner.num_shutdowns == 2 and not engine.is_healthy()


def test_stats_are_a_frozen_engine_stats():
    engine = llm_engine(FakeRunner(num_blocks=64, block_size=4))
    engine.add_request(engine.make_request("r0", [1, 2, 3, 4, 5], SamplingParams(max_tokens=3, ignore_eos=True)))
    engine.add_request(engine.make_request("r1", [7, 8], SamplingParams(max_tokens=3, ignore_eos=True)))
    engine.step()
    stats = engine.stats()
    assert isinstance(stats, EngineStats)
    assert (stats.num_requests_running, stats.num_requests_waiting, stats.num_steps_total) == (2, 0, 1)
    assert (stats.num_kv_blocks, stats.block_size_tokens, stats.kv_capacity_tokens) == (64, 4, 256)
    assert stats.num_free_kv_blocks == 64 - 3 and stats.num_free_kv_tokens == 4 * (64 - 3)  # 2 + 1 blocks
    assert stats.kv_cache_used_fraction == pytest.approx(3 / 64)
    assert (stats.max_num_seqs, stats.max_model_len_tokens) == (8, 256)
    assert (stats.num_prompt_tokens_total, stats.num_generation_tokens_total) == (7, 2)
    with pytest.raises(FrozenInstanceError):
        stats.num_requests_running = 0  # type: ignore[misc]


def test_the_page_shows_what_the_client_recorded_at_start_up():
    engine = FakeEngine()
    engine.startup_info = {"settings": {"dtype": "bfloat16"}, "memory": {"rows": []}}
    body = TestClient(build_app(engine)).get("/ui/api/info").json()
    assert body["settings"] == {"dtype": "bfloat16"} and body["memory"] == {"rows": []}

