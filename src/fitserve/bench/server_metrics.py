"""The server's Prometheus /metrics, read before, during and after a run (vLLM's metric names).

A server without /metrics (404, or not Prometheus text) is not an error: the report says
the figures are unavailable. Counters are summed over their labels (engines, models, GPUs).
fitserve's GPU energy counter (or, failing it, its power gauge integrated over the scrapes)
gives the energy of the run: average power, joules per output token, tokens per joule.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

# The first name a server exports wins; later names are older vLLM spellings.
PREEMPTIONS = ("vllm:num_preemptions_total", "vllm:num_preemptions")
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # a fraction, 0..1, despite the name
WAITING = ("vllm:num_requests_waiting",)
RUNNING = ("vllm:num_requests_running",)
ENERGY = ("fitserve:gpu_energy_joules_total",)  # summed over the server's GPUs (docs/telemetry.md)
POWER = ("fitserve:gpu_power_watts",)
PREFIX_CACHE_QUERIES = ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total")  # tokens
PREFIX_CACHE_HITS = ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total")
# Histograms whose mean over the run the report gives (their _sum and _count grow by the run's requests):
# the server's own view of the first token, to set beside the client's (what HTTP and the client add).
SERVER_TTFT = "vllm:time_to_first_token_seconds"   # arrival at the API -> first token sampled
QUEUE_TIME = "vllm:request_queue_time_seconds"     # arrival -> the step that first schedules it
PREFILL_TIME = "vllm:request_prefill_time_seconds"  # that step -> first token
DEFAULT_POLL_INTERVAL_S = 0.5


def parse_samples(text: str) -> dict[str, float]:
    """Sample name -> value summed over labels."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + float(sample.value)
    return totals


def pick(samples: dict[str, float], names: tuple[str, ...]) -> float | None:
    return next((samples[n] for n in names if n in samples), None)


async def scrape(http: httpx.AsyncClient, base_url: str) -> dict[str, float] | None:
    """The server's samples, or None when it has no /metrics."""
    try:
        response = await http.get(base_url + "/metrics", timeout=10.0)
        if response.status_code != 200:
            return None
        return parse_samples(response.text)
    except (httpx.HTTPError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class ServerMetricsSummary:
    available: bool                        # False: the server has no /metrics
    num_preemptions: float | None = None   # during the run (after - before)
    peak_kv_cache_usage_pct: float | None = None  # highest sample seen while the run went on, 0..100
    peak_num_requests_waiting: float | None = None
    peak_num_requests_running: float | None = None
    num_samples: int = 0                   # scrapes that answered
    energy_j: float | None = None          # the GPUs' energy between the first and the last scrape
    energy_source: str | None = None       # "counter" (the server's energy counter) or "power_samples"
    energy_window_s: float | None = None   # first scrape -> last scrape, on the client's clock
    power_before_w: float | None = None    # the GPUs' power at the first scrape, before any request
    peak_power_w: float | None = None      # highest power seen while polling
    prefix_cache_queries: float | None = None  # prompt tokens looked up in the prefix cache during the run
    prefix_cache_hits: float | None = None     # of those, tokens found cached
    mean_server_ttft_ms: float | None = None   # the means of the server's histograms over the run
    mean_queue_time_ms: float | None = None
    mean_prefill_time_ms: float | None = None

    @property
    def prefix_cache_hit_rate_pct(self) -> float | None:
        if not self.prefix_cache_queries or self.prefix_cache_hits is None:
            return None
        return 100.0 * self.prefix_cache_hits / self.prefix_cache_queries

    def to_json(self) -> dict:
        return {**{name: getattr(self, name) for name in self.__slots__},
                "prefix_cache_hit_rate_pct": self.prefix_cache_hit_rate_pct}

    def energy_figures(self, total_output_tokens: int) -> dict:
        """Average power, joules per output token and output tokens per joule (None without energy)."""
        energy_j, window_s = self.energy_j, self.energy_window_s
        return {
            "energy_j": energy_j,
            "mean_power_w": energy_j / window_s if energy_j is not None and window_s else None,
            "joules_per_output_token": energy_j / total_output_tokens if energy_j is not None and total_output_tokens
            else None,
            "output_tokens_per_joule": total_output_tokens / energy_j if energy_j else None,
        }


def integrate_power(samples: list[tuple[float, float]]) -> float | None:
    """Joules from (time_s, watts) samples, by trapezoids; None with fewer than two."""
    if len(samples) < 2:
        return None
    return sum(0.5 * (p0 + p1) * (t1 - t0) for (t0, p0), (t1, p1) in itertools.pairwise(samples))


class MetricsPoller:
    """Scrapes /metrics every `interval_s` while a run goes on and keeps the peaks."""

    def __init__(self, http: httpx.AsyncClient, base_url: str, interval_s: float = DEFAULT_POLL_INTERVAL_S):
        self.http, self.base_url, self.interval_s = http, base_url, interval_s
        self.first: dict[str, float] | None = None
        self.last: dict[str, float] | None = None
        self.peaks: dict[tuple[str, ...], float] = {}
        self.power_samples: list[tuple[float, float]] = []  # (time_s, watts), for servers without an energy counter
        self.first_s: float | None = None  # time.perf_counter() of the first and last answered scrapes
        self.last_s: float | None = None
        self.num_samples = 0
        self._task: asyncio.Task | None = None

    async def sample(self) -> None:
        samples = await scrape(self.http, self.base_url)
        if samples is None:
            return
        now_s = time.perf_counter()
        self.num_samples += 1
        self.first = self.first if self.first is not None else samples
        self.first_s = self.first_s if self.first_s is not None else now_s
        self.last, self.last_s = samples, now_s
        power_w = pick(samples, POWER)
        if power_w is not None:
            self.power_samples.append((now_s, power_w))
        for names in (KV_USAGE, WAITING, RUNNING, POWER):
            value = pick(samples, names)
            if value is not None:
                self.peaks[names] = max(value, self.peaks.get(names, value))

    async def start(self) -> bool:
        """Take the 'before' sample; poll only when the server answered it."""
        await self.sample()
        if self.first is not None:
            self._task = asyncio.create_task(self._poll())
        return self.first is not None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.sample()

    async def stop(self) -> ServerMetricsSummary:
        """Stop polling and take the 'after' sample."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.first is None:
            return ServerMetricsSummary(available=False)
        await self.sample()
        return self.summary()

    def _delta(self, names: tuple[str, ...]) -> float | None:
        """A counter's growth from the first scrape to the last (None when the server lacks it)."""
        before, after = pick(self.first or {}, names), pick(self.last or {}, names)
        return None if before is None or after is None else after - before

    def _mean_ms(self, histogram: str) -> float | None:
        """A histogram's mean over the run, in ms (None without it or without observations in the run)."""
        total, count = self._delta((histogram + "_sum",)), self._delta((histogram + "_count",))
        return None if total is None or not count else 1000.0 * total / count

    def summary(self) -> ServerMetricsSummary:
        kv = self.peaks.get(KV_USAGE)
        energy_before, energy_after = pick(self.first or {}, ENERGY), pick(self.last or {}, ENERGY)
        if energy_before is not None and energy_after is not None:
            energy_j, source = energy_after - energy_before, "counter"
        else:
            energy_j = integrate_power(self.power_samples)
            source = None if energy_j is None else "power_samples"
        window_s = None if self.first_s is None or self.last_s is None else self.last_s - self.first_s
        return ServerMetricsSummary(
            available=True,
            num_preemptions=self._delta(PREEMPTIONS),
            peak_kv_cache_usage_pct=None if kv is None else kv * 100.0,
            peak_num_requests_waiting=self.peaks.get(WAITING),
            peak_num_requests_running=self.peaks.get(RUNNING),
            num_samples=self.num_samples,
            energy_j=energy_j,
            energy_source=source,
            energy_window_s=window_s if energy_j is not None else None,
            power_before_w=pick(self.first or {}, POWER),
            peak_power_w=self.peaks.get(POWER),
            prefix_cache_queries=self._delta(PREFIX_CACHE_QUERIES),
            prefix_cache_hits=self._delta(PREFIX_CACHE_HITS),
            mean_server_ttft_ms=self._mean_ms(SERVER_TTFT),
            mean_queue_time_ms=self._mean_ms(QUEUE_TIME),
            mean_prefill_time_ms=self._mean_ms(PREFILL_TIME),
        )
