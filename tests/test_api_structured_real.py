"""Structured output and tool calling on the real embedded model, through the openai client.

The grammar makes even SmolLM2-135M produce output that parses and validates: a json_schema
response (greedy and sampled), any JSON object, and forced tool calls (required and named,
streamed too). /tokenize and /detokenize round-trip the real tokenizer.
"""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from server_fixtures import FAKE_API_KEY, built_engine_server

from fitserve.config import EngineConfig
from fitserve.startup import build_engine

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
ASK_PERSON = [{"role": "user", "content": "Describe a person as JSON with name, age and city."}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
MAX_TOKENS = 60  # ample for these bounded schemas; a response cut at this length would fail the test


@pytest.fixture(scope="module")
def real():
    built = build_engine(EngineConfig(dtype="float32"), progress=False)
    with built_engine_server(built) as (url, _):
        with openai.OpenAI(base_url=f"{url}/v1", api_key=FAKE_API_KEY, max_retries=0, timeout=120) as client:
            yield url, client


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7}])
def test_json_schema_response_parses_and_validates(real, sampling):
    _, client = real
    resp = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=ASK_PERSON, max_tokens=MAX_TOKENS, **sampling,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    choice = resp.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_the_sdks_parse_helper_with_a_pydantic_model(real):
    _, client = real

    class Person(BaseModel):
        name: str = Field(max_length=24)
        age: int = Field(ge=0, le=120)
        city: Literal["Paris", "Rome", "Oslo"]

    resp = client.chat.completions.parse(model=client.models.list().data[0].id, messages=ASK_PERSON,
                                         max_tokens=MAX_TOKENS, temperature=0, response_format=Person)
    person = resp.choices[0].message.parsed
    assert isinstance(person, Person) and person.city in ("Paris", "Rome", "Oslo")


def test_json_object_is_a_json_object(real):
    _, client = real
    resp = client.chat.completions.create(model=client.models.list().data[0].id, messages=ASK_PERSON,
                                          max_tokens=120, temperature=0, response_format={"type": "json_object"})
    assert resp.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(resp.choices[0].message.content), dict)


def test_invalid_schema_is_a_400(real):
    _, client = real
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=client.models.list().data[0].id, messages=ASK_PERSON, response_format={
            "type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object", "required": 3}}})
    assert info.value.body["param"] == "response_format.json_schema.schema"


@pytest.mark.parametrize("tool_choice, expected", [
    ("required", {"get_weather", "get_time"}),
    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
])
def test_forced_tool_calls_parse_and_validate(real, tool_choice, expected):
    _, client = real
    resp = client.chat.completions.create(model=client.models.list().data[0].id, messages=ASK_WEATHER,
                                          tools=[WEATHER, TIME], tool_choice=tool_choice, max_tokens=MAX_TOKENS,
                                          temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name in expected
    tool = WEATHER if call.function.name == "get_weather" else TIME
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_streamed_forced_tool_call(real):
    _, client = real
    chunks = list(client.chat.completions.create(
        model=client.models.list().data[0].id, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required",
        max_tokens=MAX_TOKENS, temperature=0, stream=True))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call_")
    arguments = json.loads("".join(d.function.arguments or "" for d in deltas))
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tokenize_detokenize_round_trip_on_the_real_tokenizer(real):
    url, client = real
    with openai.OpenAI(base_url=url, api_key=FAKE_API_KEY, max_retries=0) as root:
        text = "The capital of France is Paris."
        tokens = root.post("/tokenize", body={"prompt": text}, cast_to=object)
        assert tokens["count"] == len(tokens["tokens"]) > 3
        assert root.post("/detokenize", body={"tokens": tokens["tokens"]}, cast_to=object)["prompt"] == text
        chat = root.post("/tokenize", body={"messages": ASK_PERSON}, cast_to=object)
    resp = client.chat.completions.create(model=client.models.list().data[0].id, messages=ASK_PERSON, max_tokens=1)
    assert resp.usage.prompt_tokens == chat["count"]


# vLLM's `structured_outputs` extra, on both endpoints (docs/api.md)
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("spec, check", [
    ({"regex": r"[0-9]{3}-[0-9]{4}"}, lambda text: re.fullmatch(r"[0-9]{3}-[0-9]{4}", text)),
    ({"choice": ["Paris", "Rome", "New York"]}, lambda text: text in ("Paris", "Rome", "New York")),
    ({"grammar": 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no"'},
     lambda text: text in ("The answer is yes.", "The answer is no.")),
    ({"json": PERSON}, lambda text: jsonschema.validate(json.loads(text), PERSON) is None),
    ({"json_object": True}, lambda text: isinstance(json.loads(text), dict)),
])
def test_structured_outputs_constrain_both_endpoints(real, endpoint, spec, check):
    _, client = real
    model = client.models.list().data[0].id
    extra = {"structured_outputs": spec}
    if endpoint == "chat":
        choice = client.chat.completions.create(model=model, messages=ASK_PERSON, max_tokens=MAX_TOKENS,
                                                temperature=0, extra_body=extra).choices[0]
        text = choice.message.content
    else:
        choice = client.completions.create(model=model, prompt="The capital of France is", max_tokens=MAX_TOKENS,
                                           temperature=0, extra_body=extra).choices[0]
        text = choice.text
    assert choice.finish_reason == "stop" and check(text), text


def test_completions_take_response_format_as_vllm_does(real):
    _, client = real
    choice = client.completions.create(
        model=client.models.list().data[0].id, prompt="A person as JSON:", max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}}
    ).choices[0]
    assert choice.finish_reason == "stop", choice.text
    jsonschema.validate(json.loads(choice.text), PERSON)


def test_completions_refuse_two_grammars(real):
    url, _ = real
    response = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "response_format": {"type": "json_object"},
                                                          "structured_outputs": {"regex": "a"}})
    assert response.status_code == 400 and "cannot be combined" in response.json()["error"]["message"]


@pytest.mark.parametrize("body, message", [
    ({"structured_outputs": {"regex": "(", }}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "start: missing_rule"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one"),
    ({"structured_outputs": {"choice": []}}, "choice"),
    ({"structured_outputs": {"choice": [str(i) for i in range(4097)]}}, "at most 4096"),
    ({"structured_outputs": {"regex": "a" * 65537}}, "at most 65536"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "cannot be combined"),
])
def test_bad_structured_outputs_are_400s(real, body, message):
    url, _ = real
    response = httpx.post(f"{url}/v1/chat/completions", json={"messages": ASK_PERSON, "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_the_responses_api_forces_a_function_call_and_follows_a_schema(real):
    """/v1/responses on the real model: a forced call comes as a function_call item (streamed as
    argument deltas too), and text.format json_schema gives text that validates."""
    _, client = real
    model = client.models.list().data[0].id
    tool = {"type": "function", **WEATHER["function"]}
    resp = client.responses.create(model=model, input="What is the weather in Paris?", tools=[tool],
                                   tool_choice="required", max_output_tokens=MAX_TOKENS, temperature=0)
    [call] = resp.output
    assert call.type == "function_call" and call.name == "get_weather" and resp.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    events = list(client.responses.create(model=model, input="What is the weather in Paris?", tools=[tool],
                                          tool_choice="required", max_output_tokens=MAX_TOKENS, temperature=0,
                                          stream=True))
    streamed = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert streamed == call.arguments and events[-1].type == "response.completed"
    person = client.responses.create(model=model, input=ASK_PERSON[0]["content"], max_output_tokens=MAX_TOKENS,
                                     temperature=0, text={"format": {"type": "json_schema", "name": "person",
                                                                     "schema": PERSON}})
    jsonschema.validate(json.loads(person.output_text), PERSON)
