"""Compile the kernels' variants at start-up instead of in the first requests' steps.

Triton compiles a kernel once per specialization of its integer arguments (equal to 1,
divisible by 16, or neither) and caches it on disk. On a fresh machine the first step whose
token count, sequence count or context length falls in a new class waits for that compile,
0.5-1 s: the first workload after start-up showed it as a stall (TTFT p99 757 ms against about
250 ms, TPOT unchanged). Graph capture covers the decode steps; these few eager steps, each
feeding tokens into the still empty KV cache, cover the classes prefill and mixed steps reach.
"""

from __future__ import annotations

from typing import Protocol

from fitserve.core.interfaces import KVCapacity
from fitserve.core.outputs import RunnerOutput, SchedulerOutput
from fitserve.runner.input_batch import chunks_on_blocks
from fitserve.sampling_params import SamplingParams

# Each step: per request, (tokens fed, tokens already in the cache).
WARM_UP_STEPS: tuple[tuple[tuple[int, int], ...], ...] = (
    ((1, 0),),  # one token, outside a graph
    ((16, 0),),
    ((17, 0),),
    ((5, 0), (1, 7), (1, 9)),  # a prompt chunk beside two decodes
    ((17, 16), (16, 33)),  # chunks after cached context
    ((3, 0),) * 5,  # several short prompts
)
_GREEDY = SamplingParams(max_tokens=1, temperature=0.0)


class _Runner(Protocol):
    capacity: KVCapacity

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput: ...


def warm_up(runner: _Runner) -> int:
    """Run WARM_UP_STEPS through the runner (greedy, so no random state moves); returns how many
    ran (a step needing more KV blocks than the cache has is skipped). The blocks written hold
    nothing any request reads: every request writes a slot before attention reads it."""
    num_ran = 0
    for index, step in enumerate(WARM_UP_STEPS):
        chunks = chunks_on_blocks([((0,) * num_new, num_cached) for num_new, num_cached in step],
                                  f"warm-up-{index}", runner.capacity.block_size, _GREEDY)
        if chunks[-1].block_table[-1] >= runner.capacity.num_blocks:
            continue
        finished = frozenset(chunk.request_id for chunk in chunks)
        runner.execute(SchedulerOutput(scheduled=tuple(chunks), finished_request_ids=frozenset()))
        runner.execute(SchedulerOutput(scheduled=(), finished_request_ids=finished))  # the sampler forgets them
        num_ran += 1
    return num_ran
