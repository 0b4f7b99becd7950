"""The state of one generation request as the scheduler sees it (torch-free)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from fitserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # never scheduled, or preempted and queued to be recomputed
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the context length reached
    FINISHED_ABORTED = "abort"  # client went away, or the server cancelled it

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI `finish_reason` for a finished status, else None."""
        return self.value if self.finished else None


_FINISHED = {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED}


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling_params: SamplingParams
    arrival_time_s: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    # Tokens (prompt then outputs) whose K/V are in the cache. Reset to 0 on preemption.
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    # Tokens sampled by steps already launched but not yet appended to output_token_ids: with
    # async scheduling the next step is planned while the last one runs (0 or 1 when planning).
    num_pending_outputs: int = 0
    stop_reason: int | str | None = None  # the stop token id or string that ended it
    grammar: Any = None  # structured output: the engine's RequestGrammar (engine/structured_output.py)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids_slice(self, start: int, end: int) -> tuple[int, ...]:
        """Tokens [start, end) of the prompt followed by the outputs."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        head = self.prompt_token_ids[start:] if start < num_prompt else ()
        out_start = max(start - num_prompt, 0)
        return tuple(head) + tuple(self.output_token_ids[out_start : end - num_prompt])
