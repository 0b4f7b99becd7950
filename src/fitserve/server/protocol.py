"""Pydantic models of the OpenAI-compatible HTTP API: requests, responses, stream chunks.

Only shapes and field-level checks live here; behaviour (tokenizing, calling the engine,
streaming) lives in `serving_*.py`. Field names follow the OpenAI API plus vLLM's extras
(top_k, min_p, stop_token_ids, ignore_eos, ...), so clients written for vLLM work as they are.
Unknown top-level request fields are kept in `model_extra`: server/compat.py logs them once, or
with --strict answers 400 naming them. Tool and response_format models are in protocol_tools.py.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from fitserve.sampling_params import SamplingParams
from fitserve.server.protocol_tools import (ChatTool, DeltaToolCall, ResponseFormat, StructuredOutputs, ToolCall,
                                            ToolChoice)
from fitserve.structured_params import StructuredOutputParams

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the legacy completions API's default, as OpenAI and vLLM have it
# Integers reach torch as int64 (seeds, top-k): a larger one would fail inside the engine loop
# and take every request down with it, so it is a 400 here. Types are strict where OpenAI's are:
# `true` is not a number, `"yes"` or 1 not a boolean, `2.0` or `"2"` not an integer (a float field
# takes an integer, as JSON numbers go).
Int64 = Annotated[int, Strict(), Field(ge=-(2**63), le=2**63 - 1)]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
INVALID_TEXT_ERROR = "invalid_text"  # the pydantic error type of a string that is not valid Unicode


NUMBER_TYPES = {int, float, bool}


def unpaired_surrogate_path(data: Any) -> str | None:
    """The dotted path of the first string in `data` (parsed JSON) that holds an unpaired UTF-16
    surrogate such as "\\ud800": JSON can spell one, but it is no text a tokenizer can read.
    A list of numbers alone (a prompt of token ids) is passed over at C speed."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and not _encodes(value):
                return path
        elif isinstance(value, dict):
            for key, item in value.items():
                item_path = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and not _encodes(key):  # named escaped: the answer must encode
                    return f"{path}.{key!a}" if path else ascii(key)
                stack.append((item_path, item))
        elif isinstance(value, list) and not set(map(type, value)) <= NUMBER_TYPES:  # not just token ids
            stack.extend((f"{path}.{i}" if path else str(i), item) for i, item in enumerate(value))
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(data: Any) -> Any:
    """A model's `before` validator: a request with an unpaired surrogate is a 400 naming the field."""
    path = unpaired_surrogate_path(data)
    if path is not None:
        raise PydanticCustomError(INVALID_TEXT_ERROR, "`{param}` is not valid Unicode text: it holds an unpaired "
                                  "surrogate (such as \\ud800).", {"param": path})
    return data


def check_text_parts(parts: Any, text_types: tuple[str, ...], hint: str) -> None:
    """A content part of another type (image_url, input_audio, file, ...) gets a message that says why."""
    for part in parts if isinstance(parts, list) else ():
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(kind, str) and kind not in text_types:
            raise ValueError(f"content parts of type `{kind[:40]}` are not supported: the served models take "
                             f"text only; send `{hint}` parts.")


def check_prompt_end(add_generation_prompt: bool, continue_final_message: bool) -> None:
    """A chat prompt ends with the assistant's opening or inside the final message, not both (as vLLM)."""
    if add_generation_prompt and continue_final_message:
        raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to true: "
                         "set `add_generation_prompt` to false to continue the final message.")


def _not_supported(name: str) -> ValueError:
    return ValueError(f"`{name}` is not supported yet.")


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------- errors


class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


# ---------------------------------------------------------------- requests


class StreamOptions(OpenAIModel):
    include_usage: Bool = False
    continuous_usage_stats: Bool = False  # vLLM extra: usage (so far) on every chunk, with include_usage


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None is allowed only for assistant turns (they may carry just tool calls).
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        check_text_parts(content, ("text",), "text")
        return content

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a `{self.role}` message needs `content`.")
        return self

    def text(self) -> str:
        """The content as one string; text parts are joined by newlines, as vLLM does."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def to_template_dict(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class SamplingFields(OpenAIModel):
    """The fields both endpoints share; `to_sampling_params` maps them one to one."""

    model_config = ConfigDict(extra="allow")  # unknown fields land in model_extra (server/compat.py)
    logprobs_param: ClassVar[str] = "logprobs"  # the field that sets how many top logprobs

    model: str | None = None  # None: the served model, as vLLM allows
    stream: Bool = False
    stream_options: StreamOptions | None = None
    n: Int64 = 1  # at most --max-n (server/serving_common.py RequestCaps)
    temperature: Float | None = None
    top_p: Float | None = None
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    logit_bias: dict[str, Float] | None = None
    user: str | None = None
    # vLLM extras
    top_k: Int64 | None = None
    min_p: Float | None = None
    stop_token_ids: list[Int64] | None = None
    ignore_eos: Bool = False
    include_stop_str_in_output: Bool = False
    skip_special_tokens: Bool = True
    repetition_penalty: Float | None = None
    min_tokens: Int64 = 0
    structured_outputs: StructuredOutputs | None = None  # the output follows a schema, regex, choice or grammar
    allowed_token_ids: list[Int64] | None = Field(default=None, min_length=1)  # only these may be sampled
    truncate_prompt_tokens: Int64 | None = None  # keep the prompt's last k tokens (-1: the last max_model_len)

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _keeps_a_token(cls, value: int | None) -> int | None:
        if value is not None and value < 1 and value != -1:
            raise ValueError(f"truncate_prompt_tokens must be at least 1, or -1 for the model's context length; "
                             f"got {value}.")
        return value

    def truncated(self, token_ids: list[int], max_model_len: int) -> list[int]:
        """The prompt's last truncate_prompt_tokens tokens (vLLM's left truncation), or all of it."""
        keep = max_model_len if self.truncate_prompt_tokens == -1 else self.truncate_prompt_tokens
        return token_ids if keep is None or len(token_ids) <= keep else token_ids[-keep:]

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        return check_text(data)

    @field_validator("n")
    @classmethod
    def _at_least_one_choice(cls, n: int) -> int:
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}.")
        return n

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("`stream_options` can only be set when `stream` is true.")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """Usage on every chunk (vLLM's stream_options.continuous_usage_stats, with include_usage)."""
        return self.include_usage and self.stream_options is not None and self.stream_options.continuous_usage_stats

    def requested_max_tokens(self) -> int | None:
        raise NotImplementedError

    def max_tokens_unset(self) -> bool:
        """The client left the output length to the server (then generation_config may set it)."""
        return self.requested_max_tokens() is None

    def logprobs_params(self) -> tuple[int | None, int | None]:
        """(logprobs, prompt_logprobs) for SamplingParams: top logprobs per output / prompt token."""
        return None, None

    def field_names(self) -> dict[str, str]:
        """The request field the client sent for each engine parameter whose name differs
        (engine/request_limits.py errors name the engine's)."""
        return {"logprobs": self.logprobs_param, "prompt_logprobs": self.logprobs_param}

    def requested_structured_output(self) -> StructuredOutputParams | None:
        """vLLM's structured_outputs (chat adds response_format and forced tool calls: server/chat_tools.py)."""
        return None if self.structured_outputs is None else self.structured_outputs.params()

    def to_sampling_params(self, max_tokens: int | None, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        """Fields the request leaves unset take `defaults` (the model's generation config), then
        SamplingParams' own. Raises InvalidSamplingParam (-> 400) for out-of-range values."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        fallback = SamplingParams()
        defaults = defaults or {}

        def pick(name: str) -> Any:
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, getattr(fallback, name))

        logprobs, prompt_logprobs = self.logprobs_params()
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=pick("temperature"),
            top_p=pick("top_p"),
            top_k=pick("top_k"),
            min_p=pick("min_p"),
            seed=self.seed,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            presence_penalty=pick("presence_penalty"),
            frequency_penalty=pick("frequency_penalty"),
            repetition_penalty=pick("repetition_penalty"),
            logit_bias=self.logit_bias or {},
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            structured_output=self.requested_structured_output(),
            allowed_token_ids=tuple(self.allowed_token_ids or ()),
        )


class ChatCompletionRequest(SamplingFields):
    logprobs_param: ClassVar[str] = "top_logprobs"
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int64 | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: Int64 | None = None
    logprobs: Bool = False
    top_logprobs: Int64 | None = None
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None  # None: "auto" with tools, "none" without
    parallel_tool_calls: Bool = True
    response_format: ResponseFormat | None = None
    # vLLM extras
    add_generation_prompt: Bool = True
    continue_final_message: Bool = False  # the final message left open: the reply continues it (a prefill)
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_way_to_end_the_prompt(self) -> ChatCompletionRequest:
        check_prompt_end(self.add_generation_prompt, self.continue_final_message)
        return self

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: Any) -> int | None:
        if value is not None:
            if value < 0:
                raise ValueError(f"top_logprobs must be 0 or more, got {value}.")
            if not info.data.get("logprobs"):
                raise ValueError("when using `top_logprobs`, `logprobs` must be set to true.")
        return value

    def logprobs_params(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0) if self.logprobs else None, None

    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens wins: it is the newer name of the same limit.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def field_names(self) -> dict[str, str]:
        max_tokens = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        return {**super().field_names(), "prompt": "messages", "max_tokens": max_tokens}


class CompletionRequest(SamplingFields):
    # A string, a list of strings, a list of token ids, or a list of lists of token ids.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Int64 | None = COMPLETIONS_DEFAULT_MAX_TOKENS  # null: up to the context
    echo: Bool = False
    logprobs: Int64 | None = None
    suffix: str | None = None
    best_of: Int64 | None = None
    response_format: ResponseFormat | None = None  # vLLM takes it here too; OpenAI's completions do not

    @model_validator(mode="after")
    def _one_grammar(self) -> CompletionRequest:
        if self.structured_outputs is not None and self.response_format is not None \
                and self.response_format.type != "text":
            raise ValueError("`structured_outputs` cannot be combined with `response_format` json_object or "
                             "json_schema.")
        return self

    def requested_structured_output(self) -> StructuredOutputParams | None:
        if self.response_format is not None and self.response_format.type != "text":
            return self.response_format.params()
        return super().requested_structured_output()

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, prompt: Any) -> Any:
        # validated, the list holds one kind: only a list of lists can hold an empty prompt
        if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], list) and not all(prompt)):
            raise ValueError("prompt must not be empty.")
        return prompt

    @field_validator("suffix")
    @classmethod
    def _unsupported_if_set(cls, value: Any, info: Any) -> Any:
        if value is not None:
            raise _not_supported(info.field_name)
        return value

    @field_validator("logprobs")
    @classmethod
    def _logprobs_not_negative(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise ValueError(f"logprobs must be 0 or more, got {value}.")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: Any) -> int | None:
        # best_of > n would sample choices only to throw them away; vLLM's engine no longer has it.
        n = info.data.get("n", 1)
        if value is not None and value != n:
            raise ValueError(f"best_of={value} is not supported: only best_of equal to n ({n}), "
                             "or leaving it out, is.")
        return value

    def logprobs_params(self) -> tuple[int | None, int | None]:
        # echo with logprobs also scores the prompt tokens.
        return self.logprobs, self.logprobs if self.echo and self.logprobs is not None else None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def max_tokens_unset(self) -> bool:
        return "max_tokens" not in self.model_fields_set

    def prompts(self) -> list[str | list[int]]:
        """One entry per choice: a text prompt or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int):  # validated: a list of one kind, never empty
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]


# ---------------------------------------------------------------- responses


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, num_prompt_tokens: int, num_completion_tokens: int) -> UsageInfo:
        return cls(prompt_tokens=num_prompt_tokens, completion_tokens=num_completion_tokens,
                   total_tokens=num_prompt_tokens + num_completion_tokens)


def _now_s() -> int:
    return int(time.time())


class AssistantMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the reply is tool calls
    reasoning_content: str | None = None  # --reasoning-parser: the reply's <think> part
    tool_calls: list[ToolCall] | None = None


# ---- logprobs (chat: OpenAI's `logprobs.content`; completions: the legacy four lists)


class ChatTopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None  # the token's UTF-8 bytes


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(OpenAIModel):
    content: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class ChatChoice(OpenAIModel):
    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None
    stop_reason: int | str | None = None  # vLLM extra: the stop token id or string


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now_s)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(OpenAIModel):
    """Only the fields that changed are sent: the role once, then content pieces."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None  # --reasoning-parser
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatStreamChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now_s)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    stop_reason: int | str | None = None


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now_s)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionChunk(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now_s)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now_s)
    owned_by: str = "fitserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
