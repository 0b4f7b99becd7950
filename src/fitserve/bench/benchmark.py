"""One benchmark run end to end: the workload against a server, then the result document."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from fitserve.bench.client import BenchError, RequestSettings, first_model_name, make_http_client
from fitserve.bench.client_processes import client_bound_warning, client_cpu_summary
from fitserve.bench.driver import RunOptions, RunResult, run_workload
from fitserve.bench.report import device_name, format_table, load_average, provenance
from fitserve.bench.stats import (
    DEFAULT_PERCENTILES,
    BenchmarkMetrics,
    compute_metrics,
    error_counts,
    interference_summary,
)
from fitserve.bench.workloads import Workload


@dataclass(frozen=True, slots=True)
class BenchmarkOutput:
    result: dict                  # the JSON document (--save-result)
    metrics: BenchmarkMetrics

    def table(self) -> str:
        latencies = {name: getattr(self.metrics, name) for name in BenchmarkMetrics.LATENCIES}
        table = format_table(self.result, latencies)
        warning = client_bound_warning(self.result.get("client_cpu") or {})
        return table if warning is None else f"{table}\n{warning}"


def normalize_base_url(url: str) -> str:
    """http://host:port from what a user may paste: a trailing slash or /v1 is dropped."""
    url = url.rstrip("/")
    return url.removesuffix("/v1") if url.endswith("/v1") else url


async def resolve_model(settings: RequestSettings) -> RequestSettings:
    if settings.model:
        return settings
    async with make_http_client(30.0) as http:
        model = await first_model_name(http, settings)
    return RequestSettings(settings.base_url, settings.endpoint, model, settings.ignore_eos,
                           settings.temperature, settings.api_key, settings.extra_body)


def build_result(workload: Workload, settings: RequestSettings, options: RunOptions, run: RunResult,
                 metrics: BenchmarkMetrics, percentiles: Sequence[float], *, argv: list[str] | None,
                 metadata: dict, load_before: list[float] | None, save_detailed: bool) -> dict:
    result = provenance(argv)
    result.update(
        base_url=settings.base_url, endpoint=settings.endpoint, model=settings.model,
        ignore_eos=settings.ignore_eos, temperature=settings.temperature, seed=options.seed,
        num_warmups=options.num_warmups, client_processes=options.client_processes,
        vocab_size=None if settings.chat else options.vocab_size,
        workload=workload.to_json(), metric_percentiles=list(percentiles), metadata=metadata,
        server_version=run.server_version, device_name=device_name(run.server_version),
        load_average_before=load_before, load_average_after=load_average(),
    )
    result.update(metrics.flat())
    result.update(run.server_metrics.energy_figures(metrics.total_output_tokens))  # docs/telemetry.md
    result["server_metrics"] = run.server_metrics.to_json()
    result["interference"] = interference_summary(run.outcomes, percentiles) if workload.interference else None
    result["errors"] = error_counts(run.outcomes)
    result["client_cpu"] = client_cpu_summary(run.client_cpu)  # bench/client_processes.py
    if save_detailed:
        result["requests"] = [
            {"role": o.role, "success": o.success, "error": o.error, "input_len": o.prompt_len,
             "output_len": o.output_tokens, "ttft_s": o.ttft_s, "latency_s": o.latency_s, "itl_s": o.itl_s}
            for o in run.outcomes
        ]
    return result


async def run_benchmark_async(workload: Workload, settings: RequestSettings, options: RunOptions, *,
                              percentiles: Sequence[float] = DEFAULT_PERCENTILES, argv: list[str] | None = None,
                              metadata: dict | None = None, save_detailed: bool = False,
                              goodput_slos_ms: dict[str, float] | None = None) -> BenchmarkOutput:
    settings = await resolve_model(settings)
    load_before = load_average()
    run = await run_workload(workload, settings, options)
    metrics = compute_metrics(run.outcomes, run.duration_s, percentiles, goodput_slos_ms)
    result = build_result(workload, settings, options, run, metrics, percentiles, argv=argv,
                          metadata=metadata or {}, load_before=load_before, save_detailed=save_detailed)
    result["goodput_slos_ms"] = goodput_slos_ms or None
    return BenchmarkOutput(result, metrics)


def run_benchmark(workload: Workload, settings: RequestSettings, options: RunOptions,
                  **kwargs) -> BenchmarkOutput:
    """Synchronous entry point (the CLI, the sweep, tests); raises BenchError for user errors."""
    if not settings.base_url.startswith(("http://", "https://")):
        raise BenchError(f"--base-url must start with http:// or https://, not {settings.base_url!r}")
    return asyncio.run(run_benchmark_async(workload, settings, options, **kwargs))
