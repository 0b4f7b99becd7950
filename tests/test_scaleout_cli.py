"""`fitserve serve --replicas` as a user runs it: up, serving, then SIGTERM stops Ray with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from proc_helpers import is_running

from fitserve.bench.server_process import free_port
from fitserve.scaleout.options import REPLICA_HEADER

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one Ray instance at a time

SRC = str(Path(__file__).resolve().parents[1] / "src")
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 90.0


def _descendants(root: int) -> set[int]:
    """Every live process below `root` (from /proc): Ray's GCS, raylet, workers and replicas."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def test_sigterm_stops_the_replicas_and_the_ray_instance(tmp_path):
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    command = [sys.executable, "-m", "fitserve", "serve", "--replicas", "1", "--port", str(port),
               "--replica-num-cpus", "0.5", "--kv-cache-memory-bytes", "64MiB", "--max-model-len", "256",
               "--max-num-seqs", "4", "--gpu-telemetry-interval", "0", "--disable-log-stats"]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # a local instance
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**env, "PYTHONPATH": SRC})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the replicas did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0) as client:
            raw = client.completions.with_raw_response.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=2)
        assert raw.parse().usage.completion_tokens == 2 and raw.headers[REPLICA_HEADER]
        ray_processes = _descendants(server.pid)
        assert len(ray_processes) >= 3  # at least the GCS, the raylet and the replica

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=STOP_TIMEOUT_S) == 0
        deadline = time.monotonic() + 15
        while any(is_running(pid) for pid in ray_processes) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [pid for pid in ray_processes if is_running(pid)], "Ray processes outlived the server"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()
