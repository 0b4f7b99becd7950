"""--engine-process on the tiny real model (dummy weights, CPU): built by startup.build_core in
the core process, the same greedy tokens, logprobs and text as the engine in this process; and
a real `fitserve serve --engine-process` that drains its streams on SIGTERM, then exits 0 with
its core process gone."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import httpx
import openai
import pytest
from core_fakes import wait_for
from proc_helpers import child_pids, is_running
from server_fixtures import FAKE_API_KEY, live_server
from test_shutdown import fitserve_process, refuses_new_connections, stream_completion, wait_for_phases
from tiny_model import tiny_engine_config, tiny_server, write_tiny_model

from fitserve.server.app import build_app
from fitserve.startup import start_serving_engine
from fitserve.telemetry import Telemetry

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    """(in-process client, split client, split engine client) on the same tiny model."""
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny"))
    split = start_serving_engine(tiny_engine_config(folder, engine_process=True, served_model_name="tiny"),
                                 Telemetry(interval_s=0, stats_interval_s=None), max_queue_len=None)
    try:
        with tiny_server(folder) as (in_url, _), live_server(build_app(split)) as split_url:
            with openai.OpenAI(base_url=f"{in_url}/v1", api_key=FAKE_API_KEY, max_retries=0, timeout=60) as one, \
                    openai.OpenAI(base_url=f"{split_url}/v1", api_key=FAKE_API_KEY, max_retries=0, timeout=60) as two:
                yield one, two, split
    finally:
        split.shutdown()


def test_the_split_serves_the_same_greedy_completion(clients):
    one, two, _ = clients
    fields = {"prompt": "hello", "max_tokens": 12, "temperature": 0, "logprobs": 2}
    here, there = one.completions.create(model="tiny", **fields), two.completions.create(model="tiny", **fields)
    assert there.choices[0].text == here.choices[0].text
    assert there.choices[0].logprobs.token_logprobs == pytest.approx(here.choices[0].logprobs.token_logprobs)
    assert there.usage == here.usage


def test_the_split_streams_the_same_chat(clients):
    one, two, _ = clients

    def streamed(client):
        chunks = client.chat.completions.create(model="tiny", messages=USER, max_tokens=10, temperature=0,
                                                stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    assert streamed(two) == streamed(one)


def test_the_core_reports_what_the_server_needs(clients):
    _, _, split = clients
    assert split.max_model_len == 256 and split.startup_info is not None and split.gpu_ids == []
    assert split.stats().num_kv_blocks == 128 and split.default_sampling_params == {}


def test_fitserve_serve_engine_process_drains_on_sigterm_and_stops_its_core(tmp_path):
    folder = write_tiny_model(tmp_path / "tiny")
    flags = ("--model", str(folder), "--load-format", "dummy", "--dtype", "float32", "--device", "cpu",
             "--num-gpu-blocks-override", "128", "--max-model-len", "256", "--engine-process")
    with fitserve_process(tmp_path, *flags) as (proc, url, log_path):
        wait_for_phases(url, proc, "ready")
        results: dict[int, object] = {}
        started = [threading.Event() for _ in range(3)]
        threads = [threading.Thread(target=stream_completion, args=(url, i, started[i], results)) for i in range(3)]
        for thread in threads:
            thread.start()
        assert all(event.wait(60) for event in started), results
        core_pid = int(log_path.read_text().split("The engine core runs in process ")[1].split(";")[0])
        proc.send_signal(signal.SIGTERM)
        assert refuses_new_connections(url)
        for thread in threads:
            thread.join(60)
        exit_code = proc.wait(60)
        log = log_path.read_text()
    assert exit_code == 0, log[-3000:]
    assert not is_running(core_pid), log[-3000:]
    for index in range(3):
        events = results[index]
        assert isinstance(events, list) and events[-1] == "[DONE]", (index, events, log[-3000:])
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def test_sigterm_while_the_core_loads_exits_0_and_leaves_no_core(tmp_path):
    folder = write_tiny_model(tmp_path / "tiny")
    flags = ("--model", str(folder), "--load-format", "dummy", "--dtype", "float32", "--device", "cpu",
             "--engine-process")
    with fitserve_process(tmp_path, *flags) as (proc, url, log_path):
        wait_for_phases(url, proc, "loading")
        assert wait_for(lambda: _core_pids(proc.pid), 120), log_path.read_text()[-3000:]  # the core is loading
        core_pids = _core_pids(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()[-3000:]
    # The API process joined its core before it exited (multiprocessing's exit handler); only the
    # resource tracker, which leaves once it reads the end of its pipe, may outlive it a moment.
    assert not any(is_running(pid) for pid in core_pids)


def _core_pids(parent_pid: int) -> list[int]:
    return [pid for pid in child_pids(parent_pid) if b"spawn_main" in _cmdline(pid)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_fitserve_serve_with_two_api_processes_serves_and_drains(tmp_path):
    folder = write_tiny_model(tmp_path / "tiny")
    flags = ("--model", str(folder), "--load-format", "dummy", "--dtype", "float32", "--device", "cpu",
             "--num-gpu-blocks-override", "128", "--max-model-len", "256", "--api-server-count", "2",
             "--served-model-name", "tiny")
    with fitserve_process(tmp_path, *flags) as (proc, url, log_path):
        wait_for_phases(url, proc, "ready")
        # both API processes ready: ten new connections in a row answered 200
        assert wait_for(lambda: all(httpx.get(f"{url}/health", timeout=5).status_code == 200 for _ in range(10)),
                        120), log_path.read_text()[-3000:]
        with openai.OpenAI(base_url=f"{url}/v1", api_key=FAKE_API_KEY, max_retries=0, timeout=60) as api:
            texts = {api.completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=0).choices[0].text
                     for _ in range(4)}
        assert len(texts) == 1  # the same greedy text from either process
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny"} 4.0' in metrics
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(60)
        log = log_path.read_text()
    assert exit_code == 0, log[-3000:]
    assert "2 API processes" in log
    core_pid = int(log.split("the engine core is process ")[1].split(".")[0])
    assert not is_running(core_pid), log[-3000:]
