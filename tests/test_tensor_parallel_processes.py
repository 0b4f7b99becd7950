"""The worker processes of tensor parallelism: they stop with the engine and with the server,
never outlive a killed parent, and a dead worker fails the engine instead of hanging it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from proc_helpers import child_pids, is_running
from test_shutdown import fitserve_process, wait_for_phases
from tp_helpers import PROMPTS, generate_after_killing_a_worker, greedy_tokens, tiny_llm, write_tiny_llama

from fitserve.runner.distributed import TensorParallelError

EXIT_WAIT_S = 30.0  # workers watch their parent; the CI machines are shared and slow


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def wait_until_gone(pids: list[int], timeout_s: float = EXIT_WAIT_S) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(is_running(pid) for pid in pids):
        time.sleep(0.1)
    return [pid for pid in pids if is_running(pid)]


def test_shutdown_stops_the_workers(tiny_folder):
    llm = tiny_llm(tiny_folder, 2)
    workers = llm.engine.runner.peers.processes
    assert [p.is_alive() for p in workers] == [True]
    greedy_tokens(llm, PROMPTS[:1])
    llm.shutdown()
    assert [p.exitcode for p in workers] == [0], "a worker stops on STOP, cleanly"
    llm.shutdown()  # idempotent


def test_a_dead_worker_fails_the_engine_instead_of_hanging_it(tiny_folder):
    llm = tiny_llm(tiny_folder, 2)
    try:
        hung, error = generate_after_killing_a_worker(llm, EXIT_WAIT_S)
        assert not hung, "the engine hung on a dead worker"
        assert isinstance(error, TensorParallelError)
        assert "fitserve-tp1" in str(error) or "gone" in str(error)
    finally:
        llm.shutdown()


SCRIPT = """
import sys, time
sys.path.insert(0, {src!r})
sys.path.insert(0, {tests!r})
from tp_helpers import tiny_llm
if __name__ == "__main__":
    llm = tiny_llm({folder!r}, 2)
    print(*(p.pid for p in llm.engine.runner.peers.processes), flush=True)
    time.sleep(600)
"""


def test_workers_do_not_outlive_a_killed_parent(tiny_folder, tmp_path):
    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "parent.py"
    script.write_text(SCRIPT.format(src=str(root / "src"), tests=str(root / "tests"), folder=str(tiny_folder)))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        worker_pids = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(worker_pids) == 1 and all(is_running(pid) for pid in worker_pids)
        parent.kill()  # SIGKILL: no atexit, no shutdown(): only the workers' own watch can end them
        parent.wait()
        assert wait_until_gone(worker_pids) == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_sigterm_to_the_server_stops_its_workers(tiny_folder, tmp_path):
    flags = ("--model", str(tiny_folder), "--device", "cpu", "--dtype", "float32", "--tensor-parallel-size", "2",
             "--kv-cache-memory-bytes", "8MiB", "--disable-ui", "--gpu-telemetry-interval", "0")
    with fitserve_process(tmp_path, *flags) as (proc, url, log_path):
        phases = wait_for_phases(url, proc, until="ready")
        assert phases[-1] == (200, "ready"), log_path.read_text()[-3000:]
        workers = sorted(child_pids(proc.pid) - {proc.pid})
        assert workers, "the server started its worker"
        reply = httpx.post(f"{url}/v1/completions", timeout=60,
                           json={"model": str(tiny_folder), "prompt": PROMPTS[1], "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(EXIT_WAIT_S) == 0
        assert wait_until_gone(workers) == []
