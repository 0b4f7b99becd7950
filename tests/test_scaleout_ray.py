"""Two replicas of the embedded model behind a local Ray Serve proxy, driven by the openai client.

One local Ray instance for the module (about 20 s to start and load both engines); the kill test
runs last because it kills a replica.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest
import ray
from ray import serve

from fitserve.bench.server_process import free_port
from fitserve.config import CacheConfig, EngineConfig, SchedulerConfig, ServerConfig
from fitserve.scaleout.launch import build_application
from fitserve.scaleout.options import APP_NAME, DEPLOYMENT_NAME, PREFIX_KEY_HEADER, REPLICA_HEADER, ReplicaOptions
from fitserve.scaleout.proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV, REPLICA_FAILED_CODE

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one Ray instance at a time

SRC = str(Path(__file__).resolve().parents[1] / "src")
MAX_NUM_SEQS = 8  # = max_ongoing_requests: what a replica accepts at once; the rest waits in Ray's queue
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def ray_app():
    port = free_port()
    previous = os.environ.get(PROXY_CALLBACK_ENV)
    os.environ[PROXY_CALLBACK_ENV] = PROXY_CALLBACK  # the proxy started below inherits it
    ray.init(num_cpus=2, include_dashboard=False, namespace="fitserve-test", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": SRC}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        engine = EngineConfig(cache=CacheConfig(kv_cache_memory_bytes=64 << 20),
                              scheduler=SchedulerConfig(max_model_len=256, max_num_seqs=MAX_NUM_SEQS))
        options = ReplicaOptions(num_replicas=2, max_ongoing_requests=MAX_NUM_SEQS, num_cpus=0.5,
                                 routing="prefix-affinity", affinity_max_extra_queue=2)
        app = build_application(engine, ServerConfig(api_keys=()), options, telemetry_interval_s=0, log_stats=False)
        serve.run(app, name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        if previous is None:
            os.environ.pop(PROXY_CALLBACK_ENV, None)
        else:
            os.environ[PROXY_CALLBACK_ENV] = previous


def _client(url: str) -> openai.AsyncOpenAI:
    # max_retries=0: a request that succeeds was served once, not retried by the client.
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


async def _chat(client: openai.AsyncOpenAI, i: int, max_tokens: int, headers: dict | None = None) -> str:
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=max_tokens,
        extra_headers=headers)
    completion = raw.parse()
    assert completion.choices[0].finish_reason in ("length", "stop") and completion.usage.completion_tokens >= 1
    return raw.headers[REPLICA_HEADER]


async def _stream(client: openai.AsyncOpenAI, i: int, max_tokens: int) -> str:
    stream = await client.completions.create(model=MODEL, prompt=f"Story {i}:", max_tokens=max_tokens, stream=True)
    reasons = [chunk.choices[0].finish_reason async for chunk in stream]
    assert reasons[-1] in ("length", "stop") and 1 <= len(reasons) <= max_tokens  # a chunk may carry two tokens
    return "stream"


def test_two_replicas_share_100_concurrent_requests(ray_app):
    async def run():
        async with _client(ray_app) as client:
            works = [_stream(client, i, 4) if i % 10 == 0 else _chat(client, i, 4) for i in range(100)]
            return await asyncio.gather(*works)

    served_by = Counter(asyncio.run(run()))
    assert served_by.pop("stream") == 10
    assert sum(served_by.values()) == 90
    assert len(served_by) == 2, served_by  # both replicas took work


def test_every_route_answers_through_the_proxy(ray_app):
    health = httpx.get(f"{ray_app}/health")
    assert health.status_code == 200 and health.json() == {"phase": "ready"}
    assert len(health.headers.get_list("x-request-id")) == 1
    models = httpx.get(f"{ray_app}/v1/models").json()
    assert models["data"][0]["id"] == MODEL
    assert "vllm:num_requests_running" in httpx.get(f"{ray_app}/metrics").text
    bad = httpx.post(f"{ray_app}/v1/chat/completions", json={"model": MODEL, "messages": "not a list"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert REPLICA_HEADER in bad.headers  # the replica's own error, untouched by the proxy
    missing = httpx.get(f"{ray_app}/v1/models/other")
    assert missing.status_code == 404 and "error" in missing.json()


def test_one_prefix_key_prefers_one_replica(ray_app):
    async def run():
        async with _client(ray_app) as client:
            return [await _chat(client, i, 2, {PREFIX_KEY_HEADER: "conversation-42"}) for i in range(8)]

    assert len(set(asyncio.run(run()))) == 1  # one at a time: the preferred replica is never the busier


def _kill(replica: str) -> None:
    name = f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#{replica}"
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


async def _outcome(work) -> tuple[str, str]:
    try:
        return "ok", await work
    except openai.InternalServerError as error:  # died before answering: 500 from the proxy middleware
        return "failed", error.body["code"]
    except openai.APIError as error:  # died mid-stream: an error event ends the stream
        return "failed", (error.body or {}).get("code")


def test_killing_a_replica_fails_only_its_requests_in_flight(ray_app):
    async def run():
        async with _client(ray_app) as client:
            # 64 tokens each: on a fast CPU 16 let every request finish before the kill took effect
            tasks = [asyncio.create_task(_outcome(_stream(client, i, 64) if i % 2 else _chat(client, i, 64)))
                     for i in range(48)]
            for next_done in asyncio.as_completed(tasks):  # the first answer that names its replica
                status, victim = await next_done
                if status == "ok" and victim != "stream":
                    break
            _kill(victim)  # it holds up to MAX_NUM_SEQS requests; about 30 still wait in Ray's queue
            return victim, await asyncio.gather(*tasks)

    victim, outcomes = asyncio.run(run())
    failed = [code for status, code in outcomes if status == "failed"]
    assert 1 <= len(failed) <= MAX_NUM_SEQS, outcomes
    assert all(code == REPLICA_FAILED_CODE for code in failed), failed
    assert sum(status == "ok" for status, _ in outcomes) == len(outcomes) - len(failed)

    async def after():
        async with _client(ray_app) as client:
            return await asyncio.gather(*[_chat(client, i, 2) for i in range(4)])

    assert victim not in asyncio.run(after())  # the survivor (or Ray's replacement) serves on
