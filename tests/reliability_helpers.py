"""Shared by the reliability, fuzz, soak and shutdown tests: a real AsyncEngine over the fake
runner, a runner that takes time per step, and checks that nothing leaked."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from fake_engine import FakeTokenizer
from server_fixtures import live_server

from fitserve.config import ServerConfig
from fitserve.core.scheduler import SchedulerLimits
from fitserve.engine.async_engine import AsyncEngine
from fitserve.engine.llm_engine import EngineLimits, LLMEngine
from fitserve.server.app import build_app
from fitserve.testing import FakeDecoder, FakeRunner

VOCAB_SIZE = 1000
EOS_TOKEN_ID = VOCAB_SIZE - 1
MODEL = "fake-real"
OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}


class SlowRunner(FakeRunner):
    """The fake runner, taking `step_delay_s` per step, so requests last long enough to leave."""

    def __init__(self, step_delay_s: float = 0.01, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.step_delay_s = step_delay_s

    def execute(self, scheduler_output):
        time.sleep(self.step_delay_s)
        return super().execute(scheduler_output)


def make_engine(*, num_blocks: int = 128, block_size: int = 4, max_num_seqs: int = 8,
                max_num_batched_tokens: int = 64, max_model_len: int = 256, max_queue_len: int | None = None,
                step_delay_s: float = 0.0, tokenizer: Any = None) -> AsyncEngine:
    runner = SlowRunner(step_delay_s, num_blocks=num_blocks, block_size=block_size, vocab_size=VOCAB_SIZE)
    limits = EngineLimits(VOCAB_SIZE, (EOS_TOKEN_ID,),
                          SchedulerLimits(max_num_seqs, max_num_batched_tokens, max_model_len))
    engine = LLMEngine(runner, FakeDecoder(), limits)
    tokenizer = FakeTokenizer() if tokenizer is None else tokenizer
    return AsyncEngine(engine, MODEL, tokenizer, max_queue_len=max_queue_len).start()


@contextmanager
def engine_server(config: ServerConfig | None = None, **engine_kwargs) -> Iterator[tuple[str, AsyncEngine]]:
    """A live server on 127.0.0.1 over a fresh fake-runner engine; yields (url, engine)."""
    config = config or ServerConfig()
    engine = make_engine(max_queue_len=config.max_queue_len, **engine_kwargs)
    try:
        with live_server(build_app(engine, config=config)) as url:
            yield url, engine
    finally:
        engine.shutdown()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def assert_all_blocks_free(engine: AsyncEngine, timeout_s: float = 3.0) -> None:
    """Every request gone from the engine, every KV block back in the free pool, invariants hold."""
    core = engine.engine
    assert wait_until(lambda: not core.has_unfinished, timeout_s), f"requests left: {list(core.scheduler.requests)}"
    core.check_invariants()
    assert core.kv_cache.num_free_blocks == core.kv_cache.pool.num_blocks


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == OPENAI_ERROR_KEYS and error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error


def expected_text(last_prompt_id: int, num_tokens: int) -> str:
    """What the fake runner and FakeDecoder produce after a prompt ending in `last_prompt_id`."""
    return "".join(f" {(last_prompt_id + k) % VOCAB_SIZE}" for k in range(1, num_tokens + 1))


def byte_tokenizer():
    """The real Tokenizer (transformers, with the byte-level fallback's chat template) over VOCAB_SIZE:
    the chat template path as served, without model files."""
    from fitserve.engine.tokenizer import Tokenizer, _fallback_tokenizer
    return Tokenizer(_fallback_tokenizer(VOCAB_SIZE, (EOS_TOKEN_ID,)), (EOS_TOKEN_ID,))
