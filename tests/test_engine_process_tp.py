"""--engine-process with --tensor-parallel-size 2 on the CPU (gloo): the core process starts its
tensor-parallel worker itself, generates the same greedy tokens as the engine in one process,
and takes its worker with it when it stops."""

from __future__ import annotations

import asyncio

import pytest
from proc_helpers import child_pids, is_running
from test_tensor_parallel_processes import wait_until_gone
from tp_helpers import GREEDY_16, PROMPTS, greedy_tokens, tiny_llm, write_tiny_llama

from fitserve.config import CacheConfig, EngineConfig, SchedulerConfig
from fitserve.engine.core_client import CoreClient
from fitserve.startup import start_serving_engine
from fitserve.telemetry import Telemetry


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


async def _generate_all(client: CoreClient, prompts: list[list[int]]) -> list[tuple[int, ...]]:

    async def one(index: int, prompt: list[int]) -> tuple[int, ...]:
        tokens: list[int] = []
        async for output in client.generate(f"tp-{index}", prompt, GREEDY_16):
            tokens.extend(output.new_token_ids)
        return tuple(tokens)

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def test_the_core_process_runs_tensor_parallel_and_stops_its_worker(tiny_folder):
    llm = tiny_llm(tiny_folder, 2)
    try:
        expected = greedy_tokens(llm)
    finally:
        llm.shutdown()
    config = EngineConfig(model=str(tiny_folder), dtype="float32", device="cpu", tensor_parallel_size=2,
                          engine_process=True, cache=CacheConfig(kv_cache_memory_bytes=8 << 20),
                          scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4))
    client = start_serving_engine(config, Telemetry(interval_s=0, stats_interval_s=None), max_queue_len=None)
    assert isinstance(client, CoreClient)
    core_pid = client.pid
    try:
        workers = child_pids(core_pid)  # rank 1 (and multiprocessing's resource tracker)
        assert workers
        assert asyncio.run(_generate_all(client, PROMPTS)) == expected
    finally:
        client.shutdown()
    assert not is_running(core_pid)
    assert wait_until_gone(list(workers)) == []
