"""What the engine counts for /metrics: tokens, finished requests, and per-request timings
(torch-free, and free of any metrics library).

The engine thread records into `EngineMetrics` as it steps (one lock, taken a few times per
step); `snapshot()` is a frozen copy (core/engine_stats.py's MetricsSnapshot) that travels in
the engine's `stats()` to server/metrics.py, which writes it as Prometheus text under vLLM's
names. Timings follow vLLM's definitions: queue time from arrival to the first step that
schedules the request, time to first token from arrival, inter-token latency between
consecutive tokens of a request, end-to-end from arrival to the last token (or the abort).
Prompt tokens are counted when the prompt has been processed (the first token), so a request
aborted in the queue adds none.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, replace

from fitserve.core.engine_stats import HistogramSnapshot, MetricsSnapshot
from fitserve.core.kv_cache_manager import PrefixCacheStats
from fitserve.core.outputs import SchedulerOutput
from fitserve.request import Request

# vLLM's bucket bounds, so dashboards built for it read fitserve the same way.
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                  10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                         10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                             60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
FINISH_REASONS = ("stop", "length", "abort")


def one_two_five_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    bounds: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(bounds)
            bounds.append(mantissa * scale)
        scale *= 10


class Histogram:
    def __init__(self, upper_bounds: tuple[float, ...]) -> None:
        self.upper_bounds = tuple(upper_bounds)
        self._counts = [0] * (len(self.upper_bounds) + 1)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self.upper_bounds, value)] += 1  # `le`: a value on a bound is in it
        self._sum += value
        self._count += 1

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.upper_bounds, tuple(self._counts), self._sum, self._count)


@dataclass(slots=True)
class _RequestTimes:
    arrival_s: float
    scheduled_s: float | None = None  # first step that scheduled it
    first_token_s: float | None = None
    last_token_s: float | None = None


class EngineMetrics:
    def __init__(self, max_model_len: int, cache_info: dict[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.cache_info = dict(cache_info or {})
        self._lock = threading.Lock()
        self._requests: dict[str, _RequestTimes] = {}
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._finished_total = dict.fromkeys(FINISH_REASONS, 0)
        self._prefix_cache = PrefixCacheStats()
        token_buckets = one_two_five_buckets(max_model_len)
        self._histograms = {
            "time_to_first_token_seconds": Histogram(TTFT_BUCKETS_S),
            "inter_token_latency_seconds": Histogram(INTER_TOKEN_BUCKETS_S),
            "e2e_request_latency_seconds": Histogram(REQUEST_LATENCY_BUCKETS_S),
            "request_queue_time_seconds": Histogram(REQUEST_LATENCY_BUCKETS_S),
            "request_prefill_time_seconds": Histogram(REQUEST_LATENCY_BUCKETS_S),
            "request_decode_time_seconds": Histogram(REQUEST_LATENCY_BUCKETS_S),
            "request_prompt_tokens": Histogram(token_buckets),
            "request_generation_tokens": Histogram(token_buckets),
            "iteration_tokens_total": Histogram(ITERATION_TOKENS_BUCKETS),
        }

    @property
    def prompt_tokens_total(self) -> int:
        """Prompt tokens of requests that produced a first token (vLLM's prompt_tokens_total)."""
        return self._prompt_tokens_total

    @property
    def generation_tokens_total(self) -> int:
        return self._generation_tokens_total

    @property
    def num_tracked_requests(self) -> int:
        return len(self._requests)

    def request_added(self, request: Request) -> None:
        with self._lock:
            self._requests[request.request_id] = _RequestTimes(arrival_s=request.arrival_time_s)

    def step_scheduled(self, scheduler_output: SchedulerOutput, now_s: float) -> None:
        with self._lock:
            if scheduler_output.scheduled:
                self._histograms["iteration_tokens_total"].observe(scheduler_output.num_batched_tokens)
            for chunk in scheduler_output.scheduled:
                times = self._requests.get(chunk.request_id)
                if times is not None and times.scheduled_s is None:
                    times.scheduled_s = now_s
                    self._histograms["request_queue_time_seconds"].observe(now_s - times.arrival_s)

    def prefix_cache_queried(self, stats: PrefixCacheStats) -> None:
        """Add one step's prefix-cache lookups (the scheduler's admissions)."""
        if not (stats.queries or stats.preempted_queries):
            return
        with self._lock:
            total = self._prefix_cache
            total.queries += stats.queries
            total.hits += stats.hits
            total.preempted_queries += stats.preempted_queries
            total.preempted_hits += stats.preempted_hits

    def token_sampled(self, request: Request, now_s: float) -> None:
        with self._lock:
            self._generation_tokens_total += 1
            times = self._requests.get(request.request_id)
            if times is None:
                return
            if times.first_token_s is None:
                times.first_token_s = now_s
                self._prompt_tokens_total += request.num_prompt_tokens
                self._histograms["time_to_first_token_seconds"].observe(now_s - times.arrival_s)
            else:
                assert times.last_token_s is not None
                self._histograms["inter_token_latency_seconds"].observe(now_s - times.last_token_s)
            times.last_token_s = now_s

    def request_finished(self, request: Request, now_s: float) -> None:
        """Once per request, when it stops for any reason (aborts included)."""
        reason = request.status.finish_reason or "abort"
        with self._lock:
            times = self._requests.pop(request.request_id, None)
            if times is None:
                return
            self._finished_total[reason] = self._finished_total.get(reason, 0) + 1
            hist = self._histograms
            hist["e2e_request_latency_seconds"].observe(now_s - times.arrival_s)
            hist["request_prompt_tokens"].observe(request.num_prompt_tokens)
            hist["request_generation_tokens"].observe(len(request.output_token_ids))
            if times.scheduled_s is not None and times.first_token_s is not None:
                hist["request_prefill_time_seconds"].observe(times.first_token_s - times.scheduled_s)
            if times.first_token_s is not None and times.last_token_s is not None:
                hist["request_decode_time_seconds"].observe(times.last_token_s - times.first_token_s)

    def snapshot(self) -> MetricsSnapshot:
        with self._lock:
            return MetricsSnapshot(
                prompt_tokens_total=self._prompt_tokens_total,
                generation_tokens_total=self._generation_tokens_total,
                finished_total=dict(self._finished_total),
                histograms={name: h.snapshot() for name, h in self._histograms.items()},
                cache_info=dict(self.cache_info),
                prefix_cache=replace(self._prefix_cache),
            )
