"""Tool calling and response_format for chat: what the model is offered, how it is constrained,
and how its reply becomes OpenAI `tool_calls` (through a --tool-call-parser, server/tool_parsers/).

- `tool_choice` "none": tools are not offered and nothing is parsed. "auto" (the default with
  tools): tools are offered, and a reply that is a tool-call JSON becomes `tool_calls`.
  "required" or a named function: the output is forced by the structured-output grammar to be
  one call `{"name": ..., "parameters": {...}}` of an allowed tool, so any model produces a valid call.
- Offering: a chat template that mentions `tools` gets them through apply_chat_template(tools=...);
  one that does not (the embedded SmolLM2's) gets a system-message paragraph listing them and the
  reply format (`tool_system_prompt`).
- Parsing: the --tool-call-parser's format (default llama3_json, whose JSON reading lives here:
  optional `<|python_tag|>`, then one JSON object, or several separated by `;`, or a JSON array of
  them, with `name` and `parameters` (or `arguments`)); anything else is content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from fitserve.engine.chat_template import template_variables
from fitserve.server.errors import BadRequestError
from fitserve.server.protocol import AssistantMessage, ChatCompletionRequest, ChatMessage, DeltaMessage
from fitserve.server.protocol_tools import ChatTool, DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from fitserve.server.tool_parsers import ToolParser
from fitserve.server.tool_parsers.streaming import CanonicalJsonStream, call_head
from fitserve.structured_params import StructuredOutputParams

PYTHON_TAG = "<|python_tag|>"  # Llama 3.1's marker before a tool call (dropped when special tokens are skipped)
CALL_SEPARATOR = ";"  # Llama 3's separator between several JSON calls in one reply
TOOL_CALL_ID_HEX_CHARS = 24
TOOL_PROMPT = (
    "You can call functions. To call one, reply with only a JSON object of the form "
    '{{"name": <function name>, "parameters": <object of arguments>}} and no other text.{choice}\n\n'
    "Available functions:\n{functions}"
)
CHOICE_SENTENCES = {
    "auto": " If no function helps, answer the user normally.",
    "required": " You must call one of them.",
}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """One request's tool handling, decided before the prompt is built."""

    offered: tuple[ChatTool, ...]  # the tools shown to the model (none for tool_choice "none")
    choice: str  # "none" | "auto" | "required" | "named"
    forced_name: str | None = None  # the function tool_choice names
    parallel: bool = True  # parallel_tool_calls: False keeps the first call only

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none" and bool(self.offered)

    def forced_tools(self) -> list[ChatTool]:
        if self.choice == "named":
            return [t for t in self.offered if t.function.name == self.forced_name]
        return list(self.offered) if self.choice == "required" else []


def plan_tools(body: ChatCompletionRequest) -> ToolPlan:
    """Check tools and tool_choice together; BadRequestError for a contradiction."""
    tools = tuple(body.tools or ())
    names = [t.function.name for t in tools]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise BadRequestError(f"Tool names must be unique; `{duplicate}` appears more than once.", param="tools")
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    forced_name = None
    if not isinstance(choice, str):
        forced_name, choice = choice.function.name, "named"
        if forced_name not in names:
            raise BadRequestError(f"`tool_choice` names the function `{forced_name}`, which is not among `tools`.",
                                  param="tool_choice")
    if choice in ("required", "named") and not tools:
        raise BadRequestError(f"`tool_choice` {choice!r} needs `tools`.", param="tool_choice")
    response_type = body.response_format.type if body.response_format is not None else "text"
    if response_type != "text" and choice != "none" and tools:
        raise BadRequestError("`response_format` json_object or json_schema cannot be combined with `tools` "
                              'unless `tool_choice` is "none".', param="response_format")
    return ToolPlan(tools if choice != "none" else (), choice, forced_name, body.parallel_tool_calls)


def structured_output(body: ChatCompletionRequest, plan: ToolPlan) -> StructuredOutputParams | None:
    """The grammar this request's output must follow: a forced tool call, response_format, or
    vLLM's structured_outputs (one of them: two are a 400)."""
    forced = plan.forced_tools()
    response_type = body.response_format.type if body.response_format is not None else "text"
    if body.structured_outputs is not None:
        if forced or response_type != "text":
            raise BadRequestError("`structured_outputs` cannot be combined with `response_format` json_object or "
                                  "json_schema, nor with a forced tool call (`tool_choice` required or named).",
                                  param="structured_outputs")
        return body.structured_outputs.params()
    if forced:
        calls = [_call_schema(tool) for tool in forced]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        return StructuredOutputParams.from_schema(schema, param="tools")
    return None if body.response_format is None else body.response_format.params()


def _call_schema(tool: ChatTool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "parameters": tool.function.parameters_schema()},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }


# ---------------------------------------------------------------- the prompt


def chat_prompt_ids(tokenizer: Any, messages: list[ChatMessage], plan: ToolPlan, add_generation_prompt: bool,
                    chat_template_kwargs: dict[str, Any] | None, continue_final_message: bool = False) -> list[int]:
    """The conversation through the chat template, tools offered as `plan` says; with
    `continue_final_message` the prompt ends inside the final message's text (the reply continues it)."""
    variables, request_template = template_variables(chat_template_kwargs, allow_template=True)  # 400: reserved
    handles_tools = "tools" in request_template if request_template is not None else template_handles_tools(tokenizer)
    rendered, tool_kwargs = template_messages(messages, plan, handles_tools)
    kwargs = {**variables, **tool_kwargs, "add_generation_prompt": add_generation_prompt}
    if continue_final_message:
        kwargs["continue_final_message"] = True
    if request_template is not None:  # allowed by --trust-request-chat-template (checked in app.py)
        kwargs["request_template"] = request_template
    return list(tokenizer.apply_chat_template(rendered, **kwargs))


def template_handles_tools(tokenizer: Any) -> bool:
    """Whether the model's chat template renders `tools` itself (it mentions them)."""
    template = tokenizer.chat_template
    return isinstance(template, str) and "tools" in template


def tool_system_prompt(plan: ToolPlan) -> str:
    functions = "\n".join(json.dumps(tool.model_dump(exclude_none=True)) for tool in plan.offered)
    return TOOL_PROMPT.format(choice=CHOICE_SENTENCES.get(plan.choice, ""), functions=functions)


def template_messages(messages: list[ChatMessage], plan: ToolPlan,
                      handles_tools: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The conversation for the chat template, and the extra template arguments (tools)."""
    rendered = [_template_message(m, handles_tools) for m in messages]
    if not plan.offered:
        return rendered, {}
    if handles_tools:
        return rendered, {"tools": [tool.model_dump(exclude_none=True) for tool in plan.offered]}
    paragraph = tool_system_prompt(plan)
    if rendered and rendered[0]["role"] in ("system", "developer"):
        rendered[0] = {**rendered[0], "content": f"{rendered[0]['content']}\n\n{paragraph}".lstrip()}
    else:
        rendered.insert(0, {"role": "system", "content": paragraph})
    return rendered, {}


def _template_message(message: ChatMessage, handles_tools: bool) -> dict[str, Any]:
    rendered = message.to_template_dict()
    if not message.tool_calls:
        return rendered
    if handles_tools:  # templates index arguments as a mapping (Llama 3.1: `arguments | tojson`)
        rendered["tool_calls"] = [{"id": c.id, "type": c.type, "function": {
            "name": c.function.name, "arguments": _arguments_object(c.function.arguments)}}
            for c in message.tool_calls]
        return rendered
    # Without template support the call is shown as the text the model is asked to write.
    calls = f"{CALL_SEPARATOR} ".join(json.dumps({"name": c.function.name,
                                                  "parameters": _arguments_object(c.function.arguments)})
                                      for c in message.tool_calls)
    rendered["content"] = f"{rendered['content']}\n{calls}".lstrip()
    return rendered


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


# ---------------------------------------------------------------- the reply


def chat_reply(text: str, finish_reason: str | None, plan: ToolPlan,
               parser: ToolParser | None = None) -> tuple[AssistantMessage, str | None]:
    """The assistant message of a whole reply: its tool calls (finish_reason "tool_calls"), or its text.

    `parser`: the --tool-call-parser (None: llama3_json). Forced calls (grammar) are always Llama 3 JSON."""
    if not plan.parses_calls:
        return AssistantMessage(content=text), finish_reason
    extracted = _parser_for(plan, parser).extract(text, plan)
    if extracted is None:
        return AssistantMessage(content=text), finish_reason
    return AssistantMessage(content=extracted.content, tool_calls=extracted.calls), "tool_calls"


def _parser_for(plan: ToolPlan, parser: ToolParser | None) -> ToolParser:
    from fitserve.server.tool_parsers import tool_parser  # its modules import this one

    if parser is None or plan.forced_tools():  # the grammar writes Llama 3 JSON whatever the model's format
        return tool_parser("llama3_json")
    return parser


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:TOOL_CALL_ID_HEX_CHARS]}"


def parse_tool_calls(text: str, plan: ToolPlan) -> list[ToolCall] | None:
    """The reply's tool calls, or None when it is not (wholly) a tool call of an offered tool."""
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    if not body.startswith(("{", "[")):
        return None
    decoder = json.JSONDecoder()
    objects: list[Any] = []
    position = 0
    while position < len(body):
        try:
            value, position = decoder.raw_decode(body, position)
        except json.JSONDecodeError:
            return None
        objects.extend(value if isinstance(value, list) else [value])
        position = _skip_separator(body, position)
    return calls_from_objects(objects, plan)


def calls_from_objects(objects: list[Any], plan: ToolPlan) -> list[ToolCall] | None:
    """Decoded `{"name", "parameters"|"arguments"}` objects as calls; None if any is not a call of an offered tool."""
    calls = [_to_tool_call(obj, plan) for obj in objects]
    if not calls or any(call is None for call in calls):
        return None
    return calls[:1] if not plan.parallel else calls  # type: ignore[return-value]


def _skip_separator(text: str, position: int) -> int:
    while position < len(text) and (text[position].isspace() or text[position] == CALL_SEPARATOR):
        position += 1
    return position


def _to_tool_call(obj: Any, plan: ToolPlan) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if obj["name"] not in {t.function.name for t in plan.offered}:
        return None
    arguments = obj.get("parameters", obj.get("arguments", {}))
    if isinstance(arguments, str):  # some models write the arguments already serialized
        arguments = _arguments_object(arguments)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(id=new_tool_call_id(), function=FunctionCall(name=obj["name"], arguments=json.dumps(arguments)))


@dataclass(slots=True)
class _StreamedCall:
    """A call whose name has been sent: its id, its arguments' reader, and the arguments text sent so far."""

    id: str
    name: str
    arguments: CanonicalJsonStream  # reads the call object's text from its arguments' `{` on
    sent: list[str] = field(default_factory=list)  # the fragments sent
    closed: bool = False  # its arguments object ended (or stopped parsing): nothing more streams


class ToolCallStream:
    """Streams a reply as content deltas, and its tool calls as `tool_calls` deltas.

    Text that may be (the start of) a call, as the parser says, is held; text before it streams as
    content at once. With a parser that lists its call objects as they grow (hermes, mistral:
    `call_texts`), a call of an offered tool is sent as soon as its name is whole, one delta with its
    id, type and name, then its arguments in fragments as the model writes them, spelled as the whole
    reply's `arguments` (tool_parsers/streaming.py), so the fragments add up to them. Anything else
    held is decided when the reply ends: calls not yet sent become one delta with id and name, then
    one with their arguments, or, if nothing was sent and the text does not parse as calls, it is
    sent as content. Once a call has been sent the reply is a tool-call reply: if it then breaks off
    (max_tokens) or turns malformed, what was sent stays, the rest is dropped, and `calls` is empty.
    """

    def __init__(self, plan: ToolPlan, parser: ToolParser | None = None) -> None:
        self.plan = plan
        self.parser = _parser_for(plan, parser) if plan.parses_calls else None
        self._held = ""
        self._sent_any = False
        self._streamed: list[_StreamedCall] = []
        self.calls: list[ToolCall] = []  # the reply's calls, once it ended and they parsed

    def feed(self, new_text: str) -> list[DeltaMessage]:
        if self.parser is None:
            return [DeltaMessage(content=new_text)] if new_text else []
        self._held += new_text
        start = self.parser.hold_from(self._held, at_start=not self._sent_any)
        if start is None:
            send, self._held = self._held, ""
        else:
            send, self._held = self._held[:start], self._held[start:]  # re-checked with the next text
        deltas = [DeltaMessage(content=send)] if send else []
        self._sent_any = self._sent_any or bool(send)
        return deltas + (self._stream_calls() if self._held else [])

    def _stream_calls(self) -> list[DeltaMessage]:
        """Deltas for calls whose name is now whole, and for the arguments written since the last feed."""
        texts = self.parser.call_texts(self._held) if self.parser is not None else None
        deltas: list[DeltaMessage] = []
        offered = {t.function.name for t in self.plan.offered}
        for index, text in enumerate((texts or [])[:None if self.plan.parallel else 1]):
            if index == len(self._streamed):
                head = call_head(text)
                if head is None or head.name not in offered:
                    break  # not yet (or not streamable: sent whole at the end); later calls keep their order
                self._streamed.append(_StreamedCall(new_tool_call_id(), head.name,
                                                    CanonicalJsonStream(head.arguments_at)))
                deltas.append(_call_delta(index, self._streamed[-1].id, head.name))
            call = self._streamed[index]
            if call.closed:
                continue
            settled = call.arguments.feed(text)
            if settled is None:  # malformed: extract decides at the end
                call.closed = True
                continue
            if settled:
                deltas.append(_arguments_delta(index, settled))
                call.sent.append(settled)
            call.closed = call.arguments.closed
        return deltas

    def finish(self) -> list[DeltaMessage]:
        """Deltas for what is still held, at the end of the reply."""
        held, self._held = self._held, ""
        if self.parser is None or not held:
            return []
        extracted = self.parser.extract(held, self.plan)
        if extracted is None:
            return [] if self._streamed else [DeltaMessage(content=held)]
        deltas = [DeltaMessage(content=extracted.content)] if extracted.content and not self._streamed else []
        for index, call in enumerate(extracted.calls):
            arguments = call.function.arguments
            if index < len(self._streamed):  # its id and name went out; send what its arguments still lack
                streamed = self._streamed[index]
                sent = "".join(streamed.sent)
                rest = arguments[len(sent):] if arguments.startswith(sent) else ""
                if rest:
                    deltas.append(_arguments_delta(index, rest))
                call = ToolCall(id=streamed.id, function=FunctionCall(name=call.function.name,
                                                                      arguments=sent + rest))
            else:
                deltas += [_call_delta(index, call.id, call.function.name), _arguments_delta(index, arguments)]
            self.calls.append(call)
        return deltas


def _call_delta(index: int, call_id: str, name: str) -> DeltaMessage:
    return DeltaMessage(tool_calls=[DeltaToolCall(index=index, id=call_id, type="function",
                                                  function=DeltaFunctionCall(name=name, arguments=""))])


def _arguments_delta(index: int, arguments: str) -> DeltaMessage:
    return DeltaMessage(tool_calls=[DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=arguments))])
