"""Limits a client can run into: body size (413), queue length (503 + Retry-After; bounded by
default), request timeout (408, or an in-band error once streaming), a request that could never be
admitted or never fit the KV cache (400, not a retryable 503), and aborts that free every KV block."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from reliability_helpers import (
    MODEL,
    assert_all_blocks_free,
    assert_openai_error,
    engine_server,
    expected_text,
    wait_until,
)

from fitserve.config import ServerConfig
from fitserve.engine.async_engine import DEFAULT_MAX_QUEUE_LEN_PER_SEQ

BODY_LIMIT_BYTES = 2048
LONG = {"max_tokens": 200, "ignore_eos": True}  # at 10 ms a step: ~2 s, longer than any test waits


@pytest.fixture(scope="module")
def small_body_server():
    with engine_server(ServerConfig(max_request_body_bytes=BODY_LIMIT_BYTES)) as (url, engine):
        yield url, engine


def test_declared_body_over_the_limit_is_413(small_body_server):
    url, _ = small_body_server
    body = json.dumps({"model": MODEL, "prompt": "a" * BODY_LIMIT_BYTES}).encode()
    resp = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"})
    error = assert_openai_error(resp, 413)
    assert error["code"] == "request_too_large" and resp.headers["x-request-id"]


def test_chunked_body_over_the_limit_is_413(small_body_server):
    url, _ = small_body_server

    def chunks():  # no Content-Length: the server must count as it reads
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * 512
        yield b'"}'

    resp = httpx.post(f"{url}/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(resp, 413)


def test_body_under_the_limit_is_served(small_body_server):
    url, engine = small_body_server
    resp = httpx.post(f"{url}/v1/completions", json={"prompt": [5], "max_tokens": 3})
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == expected_text(5, 3)
    assert_all_blocks_free(engine)


def _open_stream(http: httpx.Client, prompt: list[int]) -> httpx.Response:
    request = http.build_request("POST", "/v1/completions", json={"prompt": prompt, "stream": True, **LONG})
    resp = http.send(request, stream=True)
    assert resp.status_code == 200
    return resp


def test_queue_limit_answers_503_with_retry_after():
    config = ServerConfig(max_queue_len=1)
    with engine_server(config, max_num_seqs=2, step_delay_s=0.01) as (url, engine):
        with httpx.Client(base_url=url, timeout=10) as http, ThreadPoolExecutor(1) as pool:
            streams = [_open_stream(http, [i + 1]) for i in range(2)]  # the 2 that run
            waiting = pool.submit(httpx.post, f"{url}/v1/completions", json={"prompt": [3], "max_tokens": 2},
                                  timeout=10)  # the 1 that may wait
            try:
                assert wait_until(lambda: engine.num_requests_in_flight == 3)
                refused = http.post("/v1/completions", json={"prompt": [9], "max_tokens": 2})
                error = assert_openai_error(refused, 503)
                assert error["code"] == "server_overloaded" and int(refused.headers["retry-after"]) >= 1
                two_prompts = http.post("/v1/completions", json={"prompt": [[1], [2]], "max_tokens": 2})
                assert_openai_error(two_prompts, 503)
            finally:
                for stream in streams:
                    stream.close()
            assert waiting.result().json()["choices"][0]["text"] == expected_text(3, 2)
            assert_all_blocks_free(engine)
            accepted = http.post("/v1/completions", json={"prompt": [9], "max_tokens": 2})
            assert accepted.status_code == 200, accepted.text
    assert_all_blocks_free(engine)


@pytest.fixture(scope="module")
def timeout_server():
    with engine_server(ServerConfig(request_timeout_s=0.3), step_delay_s=0.01) as (url, engine):
        yield url, engine


def test_request_past_the_timeout_is_408_and_aborted(timeout_server):
    url, engine = timeout_server
    resp = httpx.post(f"{url}/v1/completions", json={"prompt": [1], **LONG}, timeout=10)
    error = assert_openai_error(resp, 408)
    assert error["code"] == "request_timeout" and "0.3 s" in error["message"]
    assert_all_blocks_free(engine, timeout_s=0.5)


def test_stream_past_the_timeout_ends_with_an_error_event(timeout_server):
    url, engine = timeout_server
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, **LONG}
    resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
    assert resp.status_code == 200
    events = [line for line in resp.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "request_timeout"
    assert_all_blocks_free(engine, timeout_s=0.5)


def test_requests_within_the_timeout_are_untouched(timeout_server):
    url, engine = timeout_server
    resp = httpx.post(f"{url}/v1/completions", json={"prompt": [7], "max_tokens": 4}, timeout=10)
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == expected_text(7, 4)


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_frees_every_block(stream):
    with engine_server(step_delay_s=0.01) as (url, engine):
        with httpx.Client(base_url=url, timeout=0.2) as http:
            if stream:
                with http.stream("POST", "/v1/completions", json={"prompt": [[1], [2]], "stream": True, **LONG}) as r:
                    next(r.iter_lines())
            else:
                with pytest.raises(httpx.ReadTimeout):
                    http.post("/v1/completions", json={"prompt": [3], **LONG})
        assert wait_until(lambda: engine.engine.has_unfinished is False, 1.0)
        assert_all_blocks_free(engine)


def test_abort_lands_within_one_engine_step_of_the_disconnect():
    with engine_server(step_delay_s=0.05) as (url, engine):  # steps long next to the event loop's reaction
        with httpx.Client(base_url=url, timeout=10) as http:
            with http.stream("POST", "/v1/completions", json={"prompt": [1], "stream": True, **LONG}) as resp:
                next(resp.iter_lines())
                steps_at_close = engine.engine.num_steps
        assert wait_until(lambda: not engine.engine.has_unfinished, 2.0)
        # The step running when the client left may finish; the next one no longer has the request.
        assert engine.engine.num_steps - steps_at_close <= 2
        assert_all_blocks_free(engine)


def test_a_request_that_could_never_be_admitted_is_a_400_not_a_503():
    with engine_server(ServerConfig(max_queue_len=0), max_num_seqs=2) as (url, engine):
        with httpx.Client(base_url=url, timeout=10) as http:
            three_prompts = http.post("/v1/completions", json={"prompt": [[1], [2], [3]], "max_tokens": 2})
            error = assert_openai_error(three_prompts, 400, param="n")
            assert "ever holds at once (2" in error["message"] and "retry-after" not in three_prompts.headers
            chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "n": 3})
            assert_openai_error(chat, 400, param="n")
            two = http.post("/v1/completions", json={"prompt": [[1], [2]], "max_tokens": 2})
            assert two.status_code == 200, two.text
        assert_all_blocks_free(engine)


def test_the_queue_is_bounded_by_default():
    with engine_server(max_num_seqs=2) as (url, engine):
        assert engine.max_num_in_flight == 2 + DEFAULT_MAX_QUEUE_LEN_PER_SEQ * 2
        resp = httpx.post(f"{url}/v1/completions", json={"prompt": [1], "n": engine.max_num_in_flight + 1}, timeout=10)
        assert_openai_error(resp, 400, param="n")


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": [5], "max_tokens": 40}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 40},
     "max_completion_tokens"),
])
def test_a_request_longer_than_the_whole_kv_cache_is_a_400(path, body, param):
    with engine_server(num_blocks=8, block_size=4) as (url, engine):  # 32 tokens of KV cache, a 256-token context
        resp = httpx.post(f"{url}{path}", json=body, timeout=10)
        error = assert_openai_error(resp, 400, param=param)
        assert "KV cache holds 32 tokens" in error["message"] and f"`{param}` is too large" in error["message"]
        fits = httpx.post(f"{url}/v1/completions", json={"prompt": [5], "max_tokens": 20}, timeout=10)
        assert fits.status_code == 200, fits.text
        assert_all_blocks_free(engine)
