"""GET /metrics: Prometheus text with vLLM's metric names, plus fitserve's capacity gauges.

Nothing is kept in prometheus-client's global registry: each app has its own registry with
one collector that, on every scrape, reads the engine's `stats()` (an EngineStats of
core/engine_stats.py: gauges, counters and the histogram snapshot of engine/metrics.py) and
writes them out. So existing vLLM dashboards read fitserve unchanged (labels `model_name` and
`engine`, as vLLM's), and several apps in one process (tests) never collide. Before the engine
has loaded, /metrics answers with no engine series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from fitserve.core.engine_stats import EngineStats, MetricsSnapshot
from fitserve.engine.client import EngineClient
from fitserve.engine.metrics import FINISH_REASONS
from fitserve.server.gpu_metrics import GpuCollector
from fitserve.telemetry import Telemetry

ENGINE_INDEX = "0"  # vLLM labels each engine core; fitserve runs one
LABELS = ["model_name", "engine"]
ADMISSION_CONTEXT_TOKENS = (512, 2048, 8192)  # plus --max-model-len: fitserve:num_requests_admissible

HISTOGRAM_HELP = {
    "time_to_first_token_seconds": "Histogram of time to first token in seconds.",
    "inter_token_latency_seconds": "Histogram of inter-token latency in seconds.",
    "e2e_request_latency_seconds": "Histogram of e2e request latency in seconds.",
    "request_queue_time_seconds": "Histogram of time spent in WAITING phase for request.",
    "request_prefill_time_seconds": "Histogram of time spent in PREFILL phase for request.",
    "request_decode_time_seconds": "Histogram of time spent in DECODE phase for request.",
    "request_prompt_tokens": "Number of prefill tokens processed.",
    "request_generation_tokens": "Number of generation tokens processed.",
    "iteration_tokens_total": "Histogram of number of tokens per engine_step.",
}


def _gauge(name: str, doc: str, labels: list[str], value: float, extra: list[str] | None = None) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=LABELS + (extra or []))
    family.add_metric(labels, value)
    return family


def _counter(name: str, doc: str, labels: list[str], value: float) -> Metric:
    family = CounterMetricFamily(name, doc, labels=LABELS)
    family.add_metric(labels, value)
    return family


def admissible_requests(stats: EngineStats, context_tokens: int) -> int:
    """Requests of `context_tokens` tokens that could start now: what the free KV blocks hold,
    at most the free --max-num-seqs slots, and none while requests wait in the queue."""
    if stats.num_requests_waiting:
        return 0
    blocks_each = -(-context_tokens // max(stats.block_size_tokens, 1))
    by_memory = stats.num_free_kv_blocks // blocks_each
    free_slots = stats.max_num_seqs - stats.num_requests_running
    return max(min(by_memory, free_slots), 0)


def _scheduler_families(stats: EngineStats, labels: list[str]) -> Iterator[Metric]:
    yield _gauge("vllm:num_requests_running", "Number of requests in model execution batches.", labels,
                 stats.num_requests_running)
    yield _gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels,
                 stats.num_requests_waiting)
    yield _gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels,
                 stats.kv_cache_used_fraction)
    yield _counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", labels,
                   stats.num_preemptions_total)


def _capacity_families(stats: EngineStats, labels: list[str]) -> Iterator[Metric]:
    yield _gauge("fitserve:kv_cache_free_tokens", "Tokens the free KV-cache blocks hold now.", labels,
                 stats.num_free_kv_tokens)
    yield _gauge("fitserve:kv_cache_capacity_tokens", "Tokens the whole KV cache holds.", labels,
                 stats.kv_capacity_tokens)
    contexts = sorted({*ADMISSION_CONTEXT_TOKENS, stats.max_model_len_tokens} - {0})
    family = GaugeMetricFamily(
        "fitserve:num_requests_admissible",
        "Requests of context_tokens tokens (prompt + output) that could start now without preempting anyone.",
        labels=LABELS + ["context_tokens"])
    for context in contexts:
        family.add_metric(labels + [str(context)], admissible_requests(stats, context))
    yield family


def _snapshot_families(snapshot: MetricsSnapshot, labels: list[str]) -> Iterator[Metric]:
    yield _counter("vllm:prompt_tokens", "Number of prefill tokens processed.", labels, snapshot.prompt_tokens_total)
    yield _counter("vllm:generation_tokens", "Number of generation tokens processed.", labels,
                   snapshot.generation_tokens_total)
    yield _counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                   labels, snapshot.prefix_cache.queries)
    yield _counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", labels,
                   snapshot.prefix_cache.hits)
    success = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                  labels=LABELS + ["finished_reason"])
    for reason in FINISH_REASONS:
        success.add_metric(labels + [reason], snapshot.finished_total.get(reason, 0))
    yield success
    for name, hist in snapshot.histograms.items():
        family = HistogramMetricFamily(f"vllm:{name}", HISTOGRAM_HELP.get(name, name), labels=LABELS)
        buckets = [("+Inf" if bound == float("inf") else repr(float(bound)), count) for bound, count in hist.cumulative()]
        family.add_metric(labels, buckets, sum_value=hist.sum)
        yield family
    if snapshot.cache_info:
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                 labels=[*snapshot.cache_info, "engine"])
        info.add_metric([*snapshot.cache_info.values(), ENGINE_INDEX], 1)
        yield info


class EngineCollector(Collector):
    """Reads the engine at scrape time; `get_engine` returns None until it has loaded."""

    def __init__(self, get_engine: Callable[[], EngineClient | None]) -> None:
        self.get_engine = get_engine

    def collect(self) -> Iterator[Metric]:
        engine = self.get_engine()
        if engine is None:
            return
        stats = engine.stats()
        labels = [engine.model_name, ENGINE_INDEX]
        yield from _scheduler_families(stats, labels)
        yield from _capacity_families(stats, labels)
        yield from _snapshot_families(stats.metrics, labels)


def build_registry(get_engine: Callable[[], EngineClient | None],
                   get_telemetry: Callable[[], Telemetry | None] = lambda: None) -> CollectorRegistry:
    """The engine's series, then the GPUs' (fitserve:gpu_*, server/gpu_metrics.py) once both are known."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(get_engine))

    def gpu_labels() -> list[str] | None:
        engine = get_engine()
        return None if engine is None else [engine.model_name, ENGINE_INDEX]

    registry.register(GpuCollector(get_telemetry, gpu_labels))
    return registry


def add_metrics_route(app: FastAPI) -> None:
    """GET /metrics over `app.state.engine` and `app.state.telemetry` (None until they exist)."""
    registry = build_registry(lambda: getattr(app.state, "engine", None),
                              lambda: getattr(app.state, "telemetry", None))

    @app.get("/metrics")
    async def metrics(_: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
