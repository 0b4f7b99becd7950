"""Caps on the work one request may create: choices (`n`), prompts, n x prompts and prompt tokens,
checked before anything is tokenized (the prompt token total as each prompt is), plus the engine's
admission capacity: a request that could never be admitted is a 400, one that cannot be now a 503.
Defaults and flags in docs/reliability.md ("Request caps")."""

from __future__ import annotations

from dataclasses import dataclass

from fitserve.config import (
    DEFAULT_MAX_CHOICES_PER_REQUEST,
    DEFAULT_MAX_N,
    DEFAULT_MAX_PROMPT_TOKENS_PER_REQUEST,
    DEFAULT_MAX_PROMPTS_PER_REQUEST,
)
from fitserve.engine.client import EngineClient
from fitserve.server.errors import BadRequestError, ServerOverloadedError


@dataclass(frozen=True, slots=True)
class RequestCaps:
    """The work one request may create, checked before anything is tokenized (docs/reliability.md)."""

    max_n: int = DEFAULT_MAX_N  # choices per request (--max-n)
    max_prompts_per_request: int = DEFAULT_MAX_PROMPTS_PER_REQUEST  # prompts in a completions list
    max_choices_per_request: int = DEFAULT_MAX_CHOICES_PER_REQUEST  # n x prompts: engine requests created
    max_prompt_tokens_per_request: int = DEFAULT_MAX_PROMPT_TOKENS_PER_REQUEST  # all prompts together


def check_fan_out(caps: RequestCaps, engine: EngineClient, num_prompts: int, n: int, prompt_param: str) -> None:
    """Refuse, before anything is tokenized, a request that would create too many engine
    requests: over a cap (400), more than the engine ever admits (400), or more than it
    admits now (503)."""
    if n > caps.max_n:
        raise BadRequestError(f"`n` is too large: {n}; this server allows at most {caps.max_n} choices per "
                              "request (--max-n).", param="n")
    if num_prompts > caps.max_prompts_per_request:
        raise BadRequestError(f"`{prompt_param}` has too many prompts: {num_prompts}; this server allows at most "
                              f"{caps.max_prompts_per_request} per request (--max-prompts-per-request).",
                              param=prompt_param)
    num_choices = n * num_prompts
    if num_choices > caps.max_choices_per_request:
        raise BadRequestError(f"This request asks for {num_choices} choices ({num_prompts} prompts x n={n}); this "
                              f"server allows at most {caps.max_choices_per_request} per request "
                              "(--max-choices-per-request).", param="n")
    capacity = engine.max_num_in_flight
    if capacity is None:
        return
    if num_choices > capacity:  # retrying could never help: a 400, not a 503
        raise BadRequestError(f"This request needs {num_choices} engine requests ({num_prompts} prompts x n={n}), "
                              f"more than this server ever holds at once ({capacity}: --max-num-seqs plus "
                              "--max-queue-len).", param="n")
    num_in_flight = engine.num_requests_in_flight
    if num_in_flight + num_choices > capacity:
        raise ServerOverloadedError(f"The server is at capacity: {num_in_flight} requests are in flight and this "
                                    f"one needs {num_choices} more (--max-num-seqs plus --max-queue-len is "
                                    f"{capacity}). Retry later.")


def check_prompt_tokens(caps: RequestCaps, num_prompt_tokens: int, prompt_param: str) -> None:
    """A running total of a request's prompt tokens, checked as each prompt is tokenized."""
    cap = caps.max_prompt_tokens_per_request
    if num_prompt_tokens > cap:
        raise BadRequestError(f"`{prompt_param}` has too many tokens: more than {cap} in all, this server's limit "
                              "per request (--max-prompt-tokens-per-request).", param=prompt_param)
