"""The seams that let CPU bookkeeping and device work be built and tested apart.

The engine sees a model runner only through `ModelRunner`; a fake that returns
`(last token + 1) % vocab` stands in for it in scheduler, engine and API tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from fitserve.core.outputs import RunnerOutput, SchedulerOutput


@dataclass(frozen=True, slots=True)
class KVCapacity:
    num_blocks: int  # KV blocks in the pool (each holds block_size tokens of every layer of one group)
    block_size: int  # tokens per block
    # The sliding window every layer shares (Mistral v0.1, Phi-3), in tokens; None when a layer sees the
    # whole context. With it the cache manager frees the blocks a request's window has left behind.
    sliding_window_tokens: int | None = None
    # Models mixing windowed and full layers (Gemma 2/3): the window of each KV cache group (None: full
    # attention), kv_groups.KVLayout.windows; () for one group (then sliding_window_tokens above).
    group_windows: tuple[int | None, ...] = ()

    @property
    def windows(self) -> tuple[int | None, ...]:
        """The window of each group: one group unless the model is hybrid."""
        return self.group_windows or (self.sliding_window_tokens,)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


class PendingOutput(Protocol):
    """A step launched on the device; `result()` waits for its sampled tokens."""

    def result(self) -> RunnerOutput: ...


@dataclass(frozen=True, slots=True)
class Ready:
    """A PendingOutput that was ready when it was launched (runners that run a step at once)."""

    output: RunnerOutput

    def result(self) -> RunnerOutput:
        return self.output


@runtime_checkable
class ModelRunner(Protocol):
    """What the engine asks of a runner: its KV capacity, a step, and its release.

    `execute` runs one step to its sampled tokens. `execute_async` returns once the step is
    queued on the device; the engine then does host work (detokenizing the previous step)
    before it waits on the PendingOutput. A runner that has no asynchronous path runs the step
    at once and returns it `Ready`. With async scheduling the engine launches a step before the
    previous one is resolved: `previous` is that step, whose sampled ids fill the new step's
    placeholder tokens (a runner that cannot fill them never gets async scheduling).
    `shutdown` releases what the runner holds outside this process (tensor-parallel workers);
    idempotent, and a no-op for a runner that holds nothing.
    """

    def kv_capacity(self) -> KVCapacity: ...

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput: ...

    def execute_async(self, scheduler_output: SchedulerOutput, previous: PendingOutput | None = None
                      ) -> PendingOutput: ...

    def shutdown(self) -> None: ...
