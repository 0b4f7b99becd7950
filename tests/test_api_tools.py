"""Tool calling and response_format through the openai client, on a fake engine that replies a
scripted text: parsing into `tool_calls`, streamed deltas, tool_choice, the prompt, and 400s."""

from __future__ import annotations

import json

import openai
import pytest
from fake_engine import FakeEngine
from server_fixtures import FAKE_API_KEY, live_server

from fitserve.engine.outputs import RequestOutput
from fitserve.server.app import build_app

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
PIECE_CHARS = 5  # the scripted reply arrives in pieces this long, as a model's tokens would


class ScriptedEngine(FakeEngine):
    """Replies `self.reply`, whatever the prompt, then stops."""

    reply = ""

    async def _run(self, request_id, prompt, params):
        pieces = [self.reply[i:i + PIECE_CHARS] for i in range(0, len(self.reply), PIECE_CHARS)] or [""]
        for count, piece in enumerate(pieces, 1):
            done = count == len(pieces)
            yield RequestOutput(request_id, (97,), piece, done, "stop" if done else None, None, len(prompt), count)


@pytest.fixture(scope="module")
def scripted():
    engine = ScriptedEngine(max_model_len=4096)  # the tool paragraph is long in byte tokens
    with live_server(build_app(engine)) as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key=FAKE_API_KEY, max_retries=0, timeout=10) as client:
            yield engine, client


def last_request(engine):
    prompt_ids, params = list(engine.requests.values())[-1]
    return bytes(t for t in prompt_ids if t < 256).decode(), params


def test_auto_parses_a_llama3_json_call(scripted):
    engine, client = scripted
    engine.reply = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    resp = client.chat.completions.create(model="fake-model", messages=USER, tools=[WEATHER, TIME])
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    prompt, params = last_request(engine)
    assert "get_weather" in prompt and "get_time" in prompt, "the tools are offered in the system message"
    assert prompt.startswith("<system>") and params.structured_output is None


def test_auto_accepts_python_tag_arguments_and_several_calls(scripted):
    engine, client = scripted
    engine.reply = ('<|python_tag|>{"name": "get_weather", "arguments": {"city": "Oslo"}}; '
                    '{"name": "get_time", "parameters": {}}')
    resp = client.chat.completions.create(model="fake-model", messages=USER, tools=[WEATHER, TIME])
    calls = resp.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert len({c.id for c in calls}) == 2
    resp = client.chat.completions.create(model="fake-model", messages=USER, tools=[WEATHER, TIME],
                                          parallel_tool_calls=False)
    assert [c.function.name for c in resp.choices[0].message.tool_calls] == ["get_weather"]


@pytest.mark.parametrize("reply", [
    "It is sunny in Paris.",
    '{"name": "launch_rocket", "parameters": {}}',  # not an offered tool
    '{"name": "get_weather", "parameters": {"city": "Par',  # cut off
])
def test_auto_leaves_other_replies_as_content(scripted, reply):
    engine, client = scripted
    engine.reply = reply
    resp = client.chat.completions.create(model="fake-model", messages=USER, tools=[WEATHER])
    assert resp.choices[0].message.content == reply and not resp.choices[0].message.tool_calls
    assert resp.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="fake-model", messages=USER, tools=[WEATHER], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_streamed_tool_calls_have_openai_delta_shape(scripted):
    engine, client = scripted
    engine.reply = '  {"name": "get_weather", "parameters": {"city": "Lima"}}'
    chunks = list(client.chat.completions.create(model="fake-model", messages=USER, tools=[WEATHER], stream=True))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].type == "function"
    assert deltas[0].function.name == "get_weather" and deltas[0].index == 0
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Lima"}
    assert all(not c.choices[0].delta.content for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    with client.chat.completions.stream(model="fake-model", messages=USER, tools=[WEATHER]) as stream:
        final = stream.get_final_completion()  # the SDK's own accumulation of the deltas
    assert final.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_tool_choice_none_offers_and_parses_nothing(scripted):
    engine, client = scripted
    engine.reply = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    resp = client.chat.completions.create(model="fake-model", messages=USER, tools=[WEATHER], tool_choice="none")
    assert resp.choices[0].message.content == engine.reply and resp.choices[0].finish_reason == "stop"
    prompt, _ = last_request(engine)
    assert "get_weather" not in prompt


def test_required_and_named_are_forced_by_a_grammar(scripted):
    engine, client = scripted
    engine.reply = '{"name": "get_time", "parameters": {}}'
    resp = client.chat.completions.create(model="fake-model", messages=USER, tools=[WEATHER, TIME],
                                          tool_choice="required")
    assert resp.choices[0].message.tool_calls[0].function.name == "get_time"
    _, params = last_request(engine)
    schema = json.loads(params.structured_output.json_schema)
    assert {s["properties"]["name"]["const"] for s in schema["anyOf"]} == {"get_weather", "get_time"}
    client.chat.completions.create(model="fake-model", messages=USER, tools=[WEATHER, TIME],
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
    _, params = last_request(engine)
    schema = json.loads(params.structured_output.json_schema)
    assert schema["properties"]["name"] == {"const": "get_weather"}
    assert schema["properties"]["parameters"] == WEATHER["function"]["parameters"]


def test_a_conversation_with_tool_results(scripted):
    engine, client = scripted
    engine.reply = "It is 21 degrees in Paris."
    messages = [
        {"role": "system", "content": "Be brief."}, *USER,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'},
    ]
    resp = client.chat.completions.create(model="fake-model", messages=messages, tools=[WEATHER])
    assert resp.choices[0].message.content == engine.reply
    prompt, _ = last_request(engine)
    assert prompt.startswith("<system>Be brief.\n\nYou can call functions.")
    assert '<assistant>{"name": "get_weather", "parameters": {"city": "Paris"}}' in prompt
    assert '<tool>{"celsius": 21}' in prompt


def test_response_format_reaches_the_engine(scripted):
    engine, client = scripted
    engine.reply = "{}"
    client.chat.completions.create(model="fake-model", messages=USER, response_format={"type": "json_object"})
    assert json.loads(last_request(engine)[1].structured_output.json_schema) == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    client.chat.completions.create(model="fake-model", messages=USER, response_format={
        "type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}})
    assert json.loads(last_request(engine)[1].structured_output.json_schema) == schema
    client.chat.completions.create(model="fake-model", messages=USER, response_format={"type": "text"})
    assert last_request(engine)[1].structured_output is None


@pytest.mark.parametrize("kwargs, param", [
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": 5}}]}, "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "banana"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "banana"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
])
def test_bad_tools_and_formats_are_400s(scripted, kwargs, param):
    _, client = scripted
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="fake-model", messages=USER, **kwargs)
    assert info.value.status_code == 400 and info.value.body["param"] == param, info.value.body
