"""fitserve:gpu_* on /metrics with a fake NVML, and energy in `fitserve bench` and `fitserve sweep`
(joules per output token from the server's counter deltas, or from its power samples)."""

from __future__ import annotations

import time

import pytest
from fake_engine import FakeEngine, FakeTokenizer
from fake_nvml import FakeGpu, FakeNvml
from fastapi.responses import PlainTextResponse
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import live_server
from starlette.testclient import TestClient

from fitserve.bench.benchmark import run_benchmark
from fitserve.bench.client import RequestSettings
from fitserve.bench.driver import RunOptions
from fitserve.bench.server_metrics import ServerMetricsSummary, integrate_power
from fitserve.bench.sweep import parse_grid
from fitserve.bench.sweep_report import markdown_table, plot_sweep
from fitserve.bench.workloads import resolve_workload
from fitserve.core.scheduler import SchedulerLimits
from fitserve.engine.async_engine import AsyncEngine
from fitserve.engine.llm_engine import EngineLimits, LLMEngine
from fitserve.server.app import build_app
from fitserve.telemetry import Telemetry
from fitserve.testing import FakeDecoder, FakeRunner

UUID = "GPU-00000000-1111-2222-3333-444444444444"
VOCAB_SIZE = 1000
JOULES_PER_READ = 10.0  # the fake card's energy counter advances this much at every read


def started_telemetry(nvml: FakeNvml) -> Telemetry:
    """Sampled once at start; the next tick is a minute away, so a test sees fixed readings."""
    return Telemetry(nvml_loader=lambda: nvml, interval_s=60.0, stats_interval_s=None).start(None, [UUID])


def app_with(engine, telemetry: Telemetry):
    """The app as `fitserve serve` builds it (server/launcher.py): telemetry on app.state."""
    app = build_app(engine)
    app.state.telemetry = telemetry
    return app


def scrape(app) -> dict[str, list]:
    with TestClient(app) as client:
        text = client.get("/metrics").text
    return {f.name: f.samples for f in text_string_to_metric_families(text) if f.name.startswith("fitserve:gpu")}


def value(samples: list, **labels) -> float:
    (match,) = [s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items())]
    return match


def test_gpu_series_names_labels_and_values():
    gpu = FakeGpu(power_mw=412_500, temperature_c=71, sm_mhz=1755, util_gpu=97, reasons=("sw_power_cap",))
    nvml = FakeNvml([FakeGpu(uuid="GPU-other"), gpu])  # the server uses NVML's GPU 1
    telemetry = started_telemetry(nvml)
    try:
        families = scrape(app_with(FakeEngine(model_name="m"), telemetry))
    finally:
        telemetry.stop()
    (info,) = families["fitserve:gpu_info"]
    assert info.labels == {"model_name": "m", "engine": "0", "gpu": "1", "name": "NVIDIA Fake 80GB", "uuid": UUID,
                           "energy_source": "counter"}
    assert value(families["fitserve:gpu_power_watts"], gpu="1") == 412.5
    assert value(families["fitserve:gpu_power_limit_watts"]) == 700.0
    assert value(families["fitserve:gpu_temperature_celsius"]) == 71
    assert value(families["fitserve:gpu_slowdown_temperature_celsius"]) == 87
    assert value(families["fitserve:gpu_sm_clock_mhz"]) == 1755 and value(families["fitserve:gpu_sm_clock_max_mhz"]) == 1980
    assert value(families["fitserve:gpu_memory_clock_mhz"]) == 2619
    assert value(families["fitserve:gpu_utilization_percent"]) == 97
    assert value(families["fitserve:gpu_memory_busy_percent"]) == 0
    assert value(families["fitserve:gpu_memory_used_bytes"]) == 70 * 2**30
    assert value(families["fitserve:gpu_memory_total_bytes"]) == 80 * 2**30
    assert value(families["fitserve:gpu_energy_joules"], gpu="1") == 0.0  # counts from the start of sampling
    assert value(families["fitserve:gpu_throttle_active"], reason="sw_power_cap") == 1
    assert value(families["fitserve:gpu_throttle_active"], reason="gpu_idle") == 0
    assert {s.labels["reason"] for s in families["fitserve:gpu_throttle_seconds"]} >= {"sw_power_cap", "hw_slowdown"}


def test_a_card_without_a_reading_has_no_series_for_it():
    nvml = FakeNvml([FakeGpu(unsupported={"nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetPowerUsage",
                                          "nvmlDeviceGetCurrentClocksEventReasons"})])
    telemetry = started_telemetry(nvml)
    try:
        families = scrape(app_with(FakeEngine(), telemetry))
    finally:
        telemetry.stop()
    assert "fitserve:gpu_power_watts" not in families and "fitserve:gpu_energy_joules" not in families
    assert "fitserve:gpu_throttle_active" not in families
    assert families["fitserve:gpu_info"][0].labels["energy_source"] == "none"
    assert value(families["fitserve:gpu_temperature_celsius"]) == 35


def test_no_gpu_series_without_telemetry_or_before_the_engine():
    assert scrape(build_app(FakeEngine())) == {}
    telemetry = started_telemetry(FakeNvml())
    try:
        assert scrape(app_with(None, telemetry)) == {}  # the engine is still loading
    finally:
        telemetry.stop()


# -- fitserve bench ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    runner = FakeRunner(num_blocks=1024, block_size=4, vocab_size=VOCAB_SIZE)
    limits = EngineLimits(VOCAB_SIZE, (VOCAB_SIZE - 1,), SchedulerLimits(32, 1024, 512))
    engine = AsyncEngine(LLMEngine(runner, FakeDecoder(), limits), "fake-energy", FakeTokenizer()).start()
    yield engine
    engine.shutdown()


def bench(url: str, num_prompts: int = 8):
    workload = resolve_workload("custom", num_prompts=num_prompts, max_concurrency=4, input_len=16, output_len=8)
    settings = RequestSettings(url, "/v1/completions", model="")
    return run_benchmark(workload, settings, RunOptions(vocab_size=VOCAB_SIZE, ready_timeout_s=10.0, progress=False))


def test_bench_reports_joules_per_token_from_the_energy_counter(engine):
    nvml = FakeNvml([FakeGpu(power_mw=300_000, energy_step_mj=int(JOULES_PER_READ * 1000))])
    telemetry = started_telemetry(nvml)
    try:
        with live_server(app_with(engine, telemetry)) as url:
            out = bench(url)
    finally:
        telemetry.stop()
    r, server = out.result, out.result["server_metrics"]
    assert server["energy_source"] == "counter" and server["num_samples"] >= 2
    assert r["energy_j"] == pytest.approx(JOULES_PER_READ * (server["num_samples"] - 1))  # one read per scrape
    assert r["total_output_tokens"] == 8 * 8
    assert r["joules_per_output_token"] == pytest.approx(r["energy_j"] / 64)
    assert r["output_tokens_per_joule"] == pytest.approx(64 / r["energy_j"])
    assert r["mean_power_w"] == pytest.approx(r["energy_j"] / server["energy_window_s"])
    assert server["power_before_w"] == server["peak_power_w"] == 300.0
    table = out.table()
    assert "GPU energy (server /metrics)" in table and "Energy, from the counter (J):" in table
    assert f"{r['joules_per_output_token']:.4g}" in table


def with_metrics(app, metrics_text):
    async def asgi(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/metrics":
            await PlainTextResponse(metrics_text())(scope, receive, send)
            return
        await app(scope, receive, send)
    return asgi


def test_without_a_counter_bench_integrates_the_power_samples(engine):
    scrapes = []

    def metrics_text() -> str:
        scrapes.append(time.perf_counter())
        return f'fitserve:gpu_power_watts{{gpu="0"}} 200\nfitserve:gpu_power_watts{{gpu="1"}} {100 + len(scrapes)}\n'

    with live_server(with_metrics(build_app(engine), metrics_text)) as url:
        r = bench(url).result
    server = r["server_metrics"]
    assert server["energy_source"] == "power_samples" and server["power_before_w"] == 301.0  # both GPUs
    assert r["energy_j"] > 0 and r["mean_power_w"] == pytest.approx(r["energy_j"] / server["energy_window_s"])
    assert 301.0 <= r["mean_power_w"] <= 300.0 + len(scrapes)


def test_energy_figures_and_the_power_integral():
    assert integrate_power([(0.0, 100.0)]) is None
    assert integrate_power([(0.0, 100.0), (2.0, 300.0), (3.0, 300.0)]) == pytest.approx(700.0)
    summary = ServerMetricsSummary(available=True, energy_j=500.0, energy_window_s=2.0)
    assert summary.energy_figures(1000) == {"energy_j": 500.0, "mean_power_w": 250.0,
                                            "joules_per_output_token": 0.5, "output_tokens_per_joule": 2.0}
    assert set(ServerMetricsSummary(available=False).energy_figures(10).values()) == {None}


# -- fitserve sweep -----------------------------------------------------------------------------


def sweep_row(index: int, seqs: str, req_s: float, energy_j: float | None) -> dict:
    result = {"request_throughput": req_s, "output_throughput": req_s * 128, "mean_ttft_ms": 10.0, "p99_ttft_ms": 20.0,
              "mean_e2el_ms": 100.0, "p99_e2el_ms": 200.0, "completed": 20, "failed": 0, "energy_j": energy_j,
              "mean_power_w": None if energy_j is None else energy_j / 10, "joules_per_output_token":
              None if energy_j is None else energy_j / 2560, "server_metrics": {"available": True}}
    return {"index": index, "params": {"max_num_seqs": seqs}, "label": f"max_num_seqs={seqs}", "kv_cache_tokens": None,
            "startup_s": 5.0, "status": "ok", "exit_code": None, "error": "", "result": result}


def test_sweep_table_and_plots_include_energy(tmp_path):
    axes = parse_grid(["max_num_seqs=1,4"])
    workload = resolve_workload("W1", num_prompts=20, max_concurrency=16)
    rows = [sweep_row(0, "1", 1.0, 3200.0), sweep_row(1, "4", 2.0, 2560.0)]
    table = markdown_table(rows, axes, workload).splitlines()
    assert "| Mean power (W) | J / output token | Result | Observation |" in table[0]
    assert table[3].endswith("| 256 | 1.0000 | ok | best |")
    assert plot_sweep(rows, axes, workload, tmp_path)[-1] == "sweep-energy.png"
    assert (tmp_path / "sweep-energy.png").read_bytes()[:4] == b"\x89PNG"
    no_energy = [sweep_row(0, "1", 1.0, None)]
    assert "Mean power" not in markdown_table(no_energy, axes, workload)
