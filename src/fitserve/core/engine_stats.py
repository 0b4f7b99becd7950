"""What the engine reports about itself at one moment: `EngineStats` (torch-free).

`LLMEngine.stats()` builds one; /metrics (server/metrics.py), the page's info (server/ui/info.py),
the telemetry's stats line (telemetry/monitor.py) and benchmarks read its attributes. The
counters and histograms the engine thread records (engine/metrics.py) travel in it as a
`MetricsSnapshot`, a frozen copy taken under that module's lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fitserve.core.kv_cache_manager import PrefixCacheStats


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    upper_bounds: tuple[float, ...]
    bucket_counts: tuple[int, ...]  # per bucket (not cumulative); the last one is +Inf
    sum: float
    count: int

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it), ending with (inf, count): Prometheus' `le` buckets."""
        running = 0
        out = []
        for bound, count in zip((*self.upper_bounds, float("inf")), self.bucket_counts):
            running += count
            out.append((bound, running))
        return out


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    prompt_tokens_total: int
    generation_tokens_total: int
    finished_total: dict[str, int]  # finish reason -> requests
    histograms: dict[str, HistogramSnapshot]  # by vLLM metric name, without the "vllm:" prefix
    cache_info: dict[str, str] = field(default_factory=dict)  # vllm:cache_config_info labels
    prefix_cache: PrefixCacheStats = field(default_factory=PrefixCacheStats)  # totals since start-up, in tokens

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        """Hit tokens / queried tokens of new requests since start-up (None before any query)."""
        queries = self.prefix_cache.queries
        return self.prefix_cache.hits / queries if queries else None


@dataclass(frozen=True, slots=True)
class EngineStats:
    """The scheduler's gauges, the KV cache's size and use, and the counters since start-up."""

    num_requests_running: int
    num_requests_waiting: int
    kv_cache_used_fraction: float  # used blocks / all blocks, 0..1 (vllm:kv_cache_usage_perc)
    num_kv_blocks: int  # the whole cache, per layer
    num_free_kv_blocks: int  # blocks a new request may take (cached prefixes included: they are evictable)
    num_free_kv_tokens: int
    num_cached_kv_blocks: int  # blocks that hold a reusable prefix (in use or free)
    block_size_tokens: int
    enable_prefix_caching: bool
    max_num_seqs: int
    max_model_len_tokens: int
    num_preemptions_total: int
    num_steps_total: int
    metrics: MetricsSnapshot  # token counters, finished requests, latency histograms, prefix-cache lookups
    monotonic_time_s: float  # time.monotonic() when it was taken

    @property
    def num_prompt_tokens_total(self) -> int:
        """Prompt tokens of requests that produced a first token (vllm:prompt_tokens)."""
        return self.metrics.prompt_tokens_total

    @property
    def num_generation_tokens_total(self) -> int:
        return self.metrics.generation_tokens_total

    @property
    def prefix_cache_queried_tokens_total(self) -> int:
        return self.metrics.prefix_cache.queries

    @property
    def prefix_cache_hit_tokens_total(self) -> int:
        return self.metrics.prefix_cache.hits

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        return self.metrics.prefix_cache_hit_rate

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size_tokens

    @property
    def is_busy(self) -> bool:
        """Requests running or waiting."""
        return self.num_requests_running > 0 or self.num_requests_waiting > 0
