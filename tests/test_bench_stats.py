"""fitserve bench without a server: workloads, arrival times, figures from known timings,
the /metrics parser."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from fitserve.bench.client import RequestOutcome
from fitserve.bench.server_metrics import MetricsPoller, parse_samples
from fitserve.bench.stats import (
    compute_metrics,
    error_counts,
    interference_summary,
    latency_stats,
    max_in_flight,
    peak_output_rate,
)
from fitserve.bench.workloads import (
    W5_SHORT_OUTPUT_TOKENS,
    WORKLOADS,
    WorkloadError,
    arrival_offsets_s,
    build_requests,
    resolve_workload,
    sample_lengths,
)


def outcome(index: int, start_s: float, ttft_s: float, itl_s: list[float], *, output_tokens: int | None = None,
            prompt_len: int = 10, role: str = "main", success: bool = True, error: str = "") -> RequestOutcome:
    o = RequestOutcome(index, role, prompt_len, len(itl_s) + 1, success=success, error=error, start_s=start_s,
                       ttft_s=ttft_s, itl_s=list(itl_s))
    o.latency_s = ttft_s + sum(itl_s)
    o.output_tokens = len(itl_s) + 1 if output_tokens is None else output_tokens
    return o


def test_workloads_match_benchmarks_md():
    shapes = {name: (w.num_prompts, w.max_concurrency, w.input_len, w.output_len) for name, w in WORKLOADS.items()}
    assert shapes == {"W1": (100, 20, 512, 128), "W2": (1000, 256, 512, 128), "W3": (200, 32, 3072, 64),
                      "W4": (200, 64, 128, 1024), "W5": (21, None, 64, 1024), "W6": (100, 20, 512, 128),
                      "shared-prefix": (100, 8, 32, 32)}
    assert WORKLOADS["shared-prefix"].prefix_len == 1000
    assert WORKLOADS["W5"].interference and "gpu-memory-utilization" in WORKLOADS["W6"].server_note


def test_resolve_workload_overrides_and_errors():
    w = resolve_workload("w1", num_prompts=20, max_concurrency=4, input_len=None)
    assert (w.name, w.num_prompts, w.max_concurrency, w.input_len) == ("W1", 20, 4, 512)
    for bad in ({"range_ratio": 1.0}, {"num_prompts": 0}, {"request_rate": 0.0}, {"max_concurrency": 0}):
        with pytest.raises(WorkloadError):
            resolve_workload("custom", **bad)
    with pytest.raises(WorkloadError, match="unknown workload"):
        resolve_workload("W9")


def test_shared_prefix_prompts_start_alike_and_count_the_prefix():
    w = resolve_workload("Shared-Prefix", num_prompts=5, prefix_len=30, input_len=10, range_ratio=0.5)
    specs = build_requests(w, seed=4, vocab_size=1000)
    assert all(s.prompt[:30] == specs[0].prompt[:30] for s in specs)
    assert len({tuple(s.prompt[30:]) for s in specs}) == 5, "each request has its own part"
    assert all(len(s.prompt) == s.prompt_len and 30 + 5 <= s.prompt_len <= 30 + 15 for s in specs)
    plain = build_requests(dataclasses.replace(w, prefix_len=0), seed=4, vocab_size=1000)
    assert [s.prompt[30:] for s in specs] == [p.prompt for p in plain], "the prefix leaves the rest unchanged"
    chat = build_requests(w, seed=4, chat=True)
    assert all(s.prompt.split()[:30] == chat[0].prompt.split()[:30] for s in chat)
    assert len({s.prompt for s in chat}) == 5
    with pytest.raises(WorkloadError, match="prefix-len"):
        resolve_workload("custom", prefix_len=-1)


def test_requests_are_seeded_exact_and_in_range():
    w = resolve_workload("custom", num_prompts=50, input_len=100, output_len=20, range_ratio=0.5)
    specs = build_requests(w, seed=3, vocab_size=1000)
    assert specs == build_requests(w, seed=3, vocab_size=1000)
    assert specs != build_requests(w, seed=4, vocab_size=1000)
    for s in specs:
        assert len(s.prompt) == s.prompt_len and 50 <= s.prompt_len <= 150 and 10 <= s.output_len <= 30
        assert all(0 <= t < 1000 for t in s.prompt)
    assert len({s.prompt_len for s in specs}) > 10  # lengths really vary
    chat = build_requests(resolve_workload("custom", num_prompts=2, input_len=7), seed=0, chat=True)
    assert all(isinstance(s.prompt, str) and len(s.prompt.split()) == 7 for s in chat)


def test_w5_requests_one_long_then_short():
    specs = build_requests(resolve_workload("W5"), seed=0)
    assert [s.role for s in specs] == ["long"] + ["short"] * 20
    assert specs[0].output_len == 1024 and {s.output_len for s in specs[1:]} == {W5_SHORT_OUTPUT_TOKENS}


def test_sample_lengths_bounds():
    rng = np.random.default_rng(0)
    assert sample_lengths(128, 0.0, 5, rng) == [128] * 5
    lens = sample_lengths(10, 0.5, 2000, rng)
    assert min(lens) == 5 and max(lens) == 15


def test_arrivals_all_at_once_or_on_average_at_the_rate():
    rng = np.random.default_rng(0)
    assert arrival_offsets_s(4, math.inf, 1.0, rng) == [0.0] * 4
    offsets = arrival_offsets_s(1000, 10.0, 1.0, rng)
    assert offsets == sorted(offsets) and offsets[-1] == pytest.approx(100.0)
    gaps = np.diff(offsets)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, abs=0.1)  # exponential gaps: CV 1
    bursty = np.diff(arrival_offsets_s(1000, 10.0, 0.25, rng))
    assert np.std(bursty) / np.mean(bursty) == pytest.approx(2.0, abs=0.3)  # gamma shape k: CV 1/sqrt(k)


def test_latency_percentiles_on_known_values():
    stats = latency_stats([i / 1000 for i in range(1, 101)], (90.0, 99.0))  # 1..100 ms
    assert stats.count == 100
    assert stats.mean_ms == pytest.approx(50.5) and stats.median_ms == pytest.approx(50.5)
    assert stats.percentile_ms(90.0) == pytest.approx(90.1) and stats.percentile_ms(99.0) == pytest.approx(99.01)
    assert latency_stats([], (99.0,)) is None


def test_metrics_from_known_timings():
    outcomes = [
        outcome(0, 0.0, 0.100, [0.010] * 9, prompt_len=30),               # 10 tokens in 0.19 s
        outcome(1, 0.0, 0.300, [0.020] * 4, prompt_len=20),               # 5 tokens in 0.38 s
        outcome(2, 0.5, 0.0, [], success=False, error="HTTP 400: too long"),
        outcome(3, 0.6, 0.0, [], success=False, error="HTTP 400: too long"),
    ]
    m = compute_metrics(outcomes, duration_s=2.0, percentiles=(50.0,))
    assert (m.completed, m.failed, m.total_input_tokens, m.total_output_tokens) == (2, 2, 50, 15)
    assert m.request_throughput == pytest.approx(1.0) and m.output_throughput == pytest.approx(7.5)
    assert m.total_token_throughput == pytest.approx(32.5)
    assert m.ttft.mean_ms == pytest.approx(200.0) and m.e2el.mean_ms == pytest.approx(285.0)
    assert m.tpot.mean_ms == pytest.approx(15.0)  # (190-100)/9 = 10 ms and (380-300)/4 = 20 ms
    assert m.itl.count == 13 and m.itl.median_ms == pytest.approx(10.0)
    assert (m.max_concurrent_requests, m.max_output_tokens_per_s) == (2, 15.0)
    assert error_counts(outcomes) == {"HTTP 400: too long": 2}
    flat = m.flat()
    assert flat["p50_ttft_ms"] == pytest.approx(200.0) and flat["completed"] == 2 and flat["duration"] == 2.0


def test_goodput_counts_requests_meeting_every_slo():
    outcomes = [outcome(0, 0.0, 0.100, [0.010] * 9), outcome(1, 0.0, 0.300, [0.020] * 4),
                outcome(2, 0.0, 0.050, [])]  # one token: TPOT 0 for goodput
    assert compute_metrics(outcomes, 2.0).request_goodput is None
    assert compute_metrics(outcomes, 2.0, goodput_slos_ms={"ttft": 200.0}).request_goodput == pytest.approx(1.0)
    both = {"ttft": 400.0, "tpot": 15.0}
    assert compute_metrics(outcomes, 2.0, goodput_slos_ms=both).request_goodput == pytest.approx(1.0)
    assert compute_metrics(outcomes, 2.0, goodput_slos_ms={"e2el": 1000.0}).request_goodput == pytest.approx(1.5)


def test_usage_count_wins_over_chunk_count():
    merged = outcome(0, 0.0, 0.1, [0.1], output_tokens=4)  # 2 chunks carried 4 tokens
    m = compute_metrics([merged], duration_s=1.0)
    assert m.total_output_tokens == 4 and m.tpot.mean_ms == pytest.approx(100 / 3)


def test_in_flight_and_peak_rate():
    runs = [outcome(i, start, 0.1, [0.1] * 4) for i, start in enumerate((0.0, 0.2, 0.4, 2.0))]  # 0.5 s each
    assert max_in_flight(runs) == 3
    assert peak_output_rate(runs) == 15.0  # the first second holds all tokens of three requests
    assert max_in_flight([]) == 0 and peak_output_rate([]) == 0.0


def test_interference_summary():
    runs = [outcome(0, 0.0, 0.05, [0.01] * 99, role="long"),            # ends at 1.04 s
            outcome(1, 0.1, 0.02, [0.01] * 31, role="short"),            # ends at 0.43 s
            outcome(2, 0.9, 0.02, [0.01] * 31, role="short"),            # ends at 1.23 s
            outcome(3, 0.1, 0.0, [], role="short", success=False)]
    w5 = interference_summary(runs, (99.0,))
    assert (w5["num_short"], w5["num_short_completed"], w5["num_short_done_before_long"]) == (3, 2, 1)
    assert w5["long_ttft_ms"] == pytest.approx(50.0) and w5["mean_short_ttft_ms"] == pytest.approx(20.0)
    assert w5["mean_short_e2el_ms"] == pytest.approx(330.0)


PROMETHEUS_TEXT = """\
# HELP vllm:num_preemptions Preemptions.
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0",model_name="m"} 3.0
vllm:num_preemptions_total{engine="1",model_name="m"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
"""


def test_parse_prometheus_samples_sums_labels():
    samples = parse_samples(PROMETHEUS_TEXT)
    assert samples["vllm:num_preemptions_total"] == 5.0 and samples["vllm:kv_cache_usage_perc"] == 0.25


def test_poller_summary_deltas_and_peaks():
    poller = MetricsPoller(http=None, base_url="")
    poller.first = {"vllm:num_preemptions_total": 5.0}
    poller.last = {"vllm:num_preemptions_total": 9.0}
    poller.peaks = {("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"): 0.875}
    summary = poller.summary()
    assert summary.available and summary.num_preemptions == 4.0
    assert summary.peak_kv_cache_usage_pct == pytest.approx(87.5) and summary.peak_num_requests_waiting is None
