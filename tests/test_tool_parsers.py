"""--tool-call-parser: hermes (<tool_call>) and mistral ([TOOL_CALLS]) replies as tool_calls, whole and
streamed with the reply cut at every character boundary; malformed calls stay content; and through
the openai client on a scripted fake engine."""

from __future__ import annotations

import json

import openai
import pytest
from server_fixtures import FAKE_API_KEY, live_server
from test_api_tools import TIME, USER, WEATHER, ScriptedEngine

from fitserve.config import REASONING_PARSER_NAMES, TOOL_CALL_PARSER_NAMES, ConfigError, ServerConfig
from fitserve.server.app import build_app
from fitserve.server.chat_tools import ToolCallStream, ToolPlan, chat_reply
from fitserve.server.protocol_tools import ChatTool
from fitserve.server.reasoning import REASONING_PARSERS
from fitserve.server.tool_parsers import tool_parser

PLAN = ToolPlan(tuple(ChatTool.model_validate(t) for t in (WEATHER, TIME)), "auto")
HERMES_REPLY = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
HERMES_TWO = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
              '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
MISTRAL_REPLY = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]'


def streamed(parser_name, pieces):
    stream = ToolCallStream(PLAN, tool_parser(parser_name))
    deltas = [d for piece in pieces for d in stream.feed(piece)] + stream.finish()
    content = "".join(d.content or "" for d in deltas)
    calls = {}
    for delta in deltas:
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"name": None, "arguments": ""})
            if call.function.name is not None:
                assert entry["name"] is None and call.id.startswith("call_"), "id and name come first, once"
                entry["name"] = call.function.name
            entry["arguments"] += call.function.arguments or ""
    return content, [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]


@pytest.mark.parametrize(("parser", "text", "content", "calls"), [
    ("hermes", HERMES_REPLY, "Let me look.", [("get_weather", {"city": "Paris"})]),
    ("hermes", HERMES_TWO, None, [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ("mistral", MISTRAL_REPLY, None, [("get_weather", {"city": "Paris"})]),
    ("mistral", "Sure. [TOOL_CALLS] [{\"name\": \"get_time\", \"arguments\": {}}]", "Sure.", [("get_time", {})]),
    ("llama3_json", '{"name": "get_time", "parameters": {}}', None, [("get_time", {})]),
])
def test_whole_and_streamed_at_every_cut(parser, text, content, calls):
    message, finish_reason = chat_reply(text, "stop", PLAN, tool_parser(parser))
    assert finish_reason == "tool_calls" and message.content == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == calls
    for cut in range(len(text) + 1):
        streamed_content, streamed_calls = streamed(parser, [text[:cut], text[cut:]])
        assert (streamed_content.strip() or None, streamed_calls) == (content, calls), cut
    assert streamed(parser, list(text))[1] == calls


@pytest.mark.parametrize(("parser", "text"), [
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'),
    ("hermes", '<tool_call>{"name": "no_such_tool", "arguments": {}}</tool_call>'),
    ("hermes", "I use <tool_calling> a lot"),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {'),
    ("mistral", "no calls here [TOOL_CALL"),
])
def test_malformed_calls_are_content(parser, text):
    message, finish_reason = chat_reply(text, "stop", PLAN, tool_parser(parser))
    assert (message.content, message.tool_calls, finish_reason) == (text, None, "stop")
    for cut in range(len(text) + 1):
        assert streamed(parser, [text[:cut], text[cut:]]) == (text, []), cut


def test_content_before_a_marker_streams_before_the_reply_ends():
    stream = ToolCallStream(PLAN, tool_parser("hermes"))
    assert [d.content for d in stream.feed("Let me look.\n<tool_")] == ["Let me look.\n"]
    assert stream.feed('call>{"name"') == []


def test_forced_calls_use_the_grammars_json_whatever_the_parser():
    forced = ToolPlan(PLAN.offered, "required")
    message, _ = chat_reply('{"name": "get_time", "parameters": {}}', "stop", forced, tool_parser("hermes"))
    assert message.tool_calls[0].function.name == "get_time"


@pytest.fixture(scope="module", params=["hermes", "mistral"])
def served(request):
    engine = ScriptedEngine(max_model_len=4096)
    with live_server(build_app(engine, config=ServerConfig(tool_call_parser=request.param))) as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key=FAKE_API_KEY, max_retries=0, timeout=10) as client:
            yield request.param, engine, client


def test_live_calls_whole_and_streamed(served):
    parser, engine, client = served
    engine.reply = HERMES_REPLY if parser == "hermes" else MISTRAL_REPLY
    resp = client.chat.completions.create(model="fake-model", messages=USER, tools=[WEATHER, TIME])
    (call,) = resp.choices[0].message.tool_calls
    assert resp.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = list(client.chat.completions.create(model="fake-model", messages=USER, tools=[WEATHER], stream=True))
    calls = [c for chunk in chunks for d in [chunk.choices[0].delta] for c in d.tool_calls or []]
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    assert json.loads("".join(c.function.arguments or "" for c in calls)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_live_malformed_call_is_content(served):
    parser, engine, client = served
    engine.reply = "<tool_call>{oops</tool_call>" if parser == "hermes" else "[TOOL_CALLS][{oops"
    message = client.chat.completions.create(model="fake-model", messages=USER, tools=[WEATHER]).choices[0].message
    assert message.content == engine.reply and not message.tool_calls


def test_unknown_parser_names_are_config_errors():
    with pytest.raises(ConfigError, match="--tool-call-parser"):
        ServerConfig(tool_call_parser="pythonic")
    with pytest.raises(ConfigError, match="--reasoning-parser"):
        ServerConfig(reasoning_parser="granite")
    assert set(REASONING_PARSER_NAMES) == set(REASONING_PARSERS)
    assert all(tool_parser(name).name == name for name in TOOL_CALL_PARSER_NAMES)


def test_live_qwen3_reasoning_then_hermes_call():
    engine = ScriptedEngine(max_model_len=4096)
    engine.reply = "<think>Needs the weather.</think>\n\n" + HERMES_REPLY
    config = ServerConfig(reasoning_parser="qwen3", tool_call_parser="hermes")
    with live_server(build_app(engine, config=config)) as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key=FAKE_API_KEY, max_retries=0, timeout=10) as client:
            resp = client.chat.completions.create(model="fake-model", messages=USER, tools=[WEATHER])
            message = resp.choices[0].message
            chunks = list(client.chat.completions.create(model="fake-model", messages=USER, tools=[WEATHER],
                                                         stream=True))
    assert message.reasoning_content == "Needs the weather." and message.content == "Let me look."
    assert message.tool_calls[0].function.name == "get_weather"
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Needs the weather."
    assert "".join(d.content or "" for d in deltas).strip() == "Let me look."
    assert [c.function.name for d in deltas for c in d.tool_calls or [] if c.function.name] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
