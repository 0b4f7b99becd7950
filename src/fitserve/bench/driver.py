"""Running a workload: arrivals on schedule, a cap on requests in flight, a progress bar,
the server's /metrics around the run, W5's long request with short ones beside it, and the
client spread over several processes (bench/client_processes.py) with its CPU use."""

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
    BenchError,
    RequestOutcome,
    RequestSettings,
    get_json,
    make_http_client,
    send_request,
    wait_until_ready,
)
from fitserve.bench.client_processes import ClientCpu, cpu_seconds, send_in_processes, split_requests
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
    client_processes: int = 1           # processes that send the requests (bench/client_processes.py)


@dataclass(frozen=True, slots=True)
class RunResult:
    outcomes: list[RequestOutcome]      # in workload order
    duration_s: float                   # first send -> last request done
    server_metrics: ServerMetricsSummary
    server_version: dict | None         # the server's /version document
    started_at: float                   # time.time() when the run began
    client_cpu: list[ClientCpu]         # each client process's CPU use over the run


async def _send_all(http: httpx.AsyncClient, specs: Sequence[RequestSpec], settings: RequestSettings,
                    offsets_s: Sequence[float], max_concurrency: int | None, bar: tqdm | None,
                    start_s: float | None = None) -> list[RequestOutcome]:
    """Send each spec at its offset from `start_s` (time.perf_counter; None: now), or later when
    `max_concurrency` are in flight."""
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    start_s = time.perf_counter() if start_s is None else start_s

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


async def _send_timed(http: httpx.AsyncClient, specs: Sequence[RequestSpec], settings: RequestSettings,
                      workload: Workload, options: RunOptions, rng: np.random.Generator,
                      bar: tqdm) -> tuple[list[RequestOutcome], float, list[ClientCpu]]:
    """The timed part of a run: (outcomes, duration, each client process's CPU use)."""
    if options.client_processes > 1:
        offsets_s = arrival_offsets_s(len(specs), workload.request_rate, workload.burstiness, rng)
        shares = split_requests(specs, offsets_s, workload.max_concurrency, options.client_processes)
        return await asyncio.to_thread(send_in_processes, shares, settings, options.request_timeout_s, _send_all)
    cpu_before_s, start_s = cpu_seconds(), time.perf_counter()
    if workload.interference:
        outcomes = await _send_interference(http, specs, settings, workload, rng, bar)
    else:
        offsets_s = arrival_offsets_s(len(specs), workload.request_rate, workload.burstiness, rng)
        outcomes = await _send_all(http, specs, settings, offsets_s, workload.max_concurrency, bar)
    duration_s = time.perf_counter() - start_s
    return outcomes, duration_s, [ClientCpu(0, cpu_seconds() - cpu_before_s, duration_s)]


async def run_workload(workload: Workload, settings: RequestSettings, options: RunOptions) -> RunResult:
    if options.client_processes < 1:
        raise BenchError(f"--client-processes must be 1 or more, not {options.client_processes}")
    if workload.max_concurrency is not None and workload.max_concurrency < options.client_processes:
        raise BenchError(f"--client-processes {options.client_processes} needs --max-concurrency of at least as "
                         f"many (each process keeps one request or more in flight), not {workload.max_concurrency}")
    if options.client_processes > 1 and workload.interference:
        raise BenchError(f"{workload.name} times its short requests against its long one in one process: "
                         "leave out --client-processes")
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
        # the client processes report no progress: their bar would only be theirs
        bar = tqdm(total=len(specs), file=sys.stderr, unit="req", leave=False,
                   disable=not options.progress or options.client_processes > 1)
        started_at = time.time()
        try:
            outcomes, duration_s, client_cpu = await _send_timed(http, specs, settings, workload, options, rng, bar)
        finally:
            bar.close()
            server_metrics = await poller.stop()
    return RunResult(outcomes, duration_s, server_metrics, version, started_at, client_cpu)
