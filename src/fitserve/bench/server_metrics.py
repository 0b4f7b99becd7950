"""The server's Prometheus /metrics, read before, during and after a run (vLLM's metric names).

A server without /metrics (404, or not Prometheus text) is not an error: the report says
the figures are unavailable. Counters are summed over their labels (engines, models).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

# The first name a server exports wins; later names are older vLLM spellings.
PREEMPTIONS = ("vllm:num_preemptions_total", "vllm:num_preemptions")
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # a fraction, 0..1, despite the name
WAITING = ("vllm:num_requests_waiting",)
RUNNING = ("vllm:num_requests_running",)
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

    def to_json(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


class MetricsPoller:
    """Scrapes /metrics every `interval_s` while a run goes on and keeps the peaks."""

    def __init__(self, http: httpx.AsyncClient, base_url: str, interval_s: float = DEFAULT_POLL_INTERVAL_S):
        self.http, self.base_url, self.interval_s = http, base_url, interval_s
        self.first: dict[str, float] | None = None
        self.last: dict[str, float] | None = None
        self.peaks: dict[tuple[str, ...], float] = {}
        self.num_samples = 0
        self._task: asyncio.Task | None = None

    async def sample(self) -> None:
        samples = await scrape(self.http, self.base_url)
        if samples is None:
            return
        self.num_samples += 1
        self.first = self.first if self.first is not None else samples
        self.last = samples
        for names in (KV_USAGE, WAITING, RUNNING):
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

    def summary(self) -> ServerMetricsSummary:
        before, after = pick(self.first or {}, PREEMPTIONS), pick(self.last or {}, PREEMPTIONS)
        kv = self.peaks.get(KV_USAGE)
        return ServerMetricsSummary(
            available=True,
            num_preemptions=None if before is None or after is None else after - before,
            peak_kv_cache_usage_pct=None if kv is None else kv * 100.0,
            peak_num_requests_waiting=self.peaks.get(WAITING),
            peak_num_requests_running=self.peaks.get(RUNNING),
            num_samples=self.num_samples,
        )
