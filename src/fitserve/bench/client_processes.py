"""The benchmark client spread over several processes (--client-processes K), and its CPU use.

One Python process that parses hundreds of SSE streams can become the limit of a run: its event
loop then reads tokens late, and the server looks slower than it is. With K processes, request
i goes to process i mod K (its arrival offset kept), each with its own event loop, httpx client
and a K-th of --max-concurrency; they start at one instant (time.perf_counter is the system's
monotonic clock, the same in every process), and their per-request records are merged into
workload order. Every run (K = 1 too) reports each client process's CPU use, user + system
seconds over the wall time of the run (time.process_time), so a reader can tell a client-bound run:
CLIENT_BOUND_CORE_FRACTION of a core or more draws a warning.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fitserve.bench.client import RequestOutcome, RequestSettings, make_http_client
from fitserve.bench.workloads import RequestSpec

CLIENT_BOUND_CORE_FRACTION = 0.8  # a client process this busy may delay the tokens it reads
START_TIMEOUT_S = 120.0  # for the client processes to import and report ready
START_MARGIN_S = 0.2  # the common start instant lies this far after the last process reported ready

# _send_all of bench/driver.py: (http, specs, settings, offsets_s, max_concurrency, bar, start_s) -> outcomes
SendAll = Callable[..., Awaitable[list[RequestOutcome]]]


@dataclass(frozen=True, slots=True)
class ClientCpu:
    """One client process's CPU use over the timed run."""

    process: int  # 0..K-1
    cpu_s: float  # user + system seconds of all its threads
    wall_s: float  # the run's wall time in that process

    @property
    def core_fraction(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict:
        return {"process": self.process, "cpu_s": round(self.cpu_s, 3), "wall_s": round(self.wall_s, 3),
                "core_fraction": round(self.core_fraction, 3)}


def cpu_seconds() -> float:
    """This process's user + system CPU seconds (every thread), to the nanosecond clock: os.times()
    counts 10 ms ticks, and a short run on a fast CPU read 0."""
    return time.process_time()


def client_cpu_summary(cpu: Sequence[ClientCpu]) -> dict:
    """The result document's `client_cpu`: each process, the busiest, and whether it looks client-bound."""
    busiest = max((c.core_fraction for c in cpu), default=0.0)
    return {"num_processes": len(cpu), "processes": [c.to_json() for c in cpu],
            "max_core_fraction": round(busiest, 3), "client_bound": busiest >= CLIENT_BOUND_CORE_FRACTION}


def client_bound_warning(summary: dict) -> str | None:
    if not summary or not summary["client_bound"]:
        return None
    return (f"warning: a benchmark client process used {summary['max_core_fraction']:.0%} of a CPU core: the client "
            "may be the limit of this run; use more --client-processes")


def concurrency_share(max_concurrency: int | None, num_processes: int, process: int) -> int | None:
    """Process `process`'s part of --max-concurrency (None: no cap), the remainder to the first ones."""
    if max_concurrency is None:
        return None
    return max(max_concurrency // num_processes + (process < max_concurrency % num_processes), 1)


@dataclass(frozen=True, slots=True)
class ClientShare:
    """What one client process sends: every K-th request with its arrival offset."""

    process: int
    specs: tuple[RequestSpec, ...]
    offsets_s: tuple[float, ...]
    max_concurrency: int | None


def split_requests(specs: Sequence[RequestSpec], offsets_s: Sequence[float], max_concurrency: int | None,
                   num_processes: int) -> list[ClientShare]:
    return [ClientShare(p, tuple(specs[p::num_processes]), tuple(offsets_s[p::num_processes]),
                        concurrency_share(max_concurrency, num_processes, p)) for p in range(num_processes)]


def send_in_processes(shares: Sequence[ClientShare], settings: RequestSettings, request_timeout_s: float,
                      send_all: SendAll) -> tuple[list[RequestOutcome], float, list[ClientCpu]]:
    """Run each share in its own process, all from one instant; blocks (call it in a thread).
    Returns the outcomes in workload order, the duration (the common start -> the last request
    done) and each process's CPU use."""
    context = multiprocessing.get_context("spawn")
    pipes, processes = [], []
    try:
        for share in shares:
            parent_end, child_end = context.Pipe()
            process = context.Process(target=_client_main, name=f"fitserve-bench-client-{share.process}",
                                      args=(child_end, share, settings, request_timeout_s, send_all), daemon=True)
            process.start()
            child_end.close()
            pipes.append(parent_end)
            processes.append(process)
        for pipe in pipes:
            if not pipe.poll(START_TIMEOUT_S):
                raise RuntimeError(f"a benchmark client process did not start within {START_TIMEOUT_S:g} s")
            pipe.recv()
        start_s = time.perf_counter() + START_MARGIN_S
        for pipe in pipes:
            pipe.send(start_s)
        results = [pipe.recv() for pipe in pipes]  # (outcomes, done_s, cpu) each
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
    outcomes = sorted((o for r in results for o in r[0]), key=lambda o: o.index)
    return outcomes, max(r[1] for r in results) - start_s, [r[2] for r in results]


def _client_main(pipe: Any, share: ClientShare, settings: RequestSettings, request_timeout_s: float,
                 send_all: SendAll) -> None:
    pipe.send("ready")
    start_s = pipe.recv()
    pipe.send(asyncio.run(_run_share(share, settings, request_timeout_s, send_all, start_s)))


async def _run_share(share: ClientShare, settings: RequestSettings, request_timeout_s: float, send_all: SendAll,
                     start_s: float) -> tuple[list[RequestOutcome], float, ClientCpu]:
    async with make_http_client(request_timeout_s) as http:
        await asyncio.sleep(max(start_s - time.perf_counter(), 0.0))
        cpu_before_s, wall_before_s = cpu_seconds(), time.perf_counter()
        outcomes = await send_all(http, share.specs, settings, share.offsets_s, share.max_concurrency, None,
                                  start_s=start_s)
        done_s = time.perf_counter()
    return outcomes, done_s, ClientCpu(share.process, cpu_seconds() - cpu_before_s, done_s - wall_before_s)
