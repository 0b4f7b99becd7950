"""Engine metrics (engine/metrics.py) and GET /metrics under vLLM's names (server/metrics.py)."""

from __future__ import annotations

from dataclasses import replace

import httpx
import openai
import pytest
from fake_engine import FakeTokenizer
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import FAKE_API_KEY, live_server

from fitserve.core.scheduler import SchedulerLimits
from fitserve.engine.async_engine import AsyncEngine
from fitserve.engine.llm_engine import EngineLimits, LLMEngine
from fitserve.engine.metrics import EngineMetrics, Histogram, one_two_five_buckets
from fitserve.sampling_params import SamplingParams
from fitserve.server.app import build_app
from fitserve.server.metrics import admissible_requests
from fitserve.testing import FakeDecoder, FakeRunner, idle_engine_stats

VOCAB_SIZE = 1000
MAX_MODEL_LEN = 256


class StepClock:
    """Each reading advances 10 ms: deterministic latencies."""

    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        self.now_s += 0.01
        return self.now_s


def make_engine(num_blocks: int = 128, max_num_seqs: int = 8, clock=None) -> LLMEngine:
    runner = FakeRunner(num_blocks=num_blocks, block_size=4, vocab_size=VOCAB_SIZE)
    limits = EngineLimits(VOCAB_SIZE, (VOCAB_SIZE - 1,), SchedulerLimits(max_num_seqs, 64, MAX_MODEL_LEN))
    metrics = EngineMetrics(MAX_MODEL_LEN, cache_info={"block_size": "4", "enable_prefix_caching": "True"},
                            clock=clock or StepClock())
    return LLMEngine(runner, FakeDecoder(), limits, metrics=metrics)


def run_to_completion(engine: LLMEngine) -> None:
    while engine.has_unfinished:
        engine.step()
        engine.check_invariants()


def test_token_counts_and_latencies_per_request():
    engine = make_engine()
    for i in range(3):
        request = engine.make_request(f"r{i}", [1, 2, 3, 4, 5], SamplingParams(max_tokens=6, ignore_eos=True))
        request.arrival_time_s = 100.0
        engine.add_request(request)
    run_to_completion(engine)
    snap = engine.metrics.snapshot()
    assert snap.prompt_tokens_total == 15 and snap.generation_tokens_total == 18
    assert snap.finished_total == {"stop": 0, "length": 3, "abort": 0}
    h = snap.histograms
    assert h["time_to_first_token_seconds"].count == 3
    assert h["inter_token_latency_seconds"].count == 3 * 5  # one per token after the first
    assert h["e2e_request_latency_seconds"].count == h["request_queue_time_seconds"].count == 3
    assert h["request_generation_tokens"].sum == 18 and h["request_prompt_tokens"].sum == 15
    assert h["iteration_tokens_total"].count == engine.num_steps
    # the prompts, less the first block (4 tokens) that r1 and r2 find cached, then one token per decode
    assert h["iteration_tokens_total"].sum == 15 - 2 * 4 + 3 * 5
    assert (snap.prefix_cache.queries, snap.prefix_cache.hits) == (15, 2 * 4)
    assert h["time_to_first_token_seconds"].sum > 0 and h["inter_token_latency_seconds"].sum > 0


def test_aborts_are_counted_and_queued_aborts_add_no_prompt_tokens():
    engine = make_engine(max_num_seqs=1)
    for i in range(2):
        engine.add_request(engine.make_request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True)))
    engine.step()  # r0 runs, r1 waits (one sequence at a time)
    engine.abort_request("r1")
    engine.abort_request("r0")
    engine.check_invariants()
    snap = engine.metrics.snapshot()
    assert snap.finished_total["abort"] == 2
    assert snap.prompt_tokens_total == 3  # only r0's prompt was processed
    assert engine.metrics.num_tracked_requests == 0


def test_histogram_buckets_are_prometheus_le():
    hist = Histogram((0.1, 1.0))
    for value in (0.1, 0.5, 1.0, 3.0):
        hist.observe(value)
    assert hist.snapshot().cumulative() == [(0.1, 1), (1.0, 3), (float("inf"), 4)]
    assert one_two_five_buckets(100) == (1, 2, 5, 10, 20, 50, 100)


def test_admissible_requests():
    stats = idle_engine_stats(block_size_tokens=16, num_free_kv_blocks=100, max_num_seqs=8, num_requests_running=2)
    assert admissible_requests(stats, 512) == 3  # 100 blocks // 32 blocks each
    assert admissible_requests(stats, 16) == 6  # capped by the free --max-num-seqs slots
    assert admissible_requests(replace(stats, num_requests_waiting=1), 16) == 0


@pytest.fixture
def served():
    engine = AsyncEngine(make_engine(num_blocks=24, max_num_seqs=8, clock=None), "fake-metrics", FakeTokenizer())
    engine.start()
    with live_server(build_app(engine)) as url:
        yield url, engine
    engine.shutdown()


def scrape(url: str) -> dict[str, list]:
    response = httpx.get(url + "/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list], name: str, **labels: str) -> float:
    matching = [s.value for s in samples[name] if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matching) == 1, (name, labels, samples.get(name))
    return matching[0]


def test_metrics_endpoint_speaks_vllms_names(served):
    url, engine = served
    with openai.OpenAI(base_url=url + "/v1", api_key=FAKE_API_KEY, max_retries=0, timeout=30) as client:
        for _ in range(4):  # 24 blocks of 4 tokens: 4 requests of 40 tokens each cannot all fit at once
            client.completions.create(model="fake-metrics", prompt=[1] * 8, max_tokens=32,
                                      extra_body={"ignore_eos": True})
    samples = scrape(url)
    labels = {"model_name": "fake-metrics", "engine": "0"}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:num_preemptions_total", "fitserve:kv_cache_free_tokens"):
        value(samples, name, **labels)
    assert value(samples, "vllm:prompt_tokens_total", **labels) == 4 * 8
    assert value(samples, "vllm:generation_tokens_total", **labels) == 4 * 32
    # prefix caching: each prompt's 8 tokens are queried; the last 3 find the first block of 4
    # (the second block holds the last token, which is always computed)
    assert value(samples, "vllm:prefix_cache_queries_total", **labels) == 4 * 8
    assert value(samples, "vllm:prefix_cache_hits_total", **labels) == 3 * 4
    assert value(samples, "vllm:cache_config_info", enable_prefix_caching="True", engine="0") == 1
    assert value(samples, "vllm:request_success_total", finished_reason="length", **labels) == 4
    assert value(samples, "vllm:time_to_first_token_seconds_count", **labels) == 4
    assert value(samples, "vllm:inter_token_latency_seconds_count", **labels) == 4 * 31
    assert value(samples, "vllm:e2e_request_latency_seconds_count", **labels) == 4
    buckets = [s for s in samples["vllm:time_to_first_token_seconds_bucket"] if s.labels["le"] == "+Inf"]
    assert buckets[0].value == 4
    assert value(samples, "vllm:cache_config_info", block_size="4", engine="0") == 1
    assert value(samples, "fitserve:kv_cache_capacity_tokens", **labels) == 24 * 4
    assert value(samples, "fitserve:num_requests_admissible", context_tokens="256", **labels) == 0  # 64 blocks
    assert value(samples, "fitserve:num_requests_admissible", context_tokens="512", **labels) == 0
    assert value(samples, "vllm:kv_cache_usage_perc", **labels) == 0.0  # all finished


def test_preemptions_reach_the_counter():
    engine = make_engine(num_blocks=24)  # 96 tokens of cache: four 40-token requests preempt each other
    for i in range(4):
        engine.add_request(engine.make_request(f"r{i}", [1] * 8, SamplingParams(max_tokens=32, ignore_eos=True)))
    run_to_completion(engine)
    assert engine.scheduler.num_preemptions_total > 0
    client = AsyncEngine(engine, "fake-metrics", FakeTokenizer())  # not started: /metrics only reads stats()
    with live_server(build_app(client)) as url:
        samples = scrape(url)
    assert value(samples, "vllm:num_preemptions_total", model_name="fake-metrics", engine="0") \
        == engine.scheduler.num_preemptions_total


def test_metrics_before_the_engine_is_attached():
    app = build_app()
    with live_server(app) as url:
        response = httpx.get(url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert "vllm:" not in response.text
