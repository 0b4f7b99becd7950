"""--tool-call-parser: hermes (<tool_call>) and mistral ([TOOL_CALLS]) replies as tool_calls, whole and
streamed with the reply cut at every character boundary (the arguments in fragments as they are written,
adding up to the whole reply's arguments string); malformed calls stay content; and through the openai
client on a scripted fake engine, its stream accumulation included."""

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


def streamed_raw(parser_name, pieces, plan=PLAN):
    """(content, [(name, arguments text as the fragments add up)], the stream's own calls)."""
    stream = ToolCallStream(plan, tool_parser(parser_name))
    deltas = [d for piece in pieces for d in stream.feed(piece)] + stream.finish()
    content = "".join(d.content or "" for d in deltas)
    calls = {}
    for delta in deltas:
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"name": None, "arguments": ""})
            if call.function.name is not None:
                assert entry["name"] is None and call.id.startswith("call_"), "id and name come first, once"
                entry["name"] = call.function.name
            else:
                assert entry["name"] is not None, "arguments after the call's name"
            entry["arguments"] += call.function.arguments or ""
    return content, [(c["name"], c["arguments"]) for _, c in sorted(calls.items())], stream.calls


def streamed(parser_name, pieces):
    content, calls, final = streamed_raw(parser_name, pieces)
    assert [(c.function.name, c.function.arguments) for c in final] == calls, "fragments add up to the calls"
    return content, [(name, json.loads(arguments)) for name, arguments in calls]


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
    ("hermes", '<tool_call>{"name": "no_such_tool", "arguments": {}}</tool_call>'),
    ("hermes", '<tool_call>{"name": "get_weather" "arguments": {}}</tool_call>'),
    ("hermes", "I use <tool_calling> a lot"),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "argument'),
    ("mistral", "no calls here [TOOL_CALL"),
])
def test_malformed_calls_are_content(parser, text):
    """Whole, and streamed when the text never showed a call's name and arguments (nothing was sent)."""
    message, finish_reason = chat_reply(text, "stop", PLAN, tool_parser(parser))
    assert (message.content, message.tool_calls, finish_reason) == (text, None, "stop")
    for cut in range(len(text) + 1):
        assert streamed(parser, [text[:cut], text[cut:]]) == (text, []), cut


@pytest.mark.parametrize(("parser", "text", "sent"), [
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>', '{"city": '),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Par', '{"city": "Par'),
])
def test_a_call_that_breaks_off_after_its_name_keeps_what_was_sent(parser, text, sent):
    """Whole it is content; streamed, its id, name and arguments so far went out before the end (no
    retraction), the rest is dropped, and the stream reports no calls (the engine's finish_reason)."""
    assert chat_reply(text, "stop", PLAN, tool_parser(parser))[0].content == text
    assert streamed_raw(parser, list(text)) == ("", [("get_weather", sent)], [])


ODD_ARGUMENTS = ('{ "city":"Par\\u00eds\\/Nord" ,"days" : 3.50,"big":1E3, "ok":true,"tags":[ "a" ,"b\\n\\u00e9"],'
                 '"none":null, "emoji": "\\ud83d\\ude00 ü", "nested": {"x": [-0.0, 12, {}]}}')


@pytest.mark.parametrize("parser", ["hermes", "mistral"])
def test_streamed_arguments_are_the_whole_replys_arguments_exactly(parser):
    """Spacing, escapes, numbers and non-ASCII as a model may write them: the fragments, cut anywhere,
    add up to the very `arguments` string of the whole reply (json.dumps of the parsed object)."""
    call = f'{{"name": "get_weather", "arguments": {ODD_ARGUMENTS}}}'
    text = f"<tool_call>\n{call}\n</tool_call>" if parser == "hermes" else f"[TOOL_CALLS] [{call}]"
    message, _ = chat_reply(text, "stop", PLAN, tool_parser(parser))
    whole = message.tool_calls[0].function.arguments
    assert whole == json.dumps(json.loads(ODD_ARGUMENTS))
    for cut in range(len(text) + 1):
        assert streamed_raw(parser, [text[:cut], text[cut:]])[1] == [("get_weather", whole)], cut
    assert streamed_raw(parser, list(text))[1] == [("get_weather", whole)]


@pytest.mark.parametrize(("parser", "text"), [("hermes", HERMES_TWO), ("mistral", MISTRAL_REPLY)])
def test_arguments_stream_in_fragments_before_the_reply_ends(parser, text):
    """Fed a character at a time: the first call's name goes out once it is whole, its arguments in
    several fragments as they grow, all before the reply ends."""
    stream = ToolCallStream(PLAN, tool_parser(parser))
    before_end = [(i, c) for i, char in enumerate(text) for d in stream.feed(char) for c in d.tool_calls or []]
    first = [(i, c) for i, c in before_end if c.index == 0]
    assert first[0][1].function.name == "get_weather"
    assert first[0][0] == text.index('"arguments": {') + len('"arguments": {') - 1  # at the arguments' brace
    fragments = [c.function.arguments for _, c in first[1:]]
    assert len(fragments) >= 5 and "".join(fragments) == '{"city": "Paris"}'
    assert stream.finish() == []  # every call and fragment went out while the reply was written
    assert stream.calls and stream.calls[0].id == first[0][1].id


def test_parallel_tool_calls_false_streams_the_first_call_only():
    plan = ToolPlan(PLAN.offered, "auto", parallel=False)
    content, calls, final = streamed_raw("hermes", list(HERMES_TWO), plan)
    assert calls == [("get_weather", '{"city": "Paris"}')] and [c.function.name for c in final] == ["get_weather"]


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
    assert "".join(c.function.arguments or "" for c in calls) == call.function.arguments == '{"city": "Paris"}'
    assert len([c for c in calls if c.function.arguments]) > 2, "arguments arrive in several fragments"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    with client.chat.completions.stream(model="fake-model", messages=USER, tools=[WEATHER]) as stream:
        final = stream.get_final_completion()  # the SDK's own accumulation of the deltas
    (accumulated,) = final.choices[0].message.tool_calls
    assert (accumulated.function.name, accumulated.function.arguments) == ("get_weather", call.function.arguments)
    assert accumulated.id.startswith("call_") and final.choices[0].finish_reason == "tool_calls"


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


@pytest.mark.parametrize(("raw", "settled", "closed"), [
    ('{"a": 1', '{"a": ', False),  # 1 may become 12
    ('{"a": tr', '{"a": ', False),
    ('{"a": "x\\u00', '{"a": "x', False),  # an escape is sent whole
    ('{"a" :1 }  trailing', '{"a": 1}', True),
    ('{"a": @}', None, None),
])
def test_the_canonical_prefix_holds_back_what_may_still_change(raw, settled, closed):
    from fitserve.server.tool_parsers.streaming import canonical_json_prefix
    prefix = canonical_json_prefix(raw)
    if settled is None:
        assert prefix is None
    else:
        assert (prefix.text, prefix.closed) == (settled, closed)


class _CountingText(str):
    """A text that counts the characters read out of it (by index or slice)."""

    reads = 0

    def __getitem__(self, key):
        part = super().__getitem__(key)
        _CountingText.reads += len(part)
        return part


def test_a_long_argument_streamed_a_character_at_a_time_is_read_once():
    """Each feed resumes where the last stopped, inside a string, number or escape too: a call's
    arguments of thousands of tokens cost each token its own characters, not the whole text again
    (that was 17 s of the API's event loop for a 4000-token argument)."""
    from fitserve.server.tool_parsers.streaming import CanonicalJsonStream
    value = {"text": "abcd \\u00e9 \" " * 300, "n": 123456789012345, "items": [1.5, True, None, "x\u00e9"] * 50}
    raw = json.dumps(value, ensure_ascii=False)
    stream, out = CanonicalJsonStream(), []
    _CountingText.reads = 0
    for end in range(1, len(raw) + 1):
        out.append(stream.feed(_CountingText(raw[:end])))
    assert "".join(out) == json.dumps(value) and stream.closed
    assert _CountingText.reads < 4 * len(raw), "a character is read a bounded number of times"
