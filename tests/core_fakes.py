"""Engine cores for the --engine-process tests: the fake runner's LLMEngine, built in the core
process (engine/core_process.py) by `build_fake_core`, served by a live HTTP server here.

Spawned processes import this module by name (multiprocessing passes the test's sys.path)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from fake_engine import FakeTokenizer
from reliability_helpers import EOS_TOKEN_ID, VOCAB_SIZE, SlowRunner
from server_fixtures import live_server

from fitserve.config import ConfigError, ServerConfig
from fitserve.core.scheduler import SchedulerLimits
from fitserve.engine.core_client import CoreClient, start_core_client
from fitserve.engine.core_messages import CoreReady
from fitserve.engine.errors import InvalidRequestError
from fitserve.engine.llm_engine import EngineLimits, LLMEngine
from fitserve.server.app import build_app
from fitserve.testing import FakeDecoder

MODEL = "fake-core"


class PickyCompiler:
    """A grammar compiler that refuses every schema: as the client's fault, or (a schema with
    "crash" in it) by raising as a bug would."""

    def compile(self, params: Any) -> object:
        if "crash" in params.json_schema:
            raise RuntimeError("compiler bug: secret detail")
        raise InvalidRequestError("This schema is not supported here.", param=params.param)


def build_fake_core(config: Any, progress: bool, *, step_delay_s: float = 0.0, max_num_seqs: int = 8,
                    num_blocks: int = 128, fail_with: str | None = None,
                    wait_for_path: str | None = None) -> tuple[LLMEngine, CoreReady]:
    """In the core process: LLMEngine over the fake runner (`step_delay_s` per step); `fail_with`
    'config' or 'crash' makes the start-up fail as a wrong setting or a bug would; `wait_for_path`:
    the build waits (up to 10 s, then fails) until that file exists."""
    if wait_for_path is not None:
        deadline = time.monotonic() + 10
        while not os.path.exists(wait_for_path):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{wait_for_path} never appeared")
            time.sleep(0.01)
    if fail_with == "config":
        raise ConfigError("--max-model-len 99999 is longer than the model's context")
    if fail_with == "crash":
        raise RuntimeError("the loader fell over")
    runner = SlowRunner(step_delay_s, num_blocks=num_blocks, block_size=4, vocab_size=VOCAB_SIZE)
    limits = EngineLimits(VOCAB_SIZE, (EOS_TOKEN_ID,), SchedulerLimits(max_num_seqs, 64, 256))
    engine = LLMEngine(runner, FakeDecoder(), limits, grammar_compiler=PickyCompiler())
    return engine, CoreReady(
        model_name=MODEL, max_model_len=engine.max_model_len, max_logprobs=limits.max_logprobs,
        max_num_seqs=max_num_seqs, request_limits=engine.request_limits, default_sampling_params={},
        startup_info={"settings": {"built_in": "the core process"}, "memory": None}, gpu_ids=[], stats=engine.stats())


def start_fake_core(max_queue_len: int | None = None, **build_kwargs: Any) -> CoreClient:
    return start_core_client(partial(build_fake_core, **build_kwargs), None, FakeTokenizer,
                             max_queue_len=max_queue_len)


@contextmanager
def fake_core_server(config: ServerConfig | None = None, **build_kwargs: Any) -> Iterator[tuple[str, CoreClient]]:
    """A live server over a fake core in its own process; yields (url, client)."""
    config = config or ServerConfig()
    client = start_fake_core(config.max_queue_len, **build_kwargs)
    try:
        with live_server(build_app(client, config=config)) as url:
            yield url, client
    finally:
        client.shutdown()


def core_is_idle_and_free(client: CoreClient) -> bool:
    """No request left in the core and every KV block back in its free pool (from the core's stats)."""
    stats = client.stats()
    return (stats.num_requests_running == 0 and stats.num_requests_waiting == 0
            and stats.num_free_kv_blocks == stats.num_kv_blocks)


def wait_for(predicate: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def fake_tokenizer(config: Any) -> FakeTokenizer:
    return FakeTokenizer()


def run_fake_api_servers(count: int, sock: Any, config: ServerConfig, build_kwargs: dict[str, Any]) -> None:
    """The supervisor of `count` API processes over one fake core (a test's spawned process): as
    `fitserve serve --api-server-count` runs, on the listening socket `sock`."""
    import logging
    import sys

    from fitserve.server.api_servers import ApiServerOptions, serve_api_servers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s [supervisor]: %(message)s")
    options = ApiServerOptions("127.0.0.1", sock.getsockname()[1], log_level="warning", telemetry_interval_s=0)
    sys.exit(serve_api_servers(count, partial(build_fake_core, **build_kwargs), None, config, options,
                               tokenizer_for=fake_tokenizer, sock=sock))
