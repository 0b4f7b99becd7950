"""The limits one request must fit, checked in one place for every request the engine takes
(torch-free).

`check_request` is the only check of the context length, the room left for `max_tokens`, the
KV cache's total size, empty prompts, token ids outside the vocabulary and `--max-logprobs`.
It raises `RequestLimitError`, which names the limit and the engine's own parameter
(a SamplingParams field, or "prompt"); the HTTP layer renames the parameter to the field the
client sent (`max_completion_tokens`, `top_logprobs`, `messages`) with `message_for`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from fitserve.engine.errors import InvalidRequestError
from fitserve.sampling_params import SamplingParams

NUM_SHOWN_BAD_IDS = 5  # token ids quoted in a vocabulary error; the rest are left out


class Limit(enum.Enum):
    EMPTY_PROMPT = "empty_prompt"  # a prompt of no tokens
    VOCABULARY = "vocabulary"  # a token id outside [0, vocab_size)
    CONTEXT_LENGTH = "max_model_len"  # prompt + max_tokens past --max-model-len
    KV_CACHE = "kv_cache"  # prompt + max_tokens past what the whole KV cache holds
    MAX_LOGPROBS = "max_logprobs"  # more top logprobs than --max-logprobs


@dataclass(frozen=True, slots=True)
class RequestLimits:
    max_model_len: int  # prompt + output tokens one request may reach
    vocab_size: int  # valid token ids: 0 to vocab_size - 1
    max_logprobs: int  # top logprobs per token a request may ask for (--max-logprobs)
    num_kv_tokens: int | None = None  # tokens the whole KV cache holds; None: not checked


class RequestLimitError(InvalidRequestError):
    """A request over one of the engine's limits (HTTP 400).

    `param` is the engine's name of the parameter at fault; the message is written with
    `{param}` in its place, so `message_for` can name the field the client actually sent.
    """

    def __init__(self, limit: Limit, param: str, template: str) -> None:
        self.limit = limit
        self.template = template
        super().__init__(template.format(param=param), param)

    def message_for(self, client_param: str) -> str:
        return self.template.format(param=client_param)


def check_request(prompt_token_ids: Sequence[int], params: SamplingParams, limits: RequestLimits) -> int:
    """Raise RequestLimitError unless the request fits; returns its max_tokens, resolved
    (None becomes the room left in the context and the KV cache)."""
    num_prompt_tokens = len(prompt_token_ids)
    if num_prompt_tokens == 0:
        raise RequestLimitError(Limit.EMPTY_PROMPT, "prompt", "The prompt is empty: send at least one token.")
    _check_token_ids(prompt_token_ids, "prompt", limits.vocab_size)
    _check_token_ids(params.stop_token_ids, "stop_token_ids", limits.vocab_size)
    _check_token_ids([token_id for token_id, _ in params.logit_bias], "logit_bias", limits.vocab_size)
    _check_token_ids(params.allowed_token_ids, "allowed_token_ids", limits.vocab_size)
    max_tokens = _check_length(num_prompt_tokens, params.max_tokens, limits)
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and value > limits.max_logprobs:
            raise RequestLimitError(
                Limit.MAX_LOGPROBS, name, f"`{{param}}` is too large: {value}; this server allows at most "
                f"{limits.max_logprobs} (--max-logprobs).")
    return max_tokens


def _check_token_ids(token_ids: Sequence[int], param: str, vocab_size: int) -> None:
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        shown = ", ".join(str(t) for t in bad[:NUM_SHOWN_BAD_IDS]) + (", ..." if len(bad) > NUM_SHOWN_BAD_IDS else "")
        raise RequestLimitError(Limit.VOCABULARY, param, f"`{{param}}` has token ids outside the vocabulary: "
                                f"{shown} (valid ids: 0 to {vocab_size - 1}).")


def _check_length(num_prompt_tokens: int, max_tokens: int | None, limits: RequestLimits) -> int:
    max_model_len = limits.max_model_len
    if num_prompt_tokens >= max_model_len:
        raise RequestLimitError(
            Limit.CONTEXT_LENGTH, "prompt",
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{num_prompt_tokens} input tokens (`{{param}}`), which leaves no room for output. "
            "Please reduce the length of the input.")
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise RequestLimitError(
            Limit.CONTEXT_LENGTH, "max_tokens",
            f"`{{param}}` is too large: {max_tokens}. This model's maximum context length is {max_model_len} "
            f"tokens and your request has {num_prompt_tokens} input tokens "
            f"({max_tokens} > {max_model_len} - {num_prompt_tokens}).")
    num_kv_tokens = limits.num_kv_tokens
    if num_kv_tokens is None:
        return max_model_len - num_prompt_tokens if max_tokens is None else max_tokens
    # A request longer than the whole cache could only run by preempting itself, forever.
    if num_prompt_tokens >= num_kv_tokens:
        raise RequestLimitError(
            Limit.KV_CACHE, "prompt",
            f"Your request has {num_prompt_tokens} input tokens (`{{param}}`), but this server's whole KV cache "
            f"holds {num_kv_tokens} tokens, so it could never run. Reduce the input, or start the server "
            "with a larger KV cache.")
    if max_tokens is None:
        return min(max_model_len, num_kv_tokens) - num_prompt_tokens
    if num_prompt_tokens + max_tokens > num_kv_tokens:
        raise RequestLimitError(
            Limit.KV_CACHE, "max_tokens",
            f"`{{param}}` is too large: {max_tokens}. This server's whole KV cache holds {num_kv_tokens} tokens "
            f"and your request has {num_prompt_tokens} input tokens ({max_tokens} > {num_kv_tokens} - "
            f"{num_prompt_tokens}), so it could never run.")
    return max_tokens
