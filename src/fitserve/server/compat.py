"""Which request fields fitserve supports: one table, served at GET /v1/compat, printed into
docs/api.md (`python -m fitserve.server.compat`), and enforced for fields it does not implement.

Each field of /v1/chat/completions and /v1/completions is
  supported  - it does what OpenAI (or vLLM, for vLLM's extras) documents;
  ignored    - accepted and without effect: logged once per field name, a 400 under --strict;
  rejected   - a 400 unless it has its default value (a setting fitserve cannot honour).
A field the table does not list is unsupported: treated as `ignored`. tests/test_api_compat.py
fails when a request model accepts a field this table does not list.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel

from fitserve.server.errors import BadRequestError

logger = logging.getLogger(__name__)
Status = Literal["supported", "ignored", "rejected"]
UNLISTED_STATUS = "ignored"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@dataclass(frozen=True, slots=True)
class FieldSupport:
    field: str  # a top-level request field; "a.b" for a field inside an object
    status: Status
    note: str = ""


def _s(field: str, note: str = "") -> FieldSupport:
    return FieldSupport(field, "supported", note)


def _i(field: str, note: str) -> FieldSupport:
    return FieldSupport(field, "ignored", note)


SHARED_FIELDS = (
    _s("model", "optional; must name the served model (404 otherwise)"),
    _s("stream", "Server-Sent Events, ending with `data: [DONE]`"),
    _s("stream_options", "only with `stream`"),
    _s("stream_options.include_usage", "a last chunk with `usage`"),
    _s("stream_options.continuous_usage_stats", "vLLM: `usage` on every chunk"),
    _s("n", "choices per prompt"),
    _s("temperature", "0 = greedy; [0, 2]"),
    _s("top_p"),
    _s("seed", "per-request generator: same seed, same tokens whatever the batch"),
    _s("stop", "strings; not in the output unless include_stop_str_in_output"),
    _s("presence_penalty", "[-2, 2], once per token present in the output"),
    _s("frequency_penalty", "[-2, 2], per occurrence in the output"),
    _s("logit_bias", "token id -> [-100, 100], added to the logits"),
    _i("user", "accepted for compatibility; not recorded"),
    _s("top_k", "vLLM extra"),
    _s("min_p", "vLLM extra"),
    _s("min_tokens", "vLLM extra: EOS, stop token ids and stop strings are held off until this many tokens"),
    _s("repetition_penalty", "vLLM extra: > 0, over prompt and output tokens"),
    _s("stop_token_ids", "vLLM extra"),
    _s("ignore_eos", "vLLM extra"),
    _s("include_stop_str_in_output", "vLLM extra"),
    _s("skip_special_tokens", "vLLM extra"),
    _s("allowed_token_ids", "vLLM extra: only these token ids may be sampled (logprobs stay the model's)"),
    _s("truncate_prompt_tokens", "vLLM extra: the prompt's last k tokens (after the chat template); -1: the last "
       "max_model_len"),
    _s("structured_outputs", "vLLM extra: one of json (a schema), json_object, regex, choice, grammar (Lark); "
       "docs/api.md#structured-output-response_format"),
)

CHAT_FIELDS = SHARED_FIELDS + (
    _s("messages", "roles system, developer, user, assistant (with tool_calls), tool; text content parts"),
    _s("max_tokens", "deprecated by OpenAI; max_completion_tokens wins when both are set"),
    _s("max_completion_tokens"),
    _s("logprobs", "raw log-softmax of the model, before penalties and temperature"),
    _s("top_logprobs", "up to --max-logprobs (default 20)"),
    _s("tools", "function tools (Llama 3 JSON style calls); docs/api.md#tool-calling"),
    _s("tool_choice", "none, auto, required, or a named function (forced by a grammar)"),
    _s("parallel_tool_calls", "false keeps the first call of a reply"),
    _s("response_format", "text, json_object, json_schema (the output follows the schema)"),
    _s("add_generation_prompt", "vLLM extra"),
    _s("continue_final_message", "vLLM extra: the prompt ends inside the final message, which the reply continues "
       "(a prefill); needs add_generation_prompt false"),
    _s("chat_template_kwargs", "vLLM extra: extra variables for the chat template"),
    _i("functions", "deprecated by OpenAI: use `tools`"),
    _i("function_call", "deprecated by OpenAI: use `tool_choice`"),
    _i("metadata", "nothing is stored"),
    _i("store", "nothing is stored"),
    _i("service_tier", "one tier"),
    _i("modalities", "text only"),
    _i("audio", "text only"),
    _i("prediction", "no predicted outputs"),
    _i("reasoning_effort", "no reasoning models"),
    _i("web_search_options", "no web search"),
)

COMPLETION_FIELDS = SHARED_FIELDS + (
    _s("prompt", "a string, strings, token ids, or lists of token ids (one choice each)"),
    _s("max_tokens", "default 16; null: up to the context length"),
    _s("echo", "the prompt before the completion"),
    _s("logprobs", "top logprobs per token, up to --max-logprobs (default 20); with echo, the prompt's too"),
    FieldSupport("suffix", "rejected", "no fill-in-the-middle"),
    _s("best_of", "only equal to n (no extra candidates ranked away); else a 400"),
    _s("response_format", "vLLM extra here (OpenAI's completions have none): text, json_object, json_schema, "
       "as on chat"),
)

TABLE: dict[str, tuple[FieldSupport, ...]] = {CHAT: CHAT_FIELDS, COMPLETIONS: COMPLETION_FIELDS}


def field_status(endpoint: str, field: str) -> Status:
    return next((f.status for f in TABLE[endpoint] if f.field == field), UNLISTED_STATUS)


def unsupported_fields(endpoint: str, body: BaseModel) -> list[str]:
    """Fields set in this request (not null) that fitserve does not implement, in request order.

    A field the request model did not parse (`model_extra`) is unsupported whatever the table
    says of it: the server never read it.
    """
    extra = {name for name, value in (body.model_extra or {}).items() if value is not None}
    ignored = {name for name in body.model_fields_set
               if field_status(endpoint, name) == "ignored" and getattr(body, name) is not None}
    return sorted(extra | ignored)


class UnsupportedParameterError(BadRequestError):
    def __init__(self, field: str, endpoint: str) -> None:
        super().__init__(f"Unsupported parameter: `{field}` is not supported by {endpoint} on this server "
                         "(--strict is on; GET /v1/compat lists the supported fields).",
                         param=field, code="unsupported_parameter")


# Field names come from clients: remember at most this many, so that requests full of made-up
# names can neither grow the set without bound nor flood the log.
MAX_LOGGED_FIELDS = 256
MAX_LOGGED_NAME_CHARS = 64


class CompatChecker:
    """Per app: the --strict setting and the field names already logged."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self._logged: set[tuple[str, str]] = set()

    def check(self, endpoint: str, body: BaseModel) -> None:
        """Under --strict, a 400 naming the first unsupported field; else log each field name once."""
        for field in unsupported_fields(endpoint, body):
            if self.strict:
                raise UnsupportedParameterError(field, endpoint)
            key = (endpoint, field)
            if key in self._logged or len(self._logged) > MAX_LOGGED_FIELDS:
                continue
            self._logged.add(key)
            if len(self._logged) > MAX_LOGGED_FIELDS:  # the first name past the cap: say so once, then stay quiet
                logger.warning("More than %d distinct unsupported field names seen; no longer logging them.",
                               MAX_LOGGED_FIELDS)
                continue
            logger.warning("%s: ignoring the unsupported field %s (logged once; --strict makes it a 400).",
                           endpoint, ascii(field[:MAX_LOGGED_NAME_CHARS]))


def compat_document(strict: bool) -> dict[str, Any]:
    """The body of GET /v1/compat."""
    return {
        "object": "compat",
        "strict": strict,
        "unlisted_fields": "ignored and logged once; a 400 under --strict",
        "endpoints": {endpoint: [asdict(f) for f in fields] for endpoint, fields in TABLE.items()},
    }


def markdown_tables() -> str:
    """The tables of docs/api.md, one per endpoint."""
    lines: list[str] = []
    for endpoint, fields in TABLE.items():
        lines += [f"`POST {endpoint}`", "", "| field | status | note |", "|---|---|---|"]
        lines += [f"| `{f.field}` | {f.status} | {f.note} |" for f in fields]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(markdown_tables())
