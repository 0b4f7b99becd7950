"""--api-server-count 2 over the fake runner's core (server/api_servers.py, engine/core_group.py):
two API processes share one listening socket and one engine core. Each stream gets its own
tokens whichever process serves it; every process's /metrics shows the whole server; the queue
limit counts the requests of both; API keys, request ids and --request-timeout work in each; a
killed API process loses only its own requests (the core aborts them) while the other's streams
finish; SIGTERM drains both, then stops the core; a killed core turns both to 503; a core that
cannot start ends the server with exit code 2.

Which process serves a connection is read from /proc (the client's port among the process's
sockets), so each test knows it reached both processes."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from core_fakes import MODEL, run_fake_api_servers, wait_for
from proc_helpers import child_pids, is_running, tcp_ports
from reliability_helpers import assert_openai_error, expected_text

from fitserve.config import ConfigError, ServerConfig
from fitserve.server.api_servers import listening_socket

KEY = "sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = {"max_tokens": 200, "ignore_eos": True}  # at 10 ms a step: ~2 s
START_TIMEOUT_S = 120.0  # three spawned processes import fitserve on a busy machine
MAX_TRIES = 40  # new connections tried to reach each API process


@dataclass
class Servers:
    url: str
    port: int
    supervisor: multiprocessing.process.BaseProcess
    api_pids: list[int]
    core_pid: int

    def served_by(self, client_port: int) -> int | None:
        return next((pid for pid in self.api_pids if client_port in tcp_ports(pid)[1]), None)


def _spawned_children(pid: int) -> list[int]:
    return [child for child in child_pids(pid)
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()]


def _client_port(resp: httpx.Response) -> int:
    return resp.extensions["network_stream"].get_extra_info("client_addr")[1]


def _get_on_each(servers: Servers, path: str, headers: dict | None = None) -> dict[int, httpx.Response]:
    """GET `path` on new connections until every API process has answered once: {pid: response}."""
    answers: dict[int, httpx.Response] = {}
    for _ in range(MAX_TRIES):
        with httpx.Client(base_url=servers.url, timeout=10, headers=headers) as http:
            resp = http.get(path)
            pid = servers.served_by(_client_port(resp))
        if pid is not None:
            answers.setdefault(pid, resp)
        if len(answers) == len(servers.api_pids):
            return answers
    raise AssertionError(f"{MAX_TRIES} connections reached only API processes {sorted(answers)}")


@contextmanager
def fake_api_servers(config: ServerConfig | None = None, count: int = 2, wait_ready: bool = True,
                     **build_kwargs) -> Iterator[Servers]:
    sock = listening_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    supervisor = multiprocessing.get_context("spawn").Process(
        target=run_fake_api_servers, args=(count, sock, config or ServerConfig(), build_kwargs))
    supervisor.start()
    sock.close()
    try:
        assert wait_for(lambda: len(_spawned_children(supervisor.pid)) == count + 1 or not supervisor.is_alive(),
                        START_TIMEOUT_S)
        children = _spawned_children(supervisor.pid)
        api_pids = [pid for pid in children if port in tcp_ports(pid)[0]]
        core_pids = [pid for pid in children if pid not in api_pids]
        servers = Servers(f"http://127.0.0.1:{port}", port, supervisor, api_pids, core_pids[0] if core_pids else -1)
        if wait_ready:
            assert len(api_pids) == count, children
            assert wait_for(lambda: _all_ready(servers), START_TIMEOUT_S)
        yield servers
    finally:
        if supervisor.is_alive():
            os.kill(supervisor.pid, signal.SIGTERM)
            supervisor.join(60)
        if supervisor.is_alive():
            supervisor.kill()


def _all_ready(servers: Servers) -> bool:
    try:
        return all(resp.status_code == 200 for resp in _get_on_each(servers, "/health").values())
    except (httpx.TransportError, AssertionError):
        return False


def _metric(text: str, name: str, label: str = "") -> float:
    """The value of the first series `name` (with `label` in its labels) of a /metrics page."""
    for line in text.splitlines():
        if line.startswith(name + "{") and label in line:
            return float(line.split()[-1])
    raise AssertionError(f"no {name} {label} in /metrics")


def _stream(url: str, prompt: int, results: dict, ports: dict, started: threading.Event) -> None:
    """One streamed completion on its own connection; results[prompt]: its text and whether [DONE] came,
    or the transport error that ended it."""
    body = {"model": MODEL, "prompt": [prompt], "stream": True, **LONG}
    pieces: list[str] = []
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=60) as resp:
            ports[prompt] = _client_port(resp)
            for line in resp.iter_lines():
                started.set()
                if line == "data: [DONE]":
                    results[prompt] = ("".join(pieces), True)
                    return
                if line.startswith("data: "):
                    pieces.extend(c["text"] for c in json.loads(line.removeprefix("data: "))["choices"])
        results[prompt] = ("".join(pieces), False)
    except httpx.TransportError as error:
        results[prompt] = (repr(error), False)
    finally:
        started.set()


def _streams_on_every_process(servers: Servers) -> tuple[dict, dict, dict[int, list[int]], list[threading.Thread]]:
    """Start streams, each on its own connection, until every API process serves at least one."""
    results: dict = {}
    ports: dict = {}
    threads = []
    by_pid: dict[int, list[int]] = {pid: [] for pid in servers.api_pids}
    for prompt in range(1, MAX_TRIES):
        started = threading.Event()
        thread = threading.Thread(target=_stream, args=(servers.url, prompt, results, ports, started))
        thread.start()
        threads.append(thread)
        assert started.wait(30)
        pid = servers.served_by(ports[prompt]) if prompt in ports else None
        if pid is not None:
            by_pid[pid].append(prompt)
        if all(by_pid.values()):
            return results, ports, by_pid, threads
    raise AssertionError(f"streams reached only {by_pid}")


@pytest.fixture(scope="module")
def servers():
    with fake_api_servers(ServerConfig(api_keys=(KEY,), request_timeout_s=1.0), step_delay_s=0.01) as running:
        yield running


def test_many_streams_over_two_api_processes_each_get_their_own_tokens(servers):

    async def one(api: openai.AsyncOpenAI, prompt: int) -> str:
        chunks = await api.completions.create(model=MODEL, prompt=[prompt], max_tokens=12, stream=True)
        return "".join([c.choices[0].text async for c in chunks if c.choices])

    async def run_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{servers.url}/v1", api_key=KEY, max_retries=0, timeout=60) as api:
            return await asyncio.gather(*(one(api, i) for i in range(1, 33)))

    assert asyncio.run(run_all()) == [expected_text(i, 12) for i in range(1, 33)]


def test_every_api_process_reports_the_whole_servers_metrics(servers):
    for prompt in range(1, 7):  # each on a new connection: spread over both processes
        with httpx.Client(base_url=servers.url, timeout=30, headers=AUTH) as http:
            resp = http.post("/v1/completions", json={"prompt": [prompt], "max_tokens": 3})
            assert resp.json()["choices"][0]["text"] == expected_text(prompt, 3)
    finished = {}
    for pid, resp in _get_on_each(servers, "/metrics", headers=AUTH).items():
        finished[pid] = _metric(resp.text, "vllm:request_success_total", 'finished_reason="length"')
    # Both count the requests of both: the core's figures, sent to every API process.
    assert len(finished) == 2 and min(finished.values()) >= 6, finished


def test_keys_request_ids_and_timeouts_in_every_api_process(servers):
    for pid, resp in _get_on_each(servers, "/v1/models").items():
        assert_openai_error(resp, 401)
    answers = _get_on_each(servers, "/v1/models", headers={**AUTH, "X-Request-Id": "abc-1"})
    assert all(r.status_code == 200 and r.headers["x-request-id"] == "abc-1" for r in answers.values())
    resp = httpx.post(f"{servers.url}/v1/completions", json={"prompt": [1], **LONG}, headers=AUTH, timeout=30)
    assert assert_openai_error(resp, 408)["code"] == "request_timeout"


def test_a_client_disconnect_aborts_its_request_in_the_core(servers):
    def aborted() -> float:
        resp = httpx.get(f"{servers.url}/metrics", headers=AUTH, timeout=10)  # any process: the core's count
        return _metric(resp.text, "vllm:request_success_total", 'finished_reason="abort"')

    before = aborted()
    with httpx.Client(base_url=servers.url, timeout=30, headers=AUTH) as http:
        with http.stream("POST", "/v1/completions", json={"prompt": [1], "stream": True, **LONG}) as resp:
            next(resp.iter_lines())
    assert wait_for(lambda: aborted() == before + 1)


def test_the_queue_limit_counts_the_requests_of_every_api_process():
    config = ServerConfig(max_queue_len=0)
    with fake_api_servers(config, max_num_seqs=1, step_delay_s=0.01) as servers:
        results: dict = {}
        ports: dict = {}
        started = threading.Event()
        running = threading.Thread(target=_stream, args=(servers.url, 1, results, ports, started))
        running.start()
        assert started.wait(30)
        busy = servers.served_by(ports[1])
        other_answers = []
        for _ in range(MAX_TRIES):  # the process that holds no request must refuse as well
            with httpx.Client(base_url=servers.url, timeout=30) as http:
                resp = http.post("/v1/completions", json={"prompt": [9], "max_tokens": 2})
                if servers.served_by(_client_port(resp)) not in (busy, None):
                    other_answers.append(resp)
                    break
        running.join(60)
        assert other_answers and assert_openai_error(other_answers[0], 503)["code"] == "server_overloaded"


def test_a_killed_api_process_loses_only_its_own_requests():
    with fake_api_servers(ServerConfig(api_keys=(KEY,)), step_delay_s=0.01, max_num_seqs=32) as servers:
        results, _, by_pid, threads = _streams_on_every_process(servers)
        victim, survivor = servers.api_pids
        os.kill(victim, signal.SIGKILL)
        for thread in threads:
            thread.join(60)
        for prompt in by_pid[survivor]:
            assert results[prompt] == (expected_text(prompt, LONG["max_tokens"]), True), prompt
        assert all(not results[prompt][1] for prompt in by_pid[victim])
        # The core aborted the dead process's requests (ClientGone) instead of running them out.

        def aborted() -> float:
            resp = httpx.get(f"{servers.url}/metrics", headers=AUTH, timeout=10)
            return _metric(resp.text, "vllm:request_success_total", 'finished_reason="abort"')

        assert wait_for(lambda: aborted() == len(by_pid[victim]), 30)
        assert httpx.get(f"{servers.url}/health", timeout=10).status_code == 200  # the survivor serves on
        assert servers.supervisor.is_alive()


def test_sigterm_drains_every_api_process_then_stops_the_core():
    config = ServerConfig(api_keys=(KEY,), shutdown_timeout_s=120)
    with fake_api_servers(config, step_delay_s=0.01, max_num_seqs=32) as servers:
        results, _, by_pid, threads = _streams_on_every_process(servers)
        os.kill(servers.supervisor.pid, signal.SIGTERM)
        for thread in threads:
            thread.join(60)
        servers.supervisor.join(60)
        assert servers.supervisor.exitcode == 0
        assert all(results[p] == (expected_text(p, LONG["max_tokens"]), True) for p in results), results
        assert not any(is_running(pid) for pid in [*servers.api_pids, servers.core_pid])
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{servers.url}/health", timeout=5)


def test_a_killed_core_turns_every_api_process_to_503():
    with fake_api_servers(step_delay_s=0.01) as servers:
        os.kill(servers.core_pid, signal.SIGKILL)
        time.sleep(0.5)  # each API process polls the core's pid every 0.2 s
        answers = _get_on_each(servers, "/health")
        assert all(r.status_code == 503 and r.json()["phase"] == "failed" for r in answers.values())


def test_a_killed_supervisor_leaves_no_process_behind():
    with fake_api_servers(step_delay_s=0.01) as servers:
        os.kill(servers.supervisor.pid, signal.SIGKILL)
        left = [*servers.api_pids, servers.core_pid]
        assert wait_for(lambda: not any(is_running(pid) for pid in left), 60), [p for p in left if is_running(p)]


def test_a_core_that_cannot_start_ends_the_server_with_exit_code_2():
    with fake_api_servers(wait_ready=False, fail_with="config") as servers:
        servers.supervisor.join(START_TIMEOUT_S)
        assert servers.supervisor.exitcode == 2


def test_the_flag_is_checked(capsys):
    from fitserve.cli import main

    with pytest.raises(ConfigError, match="api-server-count"):
        ServerConfig(api_server_count=0)
    assert main(["serve", "--api-server-count", "2", "--no-engine-process"]) == 2
    assert "--no-engine-process" in capsys.readouterr().err
    assert main(["serve", "--api-server-count", "2", "--replicas", "2"]) == 2
    assert "--replicas" in capsys.readouterr().err
