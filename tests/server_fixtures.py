"""Fixtures for HTTP tests: a live uvicorn server on 127.0.0.1 in a background thread.

Imported by conftest.py; modules that need another configuration (an API key, another engine)
call `live_server(app)` themselves.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import openai
import pytest
import uvicorn
from fake_engine import FakeEngine

from fitserve.engine.async_engine import AsyncEngine
from fitserve.server.app import build_app

SERVER_START_TIMEOUT_S = 10.0
FAKE_API_KEY = "unused"  # the openai client insists on some key even when the server wants none


@dataclass(frozen=True)
class LiveServer:
    url: str  # http://127.0.0.1:<port>, no trailing slash
    engine: FakeEngine

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


@contextmanager
def live_server(app) -> Iterator[str]:
    """Serve `app` on a free port until the block exits; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=SERVER_START_TIMEOUT_S)
        sock.close()


@contextmanager
def built_engine_server(built) -> Iterator[tuple[str, AsyncEngine]]:
    """Serve an engine from `fitserve.startup.build_engine` until the block exits; yields the base URL
    and its started AsyncEngine, shut down on the way out."""
    engine = AsyncEngine(built.engine, built.model_name, built.tokenizer).start()
    try:
        with live_server(build_app(engine)) as url:
            yield url, engine
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def api_server() -> Iterator[LiveServer]:
    engine = FakeEngine()
    with live_server(build_app(engine)) as url:
        yield LiveServer(url, engine)


@pytest.fixture(scope="module")
def client(api_server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=api_server.base_url, api_key=FAKE_API_KEY, max_retries=0, timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def async_client_factory(api_server: LiveServer):
    """An AsyncOpenAI is bound to the event loop it first runs on: make one per asyncio.run."""
    def make() -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=api_server.base_url, api_key=FAKE_API_KEY, max_retries=0, timeout=10)
    return make
