"""A client that goes away mid-request must abort the engine request (its KV blocks are freed)."""

from __future__ import annotations

import time

import httpx
import pytest
from fake_engine import FakeEngine
from server_fixtures import LiveServer, live_server

from fitserve.server.app import build_app

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
])
def test_disconnect_mid_stream_aborts(slow_server, path, body):
    engine = slow_server.engine
    num_before = len(engine.aborted)
    with httpx.Client(base_url=slow_server.url) as http:
        with http.stream("POST", path, json={**body, "max_tokens": 1000, "stream": True}) as resp:
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
