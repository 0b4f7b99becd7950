"""fitserve bench against a live server: the real AsyncEngine + LLMEngine + scheduler with a
fake runner that takes STEP_S per step, so timings are small but ordered like real ones."""

from __future__ import annotations

import json
import time

import pytest
from fake_engine import FakeTokenizer
from fastapi.responses import PlainTextResponse
from server_fixtures import live_server

from fitserve.bench.benchmark import run_benchmark
from fitserve.bench.client import RequestSettings
from fitserve.bench.driver import RunOptions
from fitserve.bench.workloads import build_requests, resolve_workload
from fitserve.cli import main
from fitserve.core.scheduler import SchedulerLimits
from fitserve.engine.async_engine import AsyncEngine
from fitserve.engine.llm_engine import EngineLimits, LLMEngine
from fitserve.server.app import build_app
from fitserve.testing import FakeDecoder, FakeRunner

VOCAB_SIZE = 1000
MAX_MODEL_LEN = 512
MODEL = "fake-bench"
STEP_S = 0.002  # per engine step: W5's long request outlives the short ones by hundreds of steps


class SteppedFakeRunner(FakeRunner):
    def execute(self, scheduler_output):
        time.sleep(STEP_S)
        return super().execute(scheduler_output)


@pytest.fixture(scope="module")
def engine():
    runner = SteppedFakeRunner(num_blocks=1024, block_size=4, vocab_size=VOCAB_SIZE)
    limits = EngineLimits(VOCAB_SIZE, (VOCAB_SIZE - 1,), SchedulerLimits(32, 1024, MAX_MODEL_LEN))
    engine = AsyncEngine(LLMEngine(runner, FakeDecoder(), limits), MODEL, FakeTokenizer()).start()
    yield engine
    engine.shutdown()


def with_metrics_route(app, metrics_text=None):
    """`app` with /metrics replaced: None answers 404 (a server without metrics), else a
    function returning the Prometheus text of each scrape."""
    async def asgi(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/metrics":
            response = (PlainTextResponse("Not Found", status_code=404) if metrics_text is None
                        else PlainTextResponse(metrics_text()))
            await response(scope, receive, send)
            return
        await app(scope, receive, send)
    return asgi


@pytest.fixture(scope="module")
def url(engine):
    with live_server(with_metrics_route(build_app(engine))) as url:
        yield url


def bench(url: str, workload, *, chat: bool = False, ready_timeout_s: float = 10.0, **kwargs):
    settings = RequestSettings(url, "/v1/chat/completions" if chat else "/v1/completions", model="")
    options = RunOptions(vocab_size=VOCAB_SIZE, ready_timeout_s=ready_timeout_s, progress=False)
    return run_benchmark(workload, settings, options, **kwargs)


def test_token_counts_add_up(url):
    workload = resolve_workload("custom", num_prompts=24, max_concurrency=4, input_len=40, output_len=10,
                                range_ratio=0.5)
    specs = build_requests(workload, seed=0, vocab_size=VOCAB_SIZE)
    out = bench(url, workload)
    r = out.result
    assert (r["completed"], r["failed"], r["errors"]) == (24, 0, {})
    assert r["total_input_tokens"] == sum(s.prompt_len for s in specs)
    assert r["total_output_tokens"] == sum(s.output_len for s in specs)
    assert r["model"] == MODEL and r["max_concurrent_requests"] <= 4
    assert r["output_throughput"] == pytest.approx(r["total_output_tokens"] / r["duration"])
    assert 0 < r["median_ttft_ms"] <= r["p99_ttft_ms"] and r["mean_itl_ms"] > 0 and r["mean_tpot_ms"] > 0
    assert r["server_metrics"]["available"] is False  # this server has no /metrics


def test_failed_requests_are_counted(url):
    workload = resolve_workload("custom", num_prompts=30, input_len=400, output_len=100, range_ratio=0.5)
    specs = build_requests(workload, seed=0, vocab_size=VOCAB_SIZE)
    too_long = [s for s in specs if s.prompt_len + s.output_len > MAX_MODEL_LEN]
    assert 0 < len(too_long) < len(specs)
    r = bench(url, workload, ready_timeout_s=0).result
    assert (r["completed"], r["failed"]) == (len(specs) - len(too_long), len(too_long))
    assert r["total_input_tokens"] == sum(s.prompt_len for s in specs if s not in too_long)
    assert sum(r["errors"].values()) == len(too_long) and all(e.startswith("HTTP 400") for e in r["errors"])


def test_w5_short_requests_finish_while_the_long_one_streams(url):
    workload = resolve_workload("W5", input_len=16, output_len=300)
    w5 = bench(url, workload).result["interference"]
    assert w5["long_success"] and w5["long_output_tokens"] == 300
    assert w5["num_short_completed"] == 20 and w5["num_short_done_before_long"] == 20
    assert w5["p99_short_e2el_ms"] < w5["long_e2el_ms"]


def test_chat_backend_counts_the_servers_prompt_tokens(url):
    workload = resolve_workload("custom", num_prompts=4, input_len=6, output_len=5)
    r = bench(url, workload, chat=True).result
    assert (r["completed"], r["total_output_tokens"]) == (4, 20)
    assert r["total_input_tokens"] > 4 * 6  # the fake chat template adds its own tokens
    assert r["vocab_size"] is None and r["endpoint"] == "/v1/chat/completions"


def test_server_metrics_are_scraped_when_present(engine):
    scrapes = []

    def metrics_text() -> str:
        scrapes.append(1)
        n = len(scrapes)
        return (f"vllm:num_preemptions_total {2 * n}\nvllm:kv_cache_usage_perc {min(n, 4) / 10}\n"
                f"vllm:num_requests_waiting {n % 3}\n")

    with live_server(with_metrics_route(build_app(engine), metrics_text)) as url:
        r = bench(url, resolve_workload("custom", num_prompts=4, input_len=8, output_len=4)).result
    server = r["server_metrics"]
    assert server["available"] and server["num_samples"] == len(scrapes) >= 2
    assert server["num_preemptions"] == 2 * (len(scrapes) - 1)
    assert server["peak_kv_cache_usage_pct"] == pytest.approx(10 * min(len(scrapes), 4))
    assert server["peak_num_requests_waiting"] == max(n % 3 for n in range(1, len(scrapes) + 1))


def test_shared_prefix_workload_reports_the_servers_prefix_cache_hits(engine):
    workload = resolve_workload("shared-prefix", num_prompts=12, max_concurrency=4, prefix_len=40, input_len=8,
                                output_len=4)
    with live_server(build_app(engine)) as url:  # the real /metrics
        out = bench(url, workload)
    r, server = out.result, out.result["server_metrics"]
    assert r["completed"] == 12 and r["total_input_tokens"] == 12 * 48
    assert server["prefix_cache_queries"] == 12 * 48, "every prompt is looked up once"
    # the ready check cached the 40 shared tokens (10 blocks of 4): every request finds them
    assert server["prefix_cache_hits"] >= 12 * 40
    assert server["prefix_cache_hit_rate_pct"] == pytest.approx(100.0 * server["prefix_cache_hits"] / (12 * 48))
    assert "Prefix cache hit rate (%):" in out.table()


def test_the_report_sets_the_servers_ttft_beside_the_clients(engine):
    """The server's histograms (vllm:time_to_first_token_seconds and its parts, queue and prefill) give
    their means over the run: what HTTP and the client add is the client's mean TTFT less the server's."""
    workload = resolve_workload("custom", num_prompts=12, max_concurrency=12, input_len=16, output_len=4)
    with live_server(build_app(engine)) as url:  # the real /metrics
        out = bench(url, workload)
    r, server = out.result, out.result["server_metrics"]
    assert r["completed"] == 12
    ttft, queue, prefill = (server[k] for k in ("mean_server_ttft_ms", "mean_queue_time_ms", "mean_prefill_time_ms"))
    assert queue + prefill == pytest.approx(ttft, rel=1e-6), "each request's TTFT is its queue plus its prefill"
    assert prefill >= 1000 * STEP_S, "a first token takes at least one step"
    assert 0 < ttft <= r["mean_ttft_ms"], "the server's first token comes before the client has it"
    assert "Server mean TTFT (ms):" in out.table()


def test_cli_saves_the_result_with_its_provenance(url, tmp_path, capsys):
    path = tmp_path / "w1.json"
    rc = main(["bench", "--base-url", f"{url}/v1/", "--workload", "W1", "--num-prompts", "6", "--max-concurrency",
               "3", "--input-len", "12", "--output-len", "4", "--vocab-size", str(VOCAB_SIZE), "--disable-tqdm",
               "--metric-percentiles", "50,95", "--save-result", str(path), "--metadata", "machine_load=idle",
               "--goodput", "ttft:60000", "e2el:60000", "--num-warmups", "2"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "Successful requests:                     6" in table and "P95 TTFT (ms):" in table
    r = json.loads(path.read_text())
    for key in ("command_line", "commit", "dirty", "machine", "server_version", "load_average_before",
                "request_throughput", "output_throughput", "total_token_throughput", "p95_ttft_ms", "p50_itl_ms",
                "mean_e2el_ms", "p95_e2el_ms", "server_metrics"):
        assert key in r, key
    assert r["workload"]["name"] == "W1" and r["workload"]["max_concurrency"] == 3
    assert r["metadata"] == {"machine_load": "idle"} and r["machine"]["num_cpus"] >= 1
    assert r["server_version"]["version"] and r["base_url"] == url
    assert r["request_goodput"] == pytest.approx(r["request_throughput"]) and r["num_warmups"] == 2
    assert "Request goodput (req/s):" in table


def test_cli_user_errors_exit_2(url, capsys):
    assert main(["bench", "--base-url", url, "--model", "no-such-model", "--num-prompts", "1", "--input-len", "4",
                 "--vocab-size", str(VOCAB_SIZE), "--disable-tqdm"]) == 2
    assert "initial test request" in capsys.readouterr().err
    assert main(["bench", "--base-url", url, "--workload", "W9"]) == 2
    assert main(["bench", "--base-url", url, "--goodput", "latency:5"]) == 2
    assert main(["bench", "--base-url", "http://127.0.0.1:9", "--model", "m", "--ready-check-timeout-sec",
                 "0.2", "--disable-tqdm"]) == 2
    assert "ConnectError" in capsys.readouterr().err


def test_two_client_processes_send_every_request_once_in_order(url):
    workload = resolve_workload("custom", num_prompts=24, max_concurrency=4, input_len=40, output_len=10,
                                range_ratio=0.5)
    specs = build_requests(workload, seed=0, vocab_size=VOCAB_SIZE)
    settings = RequestSettings(url, "/v1/completions", model="")
    options = RunOptions(vocab_size=VOCAB_SIZE, ready_timeout_s=10.0, progress=False, client_processes=2)
    out = run_benchmark(workload, settings, options, save_detailed=True)
    r = out.result
    assert (r["completed"], r["failed"], r["client_processes"]) == (24, 0, 2)
    assert [q["input_len"] for q in r["requests"]] == [s.prompt_len for s in specs]  # merged in workload order
    assert r["total_output_tokens"] == sum(s.output_len for s in specs) and r["max_concurrent_requests"] <= 4
    cpu = r["client_cpu"]
    assert cpu["num_processes"] == 2 and [p["process"] for p in cpu["processes"]] == [0, 1]
    assert all(p["cpu_s"] > 0 and p["wall_s"] > 0 for p in cpu["processes"])
    assert "Client processes:                        2" in out.table()


def test_one_client_process_reports_its_cpu_use(url):
    out = bench(url, resolve_workload("custom", num_prompts=4, input_len=8, output_len=4))
    cpu = out.result["client_cpu"]
    assert cpu["num_processes"] == 1 and cpu["processes"][0]["cpu_s"] > 0
    assert cpu["max_core_fraction"] == cpu["processes"][0]["core_fraction"]
    assert "Busiest client CPU (% of a core):" in out.table()


def test_client_processes_split_requests_and_concurrency():
    from fitserve.bench.client_processes import concurrency_share, split_requests

    workload = resolve_workload("custom", num_prompts=10, input_len=4, output_len=2)
    specs = build_requests(workload, seed=0, vocab_size=VOCAB_SIZE)
    shares = split_requests(specs, [0.1 * i for i in range(10)], 8, 3)
    assert [[s.index for s in share.specs] for share in shares] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert shares[1].offsets_s == pytest.approx((0.1, 0.4, 0.7))
    assert [share.max_concurrency for share in shares] == [3, 3, 2]
    assert concurrency_share(None, 3, 0) is None


def test_a_busy_client_draws_a_warning():
    from fitserve.bench.client_processes import ClientCpu, client_bound_warning, client_cpu_summary

    busy = client_cpu_summary([ClientCpu(0, 0.3, 1.0), ClientCpu(1, 0.9, 1.0)])
    assert busy["client_bound"] and busy["max_core_fraction"] == pytest.approx(0.9)
    assert "90% of a CPU core" in client_bound_warning(busy)
    assert client_bound_warning(client_cpu_summary([ClientCpu(0, 0.5, 1.0)])) is None


def test_client_processes_user_errors_exit_2(url, capsys):
    assert main(["bench", "--base-url", url, "--client-processes", "0", "--disable-tqdm"]) == 2
    assert main(["bench", "--base-url", url, "--workload", "W5", "--client-processes", "2", "--disable-tqdm"]) == 2
    assert "--client-processes" in capsys.readouterr().err
    assert main(["bench", "--base-url", url, "--max-concurrency", "2", "--client-processes", "4",
                 "--disable-tqdm"]) == 2
