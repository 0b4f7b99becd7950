"""Running a workload: arrivals on schedule, a cap on requests in flight, a progress bar,
the server's /metrics around the run, and W5's long request with short ones beside it."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import numpy as np
from tqdm import tqdm

from fitserve.bench.client import (
    RequestOutcome,
    RequestSettings,
    get_json,
    make_http_client,
    send_request,
    wait_until_ready,
)
from fitserve.bench.server_metrics import DEFAULT_POLL_INTERVAL_S, MetricsPoller, ServerMetricsSummary
from fitserve.bench.workloads import RequestSpec, Workload, arrival_offsets_s, build_requests


@dataclass(frozen=True, slots=True)
class RunOptions:
    seed: int = 0
    vocab_size: int = 32000
    request_timeout_s: float = 3600.0   # the longest wait for one response chunk
    ready_timeout_s: float = 600.0      # retry the initial test request this long; 0 skips it
    metrics_interval_s: float = DEFAULT_POLL_INTERVAL_S
    num_warmups: int = 0                # untimed requests (the last prompt) before the run
    progress: bool = True


@dataclass(frozen=True, slots=True)
class RunResult:
    outcomes: list[RequestOutcome]      # in workload order
    duration_s: float                   # first send -> last request done
    server_metrics: ServerMetricsSummary
    server_version: dict | None         # the server's /version document
    started_at: float                   # time.time() when the run began


async def _send_all(http: httpx.AsyncClient, specs: Sequence[RequestSpec], settings: RequestSettings,
                    offsets_s: Sequence[float], max_concurrency: int | None, bar: tqdm | None,
                    ) -> list[RequestOutcome]:
    """Send each spec at its offset from now (or later, when `max_concurrency` are in flight)."""
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    start_s = time.perf_counter()

    async def one(spec: RequestSpec) -> RequestOutcome:
        async with limit:
            outcome = await send_request(http, spec, settings)
        if bar is not None:
            bar.update(1)
        return outcome

    tasks = []
    for spec, offset_s in zip(specs, offsets_s):
        delay_s = start_s + offset_s - time.perf_counter()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        tasks.append(asyncio.create_task(one(spec)))
    return list(await asyncio.gather(*tasks))


async def _send_interference(http: httpx.AsyncClient, specs: Sequence[RequestSpec], settings: RequestSettings,
                             workload: Workload, rng: np.random.Generator, bar: tqdm | None,
                             ) -> list[RequestOutcome]:
    """W5: the long request first; the short ones once its first token arrived."""
    streaming = asyncio.Event()
    long_task = asyncio.create_task(send_request(http, specs[0], settings, on_first_token=streaming.set))
    waiter = asyncio.create_task(streaming.wait())
    await asyncio.wait([long_task, waiter], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    shorts = specs[1:]
    offsets_s = arrival_offsets_s(len(shorts), workload.request_rate, workload.burstiness, rng)
    short_outcomes = await _send_all(http, shorts, settings, offsets_s, workload.max_concurrency, bar)
    long_outcome = await long_task
    if bar is not None:
        bar.update(1)
    return [long_outcome, *short_outcomes]


async def run_workload(workload: Workload, settings: RequestSettings, options: RunOptions) -> RunResult:
    specs = build_requests(workload, seed=options.seed, chat=settings.chat, vocab_size=options.vocab_size)
    rng = np.random.default_rng(options.seed + 1)  # arrivals: independent of the prompts drawn
    async with make_http_client(options.request_timeout_s) as http:
        if options.ready_timeout_s > 0:
            await wait_until_ready(http, specs[-1], settings, options.ready_timeout_s)
        if options.num_warmups > 0:
            await _send_all(http, [specs[-1]] * options.num_warmups, settings, [0.0] * options.num_warmups,
                            workload.max_concurrency, bar=None)
        version = await get_json(http, settings.base_url + "/version")
        poller = MetricsPoller(http, settings.base_url, options.metrics_interval_s)
        await poller.start()
        bar = tqdm(total=len(specs), file=sys.stderr, unit="req", disable=not options.progress, leave=False)
        started_at = time.time()
        start_s = time.perf_counter()
        try:
            if workload.interference:
                outcomes = await _send_interference(http, specs, settings, workload, rng, bar)
            else:
                offsets_s = arrival_offsets_s(len(specs), workload.request_rate, workload.burstiness, rng)
                outcomes = await _send_all(http, specs, settings, offsets_s, workload.max_concurrency, bar)
            duration_s = time.perf_counter() - start_s
        finally:
            bar.close()
            server_metrics = await poller.stop()
    return RunResult(outcomes, duration_s, server_metrics, version, started_at)
