"""Idle and slow connections are closed within their (small, configured) timeouts; past
--max-connections a new connection gets 503; a request framed both ways is a 400 that closes
its connection. Raw sockets on 127.0.0.1 against a live server with the launcher's settings."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from reliability_helpers import make_engine

from fitserve.bench.server_process import free_port
from fitserve.config import ServerConfig
from fitserve.server import connection_guard
from fitserve.server.app import build_app
from fitserve.server.connection_guard import GuardedH11Protocol, GuardedHttpToolsProtocol
from fitserve.server.launcher import build_server

TIMEOUT_S = 1.0  # every guard timeout in these tests
SLACK_S = 5.0  # the shared CI machine may be slow: "closed within the timeout plus this"
START_TIMEOUT_S = 10.0
GUARDED = ServerConfig(timeout_keep_alive_s=TIMEOUT_S, timeout_header_s=TIMEOUT_S, timeout_body_s=TIMEOUT_S,
                       max_connections=4)


@pytest.fixture(params=[GuardedHttpToolsProtocol, GuardedH11Protocol], ids=["httptools", "h11"])
def protocol(request, monkeypatch):
    monkeypatch.setattr(connection_guard, "default_protocol", lambda: request.param)
    return request.param


@contextmanager
def guarded_server(config: ServerConfig = GUARDED) -> Iterator[int]:
    engine = make_engine()
    app = build_app(engine, config=config)
    port = free_port()
    server = build_server(app, "127.0.0.1", port, app.state.lifecycle, config, log_level="warning")
    assert isinstance(server.config, connection_guard.GuardedConfig)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(START_TIMEOUT_S)
        engine.shutdown()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S + SLACK_S)


def read_until_closed(sock: socket.socket) -> bytes:
    """All the server sends until it closes; socket.timeout (a test failure) if it never does."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def closed_while_dripping(sock: socket.socket, drip: bytes) -> bool:
    """Send `drip` a byte every 0.2 s; True once the server has closed the connection."""
    deadline = time.monotonic() + TIMEOUT_S + SLACK_S
    for byte in drip:
        if time.monotonic() > deadline:
            return False
        readable, _, _ = select.select([sock], [], [], 0.2)
        if readable and sock.recv(65536) == b"":
            return True
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return True
    return False


def health(port: int) -> bytes:
    with connect(port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return read_until_closed(sock)


def test_a_silent_connection_is_closed(protocol):
    with guarded_server() as port, connect(port) as sock:
        assert read_until_closed(sock) == b""
        assert health(port).startswith(b"HTTP/1.1 200")


def test_headers_dripped_a_byte_at_a_time_are_cut(protocol):
    with guarded_server() as port, connect(port) as sock:
        assert closed_while_dripping(sock, b"GET /health HTTP/1.1\r\n" + b"X-Slow: " + b"a" * 200)


def test_half_a_body_is_cut(protocol):
    with guarded_server() as port, connect(port) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        read_until_closed(sock)  # closed (with or without an answer) instead of waiting for ever


def test_an_idle_kept_alive_connection_is_closed(protocol):
    with guarded_server() as port, connect(port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 200")


def test_past_max_connections_a_new_connection_gets_503_and_the_rest_still_serve(protocol):
    config = ServerConfig(timeout_header_s=30.0, max_connections=3)
    with guarded_server(config) as port:
        idle = [connect(port) for _ in range(3)]
        time.sleep(0.2)  # accepted
        with connect(port) as extra:
            assert read_until_closed(extra).startswith(b"HTTP/1.1 503")
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + SLACK_S
        while not health(port).startswith(b"HTTP/1.1 200"):
            assert time.monotonic() < deadline
            time.sleep(0.1)


@pytest.mark.parametrize("transfer_encoding", [b"chunked", b"gzip, chunked"])
def test_content_length_with_transfer_encoding_is_a_400_that_closes(protocol, transfer_encoding):
    with guarded_server() as port, connect(port) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: "
                     + transfer_encoding + b"\r\n\r\n0\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert answer.count(b"HTTP/1.1") == 1  # the smuggled second request was not served


def test_the_cap_leaves_room_under_the_open_file_limit(monkeypatch):
    monkeypatch.setattr(connection_guard.resource, "getrlimit", lambda _: (256, 4096))
    assert connection_guard.connection_cap(1024) == 256 - connection_guard.FD_RESERVE
    assert connection_guard.connection_cap(100) == 100


def test_the_server_imports_and_picks_h11_without_httptools():
    """`pip install uvicorn` (without [standard]) has no httptools: the guard must still import (it once
    defined the httptools protocol unconditionally, and `fitserve serve` failed at start-up)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['httptools'] = None\n"
            "from fitserve.server import connection_guard, launcher\n"
            "assert connection_guard.HttpToolsProtocol is None\n"
            "assert connection_guard.default_protocol() is connection_guard.GuardedH11Protocol\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
