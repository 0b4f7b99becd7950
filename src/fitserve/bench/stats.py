"""From request outcomes to the report's figures: throughputs, latency distributions, peaks.

Definitions follow `vllm bench serve`: TTFT is send -> first chunk with text; TPOT is
(E2E - TTFT) / (output tokens - 1) per request; ITL is every gap between chunks with text;
E2E is send -> end of the stream. Percentiles are numpy's linear interpolation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fitserve.bench.client import RequestOutcome

DEFAULT_PERCENTILES = (90.0, 99.0)  # the median is always reported
MS_PER_S = 1000.0


@dataclass(frozen=True, slots=True)
class LatencyStats:
    count: int                                    # samples
    mean_ms: float
    median_ms: float
    std_ms: float
    percentiles_ms: tuple[tuple[float, float], ...]  # (percentile, ms)

    def percentile_ms(self, p: float) -> float:
        return dict(self.percentiles_ms)[p]


def latency_stats(values_s: Sequence[float], percentiles: Sequence[float]) -> LatencyStats | None:
    """Statistics in milliseconds of samples in seconds; None when there are none."""
    if not values_s:
        return None
    ms = np.asarray(values_s, dtype=np.float64) * MS_PER_S
    return LatencyStats(
        count=len(ms),
        mean_ms=float(ms.mean()),
        median_ms=float(np.median(ms)),
        std_ms=float(ms.std()),
        percentiles_ms=tuple((float(p), float(np.percentile(ms, p))) for p in percentiles),
    )


@dataclass(frozen=True, slots=True)
class BenchmarkMetrics:
    completed: int                 # successful requests
    failed: int
    duration_s: float              # first send -> last request done
    total_input_tokens: int        # prompt tokens of the successful requests
    total_output_tokens: int       # output tokens of the successful requests
    request_throughput: float      # completed / duration, req/s
    request_goodput: float | None  # requests meeting every --goodput SLO / duration; None without SLOs
    output_throughput: float       # output tokens / duration, tok/s
    total_token_throughput: float  # (input + output tokens) / duration, tok/s
    max_output_tokens_per_s: float  # the busiest one-second window of output tokens
    max_concurrent_requests: int   # the most successful requests in flight at one instant
    ttft: LatencyStats | None
    tpot: LatencyStats | None
    itl: LatencyStats | None
    e2el: LatencyStats | None

    LATENCIES = ("ttft", "tpot", "itl", "e2el")

    def flat(self) -> dict:
        """vLLM's result keys: mean_ttft_ms, median_ttft_ms, std_ttft_ms, p99_ttft_ms, ..."""
        out = {
            "completed": self.completed,
            "failed": self.failed,
            "duration": self.duration_s,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "request_throughput": self.request_throughput,
            "request_goodput": self.request_goodput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            "max_output_tokens_per_s": self.max_output_tokens_per_s,
            "max_concurrent_requests": self.max_concurrent_requests,
        }
        for name in self.LATENCIES:
            out.update(flat_latency(name, getattr(self, name)))
        return out


def flat_latency(name: str, stats: LatencyStats | None) -> dict:
    if stats is None:
        return {f"mean_{name}_ms": None, f"median_{name}_ms": None, f"std_{name}_ms": None}
    out = {f"mean_{name}_ms": stats.mean_ms, f"median_{name}_ms": stats.median_ms, f"std_{name}_ms": stats.std_ms}
    for p, value in stats.percentiles_ms:
        out[f"p{percentile_word(p)}_{name}_ms"] = value
    return out


def percentile_word(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def tpot_s(outcome: RequestOutcome) -> float | None:
    if outcome.output_tokens < 2:
        return None
    return (outcome.latency_s - outcome.ttft_s) / (outcome.output_tokens - 1)


def token_times_s(outcome: RequestOutcome) -> list[float]:
    """When each chunk with text arrived (perf_counter seconds)."""
    times = [outcome.start_s + outcome.ttft_s]
    for gap in outcome.itl_s:
        times.append(times[-1] + gap)
    return times


def peak_output_rate(outcomes: Sequence[RequestOutcome]) -> float:
    """The most output chunks in one second, in one-second buckets from the first send (as vLLM
    counts them). A chunk is one token unless the server merged some."""
    if not outcomes:
        return 0.0
    t0_s = min(o.start_s for o in outcomes)
    num_buckets = int(math.ceil(max(o.end_s for o in outcomes) - t0_s)) + 1
    tokens = np.zeros(num_buckets)
    for o in outcomes:
        for t in token_times_s(o):
            tokens[min(int(t - t0_s), num_buckets - 1)] += 1
    return float(tokens.max())


def max_in_flight(outcomes: Sequence[RequestOutcome]) -> int:
    """The most requests in flight at one instant (a request ending frees its place first)."""
    events = sorted([(o.start_s, 1) for o in outcomes] + [(o.end_s, -1) for o in outcomes])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


GOODPUT_METRICS = ("ttft", "tpot", "e2el")


def meets_slos(outcome: RequestOutcome, slos_ms: dict[str, float]) -> bool:
    """Every service-level objective met (vLLM's goodput; a single-token request's TPOT is 0)."""
    values_s = {"ttft": outcome.ttft_s, "tpot": tpot_s(outcome) or 0.0, "e2el": outcome.latency_s}
    return all(values_s[name] * MS_PER_S <= limit_ms for name, limit_ms in slos_ms.items())


def compute_metrics(outcomes: Sequence[RequestOutcome], duration_s: float,
                    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                    goodput_slos_ms: dict[str, float] | None = None) -> BenchmarkMetrics:
    ok = [o for o in outcomes if o.success]
    total_in = sum(o.prompt_len for o in ok)
    total_out = sum(o.output_tokens for o in ok)
    tpots = [t for t in map(tpot_s, ok) if t is not None]
    itls = [gap for o in ok for gap in o.itl_s]
    duration_s = max(duration_s, 1e-9)
    return BenchmarkMetrics(
        completed=len(ok),
        failed=len(outcomes) - len(ok),
        duration_s=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) / duration_s,
        request_goodput=(sum(meets_slos(o, goodput_slos_ms) for o in ok) / duration_s) if goodput_slos_ms else None,
        output_throughput=total_out / duration_s,
        total_token_throughput=(total_in + total_out) / duration_s,
        max_output_tokens_per_s=peak_output_rate(ok),
        max_concurrent_requests=max_in_flight(ok),
        ttft=latency_stats([o.ttft_s for o in ok], percentiles),
        tpot=latency_stats(tpots, percentiles),
        itl=latency_stats(itls, percentiles),
        e2el=latency_stats([o.latency_s for o in ok], percentiles),
    )


def interference_summary(outcomes: Sequence[RequestOutcome], percentiles: Sequence[float]) -> dict:
    """W5: the long request's figures and the short requests' TTFT and E2E while it streamed."""
    long = next((o for o in outcomes if o.role == "long"), None)
    shorts = [o for o in outcomes if o.role == "short" and o.success]
    out: dict = {"long_success": bool(long and long.success), "num_short": sum(o.role == "short" for o in outcomes),
                 "num_short_completed": len(shorts)}
    if long is not None and long.success:
        out.update(long_ttft_ms=long.ttft_s * MS_PER_S, long_e2el_ms=long.latency_s * MS_PER_S,
                   long_tpot_ms=(tpot_s(long) or 0.0) * MS_PER_S, long_output_tokens=long.output_tokens)
        out["num_short_done_before_long"] = sum(o.end_s <= long.end_s for o in shorts)
    out.update(flat_latency("short_ttft", latency_stats([o.ttft_s for o in shorts], percentiles)))
    out.update(flat_latency("short_e2el", latency_stats([o.latency_s for o in shorts], percentiles)))
    return out


def error_counts(outcomes: Sequence[RequestOutcome]) -> dict[str, int]:
    """Each distinct error message and how many requests failed with it."""
    counts: dict[str, int] = {}
    for o in outcomes:
        if not o.success:
            counts[o.error] = counts.get(o.error, 0) + 1
    return counts
