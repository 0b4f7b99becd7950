"""A client that goes away mid-request must abort the engine request (its KV blocks are freed)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest
from fake_engine import FakeEngine
from reliability_helpers import assert_all_blocks_free, make_engine
from server_fixtures import LiveServer, live_server
from starlette.requests import ClientDisconnect, Request

from fitserve.sampling_params import SamplingParams
from fitserve.server.app import build_app
from fitserve.server.protocol import ChatCompletionRequest, CompletionRequest
from fitserve.server.serving_chat import OpenAIServingChat
from fitserve.server.serving_common import ServingBase, close_all, prime
from fitserve.server.serving_completion import OpenAIServingCompletion

TOKEN_DELAY_S = 0.02  # slow enough that a request is still running when the client leaves
ABORT_WAIT_S = 3.0


@pytest.fixture(scope="module")
def slow_server():
    engine = FakeEngine(max_model_len=4096, token_delay_s=TOKEN_DELAY_S)
    with live_server(build_app(engine)) as url:
        yield LiveServer(url, engine)


def wait_for_abort(engine: FakeEngine, num_aborted: int) -> None:
    deadline = time.monotonic() + ABORT_WAIT_S
    while len(engine.aborted) < num_aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(engine.aborted) >= num_aborted, "the engine request was not aborted"
    assert not engine.running


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"prompt": ["a", "b"]}),  # both prompts' requests are aborted
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 3}),  # every choice
    ("/v1/completions", {"prompt": ["a", "b"], "n": 2}),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 1000}),  # through the chat path
])
def test_disconnect_mid_stream_aborts(slow_server, path, body):
    engine = slow_server.engine
    num_before = len(engine.aborted)
    with httpx.Client(base_url=slow_server.url) as http:
        with http.stream("POST", path, json={"max_tokens": 1000, **body, "stream": True}) as resp:
            lines = resp.iter_lines()
            received = [next(lines) for _ in range(4)]
            assert any(line.startswith("data: ") for line in received)
    num_requests = len(body.get("prompt", [None])) * body.get("n", 1)
    wait_for_abort(engine, num_before + num_requests)


def test_disconnect_while_waiting_for_full_response_aborts(slow_server):
    engine = slow_server.engine
    num_before = len(engine.aborted)
    with httpx.Client(base_url=slow_server.url, timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1000})
    wait_for_abort(engine, num_before + 1)


def test_finished_requests_are_not_aborted(slow_server):
    engine = slow_server.engine
    num_before = len(engine.aborted)
    with httpx.Client(base_url=slow_server.url) as http:
        assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": 3}).status_code == 200
        assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": 3, "stream": True}).status_code == 200
    assert len(engine.aborted) == num_before


# -- a stream closed before it sends its first chunk ---------------------------------------------
# Driven on the serving objects, not over a socket, so that the moment the client leaves is forced:
# the test holds the response, so nothing but the server's own clean-up can abort the requests.

STREAMED = [
    (OpenAIServingChat, ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], "n": 3}, 3),
    (OpenAIServingCompletion, CompletionRequest, {"prompt": ["a", "b"], "n": 2}, 4),
]


def _asgi_scope(spec_version: str = "2.3") -> dict:
    # 2.3, as uvicorn declares: Starlette watches for the disconnect beside the stream; from 2.4 it
    # only sees the failed send.
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
            "method": "POST", "path": "/", "raw_path": b"/", "query_string": b"", "headers": [],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "scheme": "http"}


def _client_leaving_after_prime():
    """An ASGI receive: connected while the first tokens are awaited, gone once the response starts."""
    calls = [0]

    async def receive() -> dict:
        calls[0] += 1
        if calls[0] == 1:  # prime_all's disconnect watch: the client is still there
            await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    return receive


async def _streamed_response(engine, serving_cls, request_cls, fields):
    receive = _client_leaving_after_prime()
    serving = serving_cls(engine)
    body = request_cls(**fields, max_tokens=100, stream=True)
    response = await serving.create(body, Request(_asgi_scope(), receive), "req")
    return response, receive


async def _noop_send(message: dict) -> None:
    pass


async def _send_failing_at_start(message: dict) -> None:
    if message["type"] == "http.response.start":
        raise OSError("the connection is gone")  # what a server with ASGI 2.4 raises to a closed client


@pytest.mark.parametrize("spec_version, send", [("2.3", _noop_send), ("2.4", _send_failing_at_start)])
@pytest.mark.parametrize("serving_cls, request_cls, fields, num_requests", STREAMED)
def test_disconnect_before_the_first_chunk_aborts_every_choice(serving_cls, request_cls, fields, num_requests,
                                                               spec_version, send):
    """2.3: Starlette notices the disconnect beside the stream and cancels it; 2.4: sending the
    headers fails, so the body never starts and its own clean-up never runs."""
    engine = FakeEngine(max_model_len=4096)

    async def scenario():
        response, receive = await _streamed_response(engine, serving_cls, request_cls, fields)
        assert len(engine.running) == num_requests
        with contextlib.suppress(ClientDisconnect):
            await response(_asgi_scope(spec_version), receive, send)
        # Checked at once, before the event loop could finalize forgotten generators.
        assert not engine.running, f"still running after the response ended: {engine.running}"
        assert len(engine.aborted) == num_requests

    asyncio.run(scenario())


def test_closing_a_primed_stream_that_was_never_read_aborts_it():
    engine = FakeEngine(max_model_len=4096)

    async def scenario():
        source = ServingBase(engine).engine_stream("req", [1, 2, 3], SamplingParams(max_tokens=100))
        primed = await prime(source)
        await close_all([primed])
        assert engine.aborted == ["req"] and not engine.running

    asyncio.run(scenario())


@pytest.mark.parametrize("serving_cls, request_cls, fields, num_requests", STREAMED)
def test_stream_closed_after_its_first_chunk_aborts_every_choice(serving_cls, request_cls, fields, num_requests):
    """Chat sends each choice's role chunk before reading any engine output: closing the body then
    must still close every choice's engine stream."""
    engine = FakeEngine(max_model_len=4096)

    async def scenario():
        response, _ = await _streamed_response(engine, serving_cls, request_cls, fields)
        first = await response.body_iterator.__anext__()
        assert first.startswith("data: {")
        await response.body_iterator.aclose()
        assert not engine.running, f"still running after the body was closed: {engine.running}"
        assert len(engine.aborted) == num_requests

    asyncio.run(scenario())


def test_disconnect_before_the_first_chunk_frees_kv_blocks():
    """The same over the real engine, for a body that never started: every request leaves the
    engine at once and its KV blocks come back."""
    engine = make_engine(step_delay_s=0.005)
    try:
        async def scenario():
            fields = {"prompt": ["a", "b"], "n": 2}
            response, receive = await _streamed_response(engine, OpenAIServingCompletion, CompletionRequest, fields)
            with contextlib.suppress(ClientDisconnect):
                await response(_asgi_scope("2.4"), receive, _send_failing_at_start)
            assert engine.num_requests_in_flight == 0
            assert_all_blocks_free(engine)

        asyncio.run(scenario())
    finally:
        engine.shutdown()
