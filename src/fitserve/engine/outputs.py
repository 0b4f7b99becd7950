"""What the engine hands the HTTP layer for each request, step by step (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from fitserve.core.outputs import TokenLogprobs


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """The increment of one request produced by one engine step."""

    request_id: str
    new_token_ids: tuple[int, ...]  # tokens sampled since the previous output
    new_text: str  # text since the previous output (held back while it may start a stop string)
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished, else None
    stop_reason: int | str | None  # the stop token id or stop string that ended it, if any
    num_prompt_tokens: int
    num_output_tokens: int  # cumulative, as counted for `usage.completion_tokens`
    # Only for requests that asked: one entry per new token (SamplingParams.logprobs), and with the
    # first output, one per prompt token, the first None (SamplingParams.prompt_logprobs).
    new_logprobs: tuple[TokenLogprobs, ...] | None = None
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None
