"""POST /v1/responses: OpenAI's Responses API, served through the chat endpoint.

A Responses request is turned into a chat completion request (server/protocol.py validates it
as any chat request: the chat template, tools, structured output, limits and caps all apply the
same), run by OpenAIServingChat, and its answer turned back into a Response object: the reply's
text as an `output_text` part of one `message` item, each tool call as a `function_call` item.
Streamed, the chat chunks become the Responses events (response.created, ...output_text.delta,
...function_call_arguments.delta, ..., response.completed).

Nothing is stored (`store` is answered false): `previous_response_id` is a 400, and a
conversation is sent whole in `input`, as messages and function_call / function_call_output items.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fitserve.server.errors import BadRequestError
from fitserve.server.protocol import Bool, ChatCompletionRequest, Float, Int64, check_text, check_text_parts
from fitserve.server.serving_chat import OpenAIServingChat
from fitserve.server.serving_common import SSEResponse

ENDPOINT = "/v1/responses"


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


TEXT_PARTS = ("input_text", "output_text", "text")


class InputPart(_Model):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputItem(_Model):
    """A message (`type` "message" or left out), a function call of an earlier turn, or its output."""

    type: Literal["message", "function_call", "function_call_output"] = "message"
    role: Literal["user", "system", "developer", "assistant"] | None = None
    content: str | list[InputPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None


class FunctionTool(_Model):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(_Model):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str = "response"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(_Model):
    format: TextFormat = Field(default_factory=TextFormat)


class ResponsesRequest(_Model):
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: Int64 | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    stream: Bool = False
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "name": ...}
    parallel_tool_calls: Bool = True
    previous_response_id: str | None = None
    store: Bool | None = None  # nothing is stored: answered false
    metadata: dict[str, str] | None = None
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _valid_text(cls, value: Any) -> Any:
        """Unicode text only, in text parts only (an image part gets a message that says so)."""
        for item in value if isinstance(value, list) else ():
            check_text_parts(item.get("content") if isinstance(item, dict) else None, TEXT_PARTS, "input_text")
        return check_text(value)

    def chat_body(self) -> dict[str, Any]:
        """The chat completion request this one asks for (validated by ChatCompletionRequest)."""
        if self.previous_response_id is not None:
            raise BadRequestError("`previous_response_id` is not supported: this server stores no responses; send "
                                  "the whole conversation in `input`.", param="previous_response_id")
        messages = [] if self.instructions is None else [{"role": "system", "content": self.instructions}]
        messages += [{"role": "user", "content": self.input}] if isinstance(self.input, str) else \
            _chat_messages(self.input)
        if not messages:
            raise BadRequestError("`input` holds no message.", param="input")
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": self.stream,
                                "max_completion_tokens": self.max_output_tokens, "temperature": self.temperature,
                                "top_p": self.top_p, "parallel_tool_calls": self.parallel_tool_calls}
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.tools:
            body["tools"] = [{"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                             for tool in self.tools]
        if self.tool_choice is not None:
            body["tool_choice"] = _chat_tool_choice(self.tool_choice)
        text_format = self.text.format if self.text is not None else TextFormat()
        if text_format.type == "json_object":
            body["response_format"] = {"type": "json_object"}
        elif text_format.type == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": text_format.name, "schema": text_format.schema_ or {}, "strict": text_format.strict}}
        return {key: value for key, value in body.items() if value is not None}


def _chat_messages(items: list[InputItem]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for item in items:
        if item.type == "function_call":
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name,
                                                                           "arguments": item.arguments or "{}"}}
            if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
                messages[-1]["tool_calls"].append(call)  # parallel calls of one turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif item.type == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output or ""})
        else:
            content = item.content if isinstance(item.content, str) or item.content is None else \
                [{"type": "text", "text": part.text} for part in item.content]
            messages.append({"role": item.role or "user", "content": content})
    return messages


def _chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


class OpenAIServingResponses:
    def __init__(self, chat: OpenAIServingChat) -> None:
        self.chat = chat

    async def create(self, body: ResponsesRequest, raw_request: Request, request_id: str) -> Response:
        try:
            chat_body = ChatCompletionRequest.model_validate(body.chat_body())
        except ValidationError as exc:
            raise BadRequestError(_first_error(exc)) from None
        answer = await self.chat.create(chat_body, raw_request, request_id)
        shape = ResponseShape(f"resp_{request_id}", request_id, body)
        if isinstance(answer, SSEResponse):
            return SSEResponse(shape.events(answer.body_iterator), answer.sources)
        if answer.status_code != 200:
            return answer
        return JSONResponse(shape.from_chat(json.loads(bytes(answer.body))))


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error.get("loc", ()))
    return f"Invalid value for `{where}` (as a chat request): {error.get('msg')}"


class ResponseShape:
    """The Response object and its streamed events, from the chat endpoint's answer."""

    def __init__(self, response_id: str, request_id: str, body: ResponsesRequest) -> None:
        self.response_id = response_id
        self.message_id = f"msg_{request_id}"
        self.reasoning_id = f"rs_{request_id}"
        self.body = body
        self.created_at = int(time.time())
        self.sequence_number = 0
        self.model = ""  # the served model's name, from the chat answer

    def response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None = None,
                 incomplete: bool = False) -> dict[str, Any]:
        body = self.body
        text_format = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text else {"type": "text"}
        return {
            "id": self.response_id, "object": "response", "created_at": self.created_at, "status": status,
            "model": self.model, "output": output, "usage": usage, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature, "top_p": body.top_p, "parallel_tool_calls": body.parallel_tool_calls,
            "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
            "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or ()],
            "text": {"format": text_format}, "metadata": body.metadata or {}, "store": False,
            "previous_response_id": None, "truncation": "disabled", "reasoning": None, "user": body.user,
        }

    def message_item(self, text: str, status: str) -> dict[str, Any]:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [self.text_part(text)]}

    @staticmethod
    def text_part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": []}

    def reasoning_item(self, text: str, status: str) -> dict[str, Any]:
        return {"type": "reasoning", "id": self.reasoning_id, "summary": [], "status": status,
                "content": [{"type": "reasoning_text", "text": text}]}

    @staticmethod
    def call_item(call: OpenItem, arguments: str, status: str) -> dict[str, Any]:
        return {"type": "function_call", "id": call.id, "call_id": call.call_id, "name": call.name,
                "arguments": arguments, "status": status}

    @staticmethod
    def usage(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
        if chat_usage is None:
            return None
        return {"input_tokens": chat_usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": chat_usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": chat_usage["total_tokens"]}

    def from_chat(self, chat: dict[str, Any]) -> dict[str, Any]:
        self.model = chat["model"]
        choice = chat["choices"][0]
        message, incomplete = choice["message"], choice["finish_reason"] == "length"
        status = "incomplete" if incomplete else "completed"
        output = [self.reasoning_item(message["reasoning_content"], "completed")] \
            if message.get("reasoning_content") else []
        output += [self.message_item(message["content"], status)] if message.get("content") else []
        for call in message.get("tool_calls") or ():
            item = OpenItem(f"fc_{call['id']}", len(output), call["id"], call["function"]["name"])
            output.append(self.call_item(item, call["function"]["arguments"], "completed"))
        return self.response(status, output, self.usage(chat.get("usage")), incomplete)

    def event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    async def events(self, chat_chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """The chat endpoint's SSE chunks as Responses events; an in-band error passes through. Items
        open in the order their first delta comes (reasoning, then the message and the tool calls), a
        reasoning item closing when the reply proper begins."""
        reasoning: OpenItem | None = None
        message: OpenItem | None = None
        calls: dict[int, OpenItem] = {}  # chat tool-call index -> its item
        output: list[tuple[int, dict[str, Any]]] = []  # (output index, finished item)
        finish_reason, usage, started, opened = None, None, False, 0  # opened: items so far (the next index)
        async for raw in _closing(chat_chunks):
            payload = raw.removeprefix("data: ").strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                yield f"event: error\ndata: {json.dumps({'type': 'error', **chunk['error']})}\n\n"
                return
            if not started:
                self.model, started = chunk["model"], True
                yield self.event("response.created", response=self.response("in_progress", []))
                yield self.event("response.in_progress", response=self.response("in_progress", []))
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                finish_reason = choice.get("finish_reason") or finish_reason
                if delta.get("reasoning_content"):
                    if reasoning is None:
                        reasoning, opened = OpenItem(self.reasoning_id, opened), opened + 1
                        yield self.event("response.output_item.added", output_index=reasoning.index,
                                         item={**self.reasoning_item("", "in_progress"), "content": []})
                    reasoning.text.append(delta["reasoning_content"])
                    yield self.event("response.reasoning_text.delta", item_id=reasoning.id,
                                     output_index=reasoning.index, content_index=0, delta=delta["reasoning_content"])
                if (delta.get("content") or delta.get("tool_calls")) and reasoning is not None and not reasoning.done:
                    for event in self._close_reasoning(reasoning, output):
                        yield event
                if delta.get("content"):
                    if message is None:
                        message, opened = OpenItem(self.message_id, opened), opened + 1
                        yield self.event("response.output_item.added", output_index=message.index,
                                         item={**self.message_item("", "in_progress"), "content": []})
                        yield self.event("response.content_part.added", item_id=message.id,
                                         output_index=message.index, content_index=0, part=self.text_part(""))
                    message.text.append(delta["content"])
                    yield self.event("response.output_text.delta", item_id=message.id, output_index=message.index,
                                     content_index=0, delta=delta["content"], logprobs=[])
                for piece in delta.get("tool_calls") or ():
                    index = piece.get("index", 0)
                    function = piece.get("function") or {}
                    call = calls.get(index)
                    if call is None:
                        call_id = piece.get("id") or f"call_{index}"
                        call = calls[index] = OpenItem(f"fc_{call_id}", opened, call_id, function.get("name") or "")
                        opened += 1
                        yield self.event("response.output_item.added", output_index=call.index,
                                         item=self.call_item(call, "", "in_progress"))
                    if function.get("arguments"):
                        call.text.append(function["arguments"])
                        yield self.event("response.function_call_arguments.delta", item_id=call.id,
                                         output_index=call.index, delta=function["arguments"])
        if not started:
            return
        incomplete = finish_reason == "length"
        status = "incomplete" if incomplete else "completed"
        if reasoning is not None and not reasoning.done:
            for event in self._close_reasoning(reasoning, output):
                yield event
        if message is not None:
            full = "".join(message.text)
            yield self.event("response.output_text.done", item_id=message.id, output_index=message.index,
                             content_index=0, text=full, logprobs=[])
            yield self.event("response.content_part.done", item_id=message.id, output_index=message.index,
                             content_index=0, part=self.text_part(full))
            item = self.message_item(full, status)
            yield self.event("response.output_item.done", output_index=message.index, item=item)
            output.append((message.index, item))
        for call in calls.values():
            item = self.call_item(call, "".join(call.text), "completed")
            yield self.event("response.function_call_arguments.done", item_id=call.id, output_index=call.index,
                             arguments=item["arguments"])
            yield self.event("response.output_item.done", output_index=call.index, item=item)
            output.append((call.index, item))
        final = self.response(status, [item for _, item in sorted(output, key=lambda pair: pair[0])],
                              self.usage(usage), incomplete)
        yield self.event("response.incomplete" if incomplete else "response.completed", response=final)

    def _close_reasoning(self, reasoning: OpenItem, output: list[tuple[int, dict[str, Any]]]) -> list[str]:
        reasoning.done = True
        full = "".join(reasoning.text)
        item = self.reasoning_item(full, "completed")
        output.append((reasoning.index, item))
        return [self.event("response.reasoning_text.done", item_id=reasoning.id, output_index=reasoning.index,
                           content_index=0, text=full),
                self.event("response.output_item.done", output_index=reasoning.index, item=item)]


@dataclass(slots=True)
class OpenItem:
    """An output item being streamed: its id, output index and text so far (a call's arguments)."""

    id: str
    index: int
    call_id: str = ""
    name: str = ""
    text: list[str] = field(default_factory=list)
    done: bool = False


async def _closing(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The chat body's chunks, closed (its engine streams aborted) however the reader leaves."""
    async with contextlib.aclosing(chunks):  # type: ignore[type-var]
        async for chunk in chunks:
            yield chunk
