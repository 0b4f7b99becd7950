"""Past --shutdown-timeout, each open stream ends with an OpenAI error event and `[DONE]`, a request
not yet answered gets a 503, one log line names each, and the process exits non-zero."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from reliability_helpers import MODEL

from fitserve.bench.server_process import free_port
from fitserve.server.launcher import EXIT_REQUESTS_CUT

START_TIMEOUT_S = 60.0
STEP_S = 0.05  # per engine step: 200 tokens take 10 s, far past the 0.5 s shutdown timeout


def start(tmp_path: Path, port: int) -> tuple[subprocess.Popen, Path]:
    log_path = tmp_path / "serve.log"
    config = json.dumps({"shutdown_timeout_s": 0.5})
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "fake_serve_main.py"), str(port), config,
                                 str(STEP_S)], stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, log_path
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the server did not start: {log_path.read_text()[-2000:]}")


def stream(url: str, started: threading.Event, results: dict) -> None:
    body = {"model": MODEL, "prompt": [1, 2], "max_tokens": 200, "ignore_eos": True, "stream": True}
    events: list[str] = []
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    started.set()
    except httpx.HTTPError as error:
        events.append(f"transport error {error!r}")
    results["stream"] = events


def unary(url: str, results: dict) -> None:
    body = {"model": MODEL, "prompt": [1, 2], "max_tokens": 200, "ignore_eos": True}
    try:
        results["unary"] = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    except httpx.HTTPError as error:
        results["unary"] = error


def test_forced_shutdown_ends_streams_with_an_error_and_done_and_exits_non_zero(tmp_path):
    port = free_port()
    proc, log_path = start(tmp_path, port)
    url = f"http://127.0.0.1:{port}"
    try:
        results: dict = {}
        started = threading.Event()
        threads = [threading.Thread(target=stream, args=(url, started, results)),
                   threading.Thread(target=unary, args=(url, results))]
        for thread in threads:
            thread.start()
        assert started.wait(START_TIMEOUT_S)
        time.sleep(0.3)  # the unary request is running too
        proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(60)
        exit_code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = log_path.read_text()
    events = results["stream"]
    assert events[-1] == "[DONE]", (events[-3:], log[-3000:])
    error = json.loads(events[-2])["error"]
    assert error["code"] == "shutdown" and "--shutdown-timeout" in error["message"], events[-2]
    assert len(events) < 200  # it was cut, not finished
    unary_resp = results["unary"]
    assert isinstance(unary_resp, httpx.Response) and unary_resp.status_code == 503, (unary_resp, log[-3000:])
    assert unary_resp.json()["error"]["code"] == "shutdown"
    assert log.count("Cut request id=") == 2, log[-3000:]
    assert exit_code == EXIT_REQUESTS_CUT, log[-3000:]
