"""Fakes for tests and for benchmarking the engine without a model (torch-free)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from fitserve.core.engine_stats import EngineStats, MetricsSnapshot
from fitserve.core.interfaces import KVCapacity, PendingOutput, Ready
from fitserve.core.outputs import RunnerOutput, SchedulerOutput


class FakeRunner:
    """Samples `(last fed token + 1) % vocab_size`, and checks the plan it is handed.

    Deterministic and independent of batching, so a request's output must not change with
    what else runs beside it or with preemption: the property real runs are tested for.
    """

    def __init__(self, num_blocks: int = 64, block_size: int = 4, vocab_size: int = 1000) -> None:
        self.capacity = KVCapacity(num_blocks=num_blocks, block_size=block_size)
        self.vocab_size = vocab_size
        self.num_steps = 0
        self.live_request_ids: set[str] = set()  # requests seen and not yet reported finished
        self.num_shutdowns = 0

    def kv_capacity(self) -> KVCapacity:
        return self.capacity

    def shutdown(self) -> None:
        """Nothing to release; counted, so tests can see the engine pass its shutdown on."""
        self.num_shutdowns += 1

    def execute_async(self, scheduler_output: SchedulerOutput, previous: PendingOutput | None = None
                      ) -> PendingOutput:
        """Runs the step at once; placeholders (async scheduling) take `previous`'s sampled ids."""
        if any(chunk.feeds_placeholder for chunk in scheduler_output.scheduled):
            assert previous is not None, "a placeholder needs the step in flight"
            sampled = previous.result().sampled_token_ids
            scheduled = tuple(replace(chunk, token_ids=(sampled[chunk.request_id],)) if chunk.feeds_placeholder
                              else chunk for chunk in scheduler_output.scheduled)
            scheduler_output = replace(scheduler_output, scheduled=scheduled)
        return Ready(self.execute(scheduler_output))

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        self.num_steps += 1
        self.live_request_ids -= scheduler_output.finished_request_ids
        sampled = {}
        for chunk in scheduler_output.scheduled:
            assert chunk.num_tokens >= 1 and not chunk.feeds_placeholder, "placeholders go to execute_async"
            assert len(chunk.block_table) * self.capacity.block_size >= chunk.seq_len, "block table too short"
            assert len(chunk.group_block_tables) == len(self.capacity.windows) - 1, "one table per KV cache group"
            assert all(len(t) == len(chunk.block_table) for t in chunk.group_block_tables), "group tables differ"
            self.live_request_ids.add(chunk.request_id)
            if chunk.samples:
                sampled[chunk.request_id] = self._next_token(chunk.token_ids[-1], chunk.allowed_token_bitmask)
        return RunnerOutput(sampled_token_ids=sampled)

    def _next_token(self, last_token_id: int, allowed_token_bitmask: bytes | None) -> int:
        """(last + 1) % vocab, or under a grammar the first allowed token from there on."""
        token_id = (last_token_id + 1) % self.vocab_size
        if allowed_token_bitmask is None:
            return token_id
        allowed = int.from_bytes(allowed_token_bitmask, "little")  # bit t = token t
        for offset in range(self.vocab_size):
            candidate = (token_id + offset) % self.vocab_size
            if allowed >> candidate & 1:
                return candidate
        raise AssertionError("a grammar mask allowed no token")


class FakeDecoder:
    """Token id t decodes to the word ' t' (special tokens: none)."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" {t}" for t in token_ids)


def idle_engine_stats(**changes: Any) -> EngineStats:
    """The stats of an engine with no KV cache and nothing counted yet, with `changes` applied
    (EngineStats' field names): what fake engines report, and a base for made-up stats."""
    stats = EngineStats(
        num_requests_running=0, num_requests_waiting=0, kv_cache_used_fraction=0.0, num_kv_blocks=0,
        num_free_kv_blocks=0, num_free_kv_tokens=0, num_cached_kv_blocks=0, block_size_tokens=0,
        enable_prefix_caching=False, max_num_seqs=0, max_model_len_tokens=0, num_preemptions_total=0,
        num_steps_total=0, metrics=MetricsSnapshot(0, 0, {}, {}), monotonic_time_s=0.0)
    return replace(stats, **changes)
