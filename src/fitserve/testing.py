"""Fakes for tests and for benchmarking the engine without a model (torch-free)."""

from __future__ import annotations

from fitserve.core.interfaces import KVCapacity
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

    def kv_capacity(self) -> KVCapacity:
        return self.capacity

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        self.num_steps += 1
        self.live_request_ids -= scheduler_output.finished_request_ids
        sampled = {}
        for chunk in scheduler_output.scheduled:
            assert chunk.num_tokens >= 1
            assert len(chunk.block_table) * self.capacity.block_size >= chunk.seq_len, "block table too short"
            self.live_request_ids.add(chunk.request_id)
            if chunk.samples:
                sampled[chunk.request_id] = (chunk.token_ids[-1] + 1) % self.vocab_size
        return RunnerOutput(sampled_token_ids=sampled)


class FakeDecoder:
    """Token id t decodes to the word ' t' (special tokens: none)."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" {t}" for t in token_ids)
