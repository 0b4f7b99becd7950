"""A real `fitserve serve` process (the embedded default model): the HTTP server answers /health
503 while the engine loads, and SIGTERM during 8 streams lets all 8 finish, then exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from fitserve.bench.server_process import free_port

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 180.0  # the default model loads in ~5 s; the CI machines are shared
NUM_STREAMS = 8
SMALL = ("--max-model-len", "512", "--kv-cache-memory-bytes", "64MiB")  # quicker start, same model
MAX_TOKENS = 64  # a few seconds of decoding on the CPU: still running when SIGTERM comes


@contextmanager
def fitserve_process(tmp_path: Path, *flags: str) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fitserve", "serve", "--port", str(port), *flags],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        yield proc, f"http://127.0.0.1:{port}", log_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for_phases(url: str, proc: subprocess.Popen, until: str) -> list[tuple[int, str]]:
    """Poll /health until its phase is `until`; returns every (status, phase) seen."""
    seen: list[tuple[int, str]] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            resp = httpx.get(f"{url}/health", timeout=2)
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        seen.append((resp.status_code, resp.json()["phase"]))
        if seen[-1][1] == until:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"/health never reached {until!r}; saw {seen[-5:]}")


def stream_completion(url: str, index: int, started: threading.Event, results: dict) -> None:
    body = {"prompt": f"Count to one hundred, number {index}:", "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "temperature": 0, "stream": True}
    events: list[str] = []
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as resp:
            results[index] = resp.status_code
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    started.set()
        results[index] = events
    except httpx.HTTPError as error:  # reported by the test's assertions, with the server log
        results[index] = f"{error!r} after {len(events)} events"


def refuses_new_connections(url: str, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/health", timeout=1)
        except httpx.ConnectError:
            return True
        except httpx.TransportError:  # caught in the backlog as the socket closed, or slow: try again
            pass
        time.sleep(0.02)
    return False


def test_sigterm_drains_eight_streams_then_exits_0(tmp_path):
    # a drain bound far past the few seconds the streams need, so that a loaded machine does not
    # turn the drain into a forced shutdown (exit 1)
    with fitserve_process(tmp_path, *SMALL, "--shutdown-timeout", "300") as (proc, url, log_path):
        phases = wait_for_phases(url, proc, "ready")
        assert phases[0][0] == 503 and phases[0][1] in ("starting", "loading"), phases
        results: dict[int, object] = {}
        started = [threading.Event() for _ in range(NUM_STREAMS)]
        threads = [threading.Thread(target=stream_completion, args=(url, i, started[i], results))
                   for i in range(NUM_STREAMS)]
        for thread in threads:
            thread.start()
        assert all(event.wait(START_TIMEOUT_S) for event in started), ("a stream never started", results)
        proc.send_signal(signal.SIGTERM)
        refused = refuses_new_connections(url)
        for thread in threads:
            thread.join(300)
        exit_code = proc.wait(60)
        log = log_path.read_text()
    assert refused, ("still accepting connections after SIGTERM", log[-3000:])
    assert exit_code == 0, log[-3000:]
    assert f"draining {NUM_STREAMS} in flight" in log, log[-3000:]
    for index in range(NUM_STREAMS):
        events = results[index]
        assert isinstance(events, list) and events[-1] == "[DONE]", (index, events, log[-3000:])
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert not any("error" in c for c in chunks)


def test_sigterm_while_loading_exits_0(tmp_path):
    with fitserve_process(tmp_path, *SMALL) as (proc, url, _):
        wait_for_phases(url, proc, "loading")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
