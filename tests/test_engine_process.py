"""--engine-process over the fake runner: the engine core in its own process (engine/core_*.py)
behind a live HTTP server, through the openai client and httpx. What works in one process
keeps working: streams, aborts that free the core's blocks, timeouts, the queue limit, API
keys, request ids, /metrics from the core's stats, /ui/api/info; a killed core fails requests
and /health instead of hanging; a core that cannot start raises the launcher's errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from functools import partial

import httpx
import openai
import pytest
from core_fakes import MODEL, build_fake_core, core_is_idle_and_free, fake_core_server, start_fake_core, wait_for
from fake_engine import FakeTokenizer
from reliability_helpers import assert_openai_error, expected_text
from server_fixtures import FAKE_API_KEY

from fitserve.config import ConfigError, EngineConfig, ServerConfig
from fitserve.engine.client import EngineClient
from fitserve.engine.core_client import start_core_client

LONG = {"max_tokens": 200, "ignore_eos": True}  # at 10 ms a step: ~2 s, longer than any test waits
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def served():
    with fake_core_server(ServerConfig(request_timeout_s=1.0), step_delay_s=0.01) as (url, client):
        yield url, client


@pytest.fixture(scope="module")
def api(served):
    url, _ = served
    with openai.OpenAI(base_url=f"{url}/v1", api_key=FAKE_API_KEY, max_retries=0, timeout=30) as c:
        yield c


def test_completions_whole_and_streamed(api, served):
    whole = api.completions.create(model=MODEL, prompt=[5], max_tokens=4)
    assert whole.choices[0].text == expected_text(5, 4) and whole.usage.completion_tokens == 4
    pieces = [c.choices[0].text for c in api.completions.create(model=MODEL, prompt=[7], max_tokens=6, stream=True)
              if c.choices]
    assert "".join(pieces) == expected_text(7, 6) and len(pieces) >= 2
    assert wait_for(lambda: core_is_idle_and_free(served[1]))


def test_chat_whole_and_streamed(api):
    whole = api.chat.completions.create(model=MODEL, messages=USER, max_tokens=3)
    assert whole.choices[0].finish_reason == "length" and len(whole.choices[0].message.content.split()) == 3
    chunks = list(api.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and chunks[-1].usage.completion_tokens == 3


def _json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def test_a_request_the_core_refuses_is_a_400(api):
    # The fake core's grammar compiler refuses every schema: in the core, after the request was sent.
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model=MODEL, messages=USER, max_tokens=3,
                                    response_format=_json_schema({"type": "object"}))
    assert info.value.param == "response_format" and "not supported here" in info.value.message


def test_a_request_the_core_fails_to_add_is_a_500_and_the_core_goes_on(api):
    with pytest.raises(openai.InternalServerError) as info:
        api.chat.completions.create(model=MODEL, messages=USER, max_tokens=3,
                                    response_format=_json_schema({"title": "crash"}))
    assert "secret" not in info.value.message
    assert api.completions.create(model=MODEL, prompt=[5], max_tokens=2).choices[0].text == expected_text(5, 2)


def test_a_request_over_the_limits_is_refused_in_the_api_process(api):
    with pytest.raises(openai.BadRequestError) as info:
        api.completions.create(model=MODEL, prompt=[1] * 250, max_tokens=100)
    assert "max_model_len" in info.value.message or "context" in info.value.message


def test_request_ids_metrics_and_page_info(served, api):
    url, client = served
    api.completions.create(model=MODEL, prompt=[5], max_tokens=4)
    assert wait_for(lambda: core_is_idle_and_free(client))
    with httpx.Client(base_url=url, timeout=10) as http:
        resp = http.post("/v1/completions", json={"prompt": [3], "max_tokens": 2}, headers={"X-Request-Id": "abc-1"})
        assert resp.status_code == 200 and resp.headers["x-request-id"] == "abc-1"
        assert wait_for(lambda: client.stats().metrics.finished_total["length"] >= 2)
        metrics = http.get("/metrics").text
        info = http.get("/ui/api/info").json()
    generated = [line for line in metrics.splitlines() if line.startswith("vllm:generation_tokens_total")]
    assert generated and float(generated[0].split()[-1]) >= 6  # counted in the core, read here
    assert info["model"] == MODEL and info["settings"] == {"built_in": "the core process"}
    assert info["engine"]["num_kv_blocks"] == 128


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_aborts_and_frees_the_cores_blocks(served, stream):
    url, client = served
    aborted_before = client.stats().metrics.finished_total["abort"]
    with httpx.Client(base_url=url, timeout=0.3) as http:
        if stream:
            with http.stream("POST", "/v1/completions", json={"prompt": [1], "stream": True, **LONG}) as resp:
                next(resp.iter_lines())
        else:
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/completions", json={"prompt": [3], **LONG})
    assert wait_for(lambda: client.stats().metrics.finished_total["abort"] == aborted_before + 1)
    assert wait_for(lambda: core_is_idle_and_free(client)) and client.num_requests_in_flight == 0


def test_request_past_the_timeout_is_408_and_aborted(served):
    url, client = served
    resp = httpx.post(f"{url}/v1/completions", json={"prompt": [1], **LONG}, timeout=10)
    error = assert_openai_error(resp, 408)
    assert error["code"] == "request_timeout"
    assert wait_for(lambda: core_is_idle_and_free(client))


def test_api_keys_guard_the_split_server():
    with fake_core_server(ServerConfig(api_keys=("sesame",))) as (url, _):
        with httpx.Client(base_url=url, timeout=10) as http:
            assert_openai_error(http.post("/v1/completions", json={"prompt": [1], "max_tokens": 2}), 401)
            ok = http.post("/v1/completions", json={"prompt": [1], "max_tokens": 2},
                           headers={"Authorization": "Bearer sesame"})
            assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == expected_text(1, 2)


def test_queue_limit_answers_503():
    with fake_core_server(ServerConfig(max_queue_len=0), max_num_seqs=1, step_delay_s=0.01) as (url, client):
        with httpx.Client(base_url=url, timeout=10) as http:
            with http.stream("POST", "/v1/completions", json={"prompt": [1], "stream": True, **LONG}) as running:
                lines = running.iter_lines()  # kept: a dropped iterator closes the stream (a disconnect)
                next(lines)
                refused = http.post("/v1/completions", json={"prompt": [9], "max_tokens": 2})
                assert assert_openai_error(refused, 503)["code"] == "server_overloaded"
            assert wait_for(lambda: client.num_requests_in_flight == 0)
            assert http.post("/v1/completions", json={"prompt": [9], "max_tokens": 2}).status_code == 200


def test_a_killed_core_fails_requests_and_health_instead_of_hanging():
    with fake_core_server(step_delay_s=0.01) as (url, client):
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/health").status_code == 200
            with http.stream("POST", "/v1/completions", json={"prompt": [1], "stream": True, **LONG}) as resp:
                lines = resp.iter_lines()
                next(lines)
                os.kill(client.pid, signal.SIGKILL)
                events = [line for line in lines if line]
            assert events[-1] == "data: [DONE]"
            assert "error" in json.loads(events[-2].removeprefix("data: "))
            health = http.get("/health")
            assert health.status_code == 503 and health.json()["phase"] == "failed"
            assert_openai_error(http.post("/v1/completions", json={"prompt": [1], "max_tokens": 2}), 503)
        assert client.num_requests_in_flight == 0


@pytest.mark.parametrize("fail_with, error, words", [("config", ConfigError, "max-model-len"),
                                                     ("crash", RuntimeError, "loader fell over")])
def test_a_core_that_cannot_start_raises_here(fail_with, error, words):
    with pytest.raises(error, match=words):
        start_fake_core(fail_with=fail_with)


def test_the_api_process_loads_its_tokenizer_while_the_core_builds(tmp_path):
    """The core's build waits for a file that only the tokenizer's loading writes: it comes up only if
    the tokenizer loads while the core builds, not after (on the CPU that was 2-3 s of /health)."""
    marker = tmp_path / "tokenizer-loading"

    def tokenizer_for():
        marker.touch()
        return FakeTokenizer()

    client = start_core_client(partial(build_fake_core, wait_for_path=str(marker)), None, tokenizer_for,
                               max_queue_len=None)
    try:
        assert isinstance(client.tokenizer, FakeTokenizer)
    finally:
        client.shutdown()


def test_shutdown_stops_the_core_process():
    client = start_fake_core()
    assert isinstance(client, EngineClient)
    process = client._process
    client.shutdown()
    client.shutdown()  # idempotent
    assert not process.is_alive() and process.exitcode == 0


def test_not_with_replicas(capsys):
    from fitserve.cli import main

    assert main(["serve", "--engine-process", "--replicas", "2"]) == 2
    assert "--replicas" in capsys.readouterr().err


def test_many_concurrent_streams_each_get_their_own_tokens():

    async def one(api: openai.AsyncOpenAI, prompt_id: int) -> str:
        chunks = await api.completions.create(model=MODEL, prompt=[prompt_id], max_tokens=12, stream=True)
        return "".join([c.choices[0].text async for c in chunks if c.choices])

    async def run_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=FAKE_API_KEY, max_retries=0, timeout=60) as api:
            return await asyncio.gather(*(one(api, i) for i in range(1, 65)))

    with fake_core_server(max_num_seqs=16) as (url, client):  # 64 streams, 16 at a time, the rest queued
        texts = asyncio.run(run_all())
        assert texts == [expected_text(i, 12) for i in range(1, 65)]
        assert wait_for(lambda: core_is_idle_and_free(client))


def test_fitserve_bench_w2_drives_the_split_server(tmp_path, capsys):
    from fitserve.cli import main

    path = tmp_path / "w2.json"
    with fake_core_server(max_num_seqs=16) as (url, _):
        rc = main(["bench", "--base-url", url, "--workload", "W2", "--num-prompts", "16", "--max-concurrency", "8",
                   "--input-len", "12", "--output-len", "4", "--vocab-size", "1000", "--disable-tqdm",
                   "--metric-percentiles", "50,99", "--save-result", str(path)])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(path.read_text())
    assert result["completed"] == 16 and result["p99_itl_ms"] >= 0 and result["median_ttft_ms"] > 0
    # Scraped from /metrics: counters the core counted, read in the API process from its stats.
    assert result["server_metrics"]["available"] and result["server_metrics"]["prefix_cache_queries"] > 0


def test_the_default_is_the_core_process_on_one_gpu_and_in_process_elsewhere():
    from fitserve.config import EngineConfig

    assert EngineConfig().uses_engine_process(on_cuda=True)
    assert not EngineConfig().uses_engine_process(on_cuda=False)
    assert not EngineConfig(tensor_parallel_size=2).uses_engine_process(on_cuda=True)
    assert not EngineConfig(engine_process=False).uses_engine_process(on_cuda=True)
    assert EngineConfig(engine_process=True).uses_engine_process(on_cuda=False)
