"""The seams that let CPU bookkeeping and device work be built and tested apart.

The engine sees a model runner only through `ModelRunner`; a fake that returns
`(last token + 1) % vocab` stands in for it in scheduler, engine and API tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from fitserve.core.outputs import RunnerOutput, SchedulerOutput


@dataclass(frozen=True, slots=True)
class KVCapacity:
    num_blocks: int  # KV blocks allocated per layer
    block_size: int  # tokens per block

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


class ModelRunner(Protocol):
    """`execute` runs one step to its sampled tokens.

    A runner may also offer `execute_async(scheduler_output, previous=None) -> PendingOutput`,
    which returns once the step is queued on the device; the engine then does host work
    (detokenizing the previous step) before it waits. Without it the engine calls `execute`.
    With async scheduling the engine launches a step before the previous one is resolved:
    `previous` is that step, whose sampled ids fill the new step's placeholder tokens.
    """

    def kv_capacity(self) -> KVCapacity: ...

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput: ...
