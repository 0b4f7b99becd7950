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
    _s("presence_penalty"),
    _s("frequency_penalty"),
    _s("logit_bias"),
    _i("user", "accepted for compatibility; not recorded"),
    _s("top_k", "vLLM extra"),
    _s("min_p", "vLLM extra"),
    _s("min_tokens", "vLLM extra: EOS and stop token ids are held off until this many tokens"),
    _s("stop_token_ids", "vLLM extra"),
    _s("ignore_eos", "vLLM extra"),
    _s("include_stop_str_in_output", "vLLM extra"),
    _s("skip_special_tokens", "vLLM extra"),
)

CHAT_FIELDS = SHARED_FIELDS + (
    _s("messages", "roles system, developer, user, assistant (with tool_calls), tool; text content parts"),
    _s("max_tokens", "deprecated by OpenAI; max_completion_tokens wins when both are set"),
    _s("max_completion_tokens"),
    _s("logprobs"),
    _s("top_logprobs"),
    _s("tools", "function tools (Llama 3 JSON style calls); docs/api.md#tool-calling"),
    _s("tool_choice", "none, auto, required, or a named function (forced by a grammar)"),
    _s("parallel_tool_calls", "false keeps the first call of a reply"),
    _s("response_format", "text, json_object, json_schema (the output follows the schema)"),
    _s("add_generation_prompt", "vLLM extra"),
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
    _s("logprobs"),
    FieldSupport("suffix", "rejected", "no fill-in-the-middle"),
    FieldSupport("best_of", "rejected", "only 1"),
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
            if (endpoint, field) not in self._logged:
                self._logged.add((endpoint, field))
                logger.warning("%s: ignoring the unsupported field `%s` (logged once; --strict makes it a 400).",
                               endpoint, field)


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
