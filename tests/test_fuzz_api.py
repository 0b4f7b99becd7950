"""Property-based fuzz of the HTTP API over the real engine with the fake runner.

Two generators: schemathesis, from the app's own OpenAPI schema (valid bodies and, in its
negative mode, bodies that break the schema), and hypothesis, from the request models' fields
with values of every JSON type, plus raw bytes. Whatever comes in: no 5xx, every error in
OpenAI's shape, every success well formed, and afterwards every KV block free.
Both are derandomized, so CI runs the same examples every time. A third part fuzzes
chat_template_kwargs and unicode edge cases (lone surrogates, NUL, the last codepoints) through the
real tokenizer and its chat template, with and without --trust-request-chat-template.
"""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_helpers import OPENAI_ERROR_KEYS, VOCAB_SIZE, assert_all_blocks_free, byte_tokenizer, engine_server

from fitserve.config import ServerConfig
from fitserve.engine.chat_template import RESERVED_TEMPLATE_ARGS
from fitserve.server.app import build_app
from fitserve.server.protocol import ChatCompletionRequest, CompletionRequest

MAX_MODEL_LEN = 128
SCHEMATHESIS_EXAMPLES = 60  # per operation and mode
HYPOTHESIS_EXAMPLES = 120
FUZZ_SETTINGS = settings(max_examples=HYPOTHESIS_EXAMPLES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck))

schema = schemathesis.openapi.from_dict(build_app().openapi())
schema.config.generation.update(
    modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
    max_examples=SCHEMATHESIS_EXAMPLES, deterministic=True,
)
# schemathesis stops reading an event stream after 20 events (its default) and hands back what it
# read, so a longer stream would lack its `[DONE]`; read every event (the 30 s timeout still ends a
# stream that never stops). Which examples stream depends on the constants Hypothesis finds in the
# loaded modules, so a long stream turns up in some runs only.
schema.config.max_stream_events = 10**9


@pytest.fixture(scope="module")
def server():
    # A small body limit and a short timeout put those paths under fuzz too.
    config = ServerConfig(max_request_body_bytes=64 * 1024, request_timeout_s=5.0)
    with engine_server(config, num_blocks=256, max_model_len=MAX_MODEL_LEN) as (url, engine):
        yield url, engine


def check_response(status: int, content_type: str, body: bytes) -> None:
    """The contract every answer keeps, whatever the request was."""
    assert status < 500, (status, body[:500])
    if status >= 400:
        error = json.loads(body)["error"]
        assert set(error) == OPENAI_ERROR_KEYS and isinstance(error["message"], str) and error["message"]
    elif content_type.startswith("text/event-stream"):
        events = [e for e in body.decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]", events[-3:]
        for event in events[:-1]:
            chunk = json.loads(event.removeprefix("data: "))
            assert "error" not in chunk, chunk
    elif content_type.startswith("application/json"):
        json.loads(body)


@schema.parametrize()
def test_schemathesis(case, server):
    url, _ = server
    response = case.call(base_url=url, timeout=30)
    assert not response.stream_cut_short, "the client stopped reading the event stream"
    content_type = response.headers.get("content-type") or [""]  # schemathesis: a list per header
    check_response(response.status_code, content_type[0], response.content)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": ["a", "b"], "n": 2, "max_tokens": 12}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 3, "max_tokens": 9}),
])
def test_schemathesis_reads_long_streams_whole(server, path, body):
    """A stream of more events than schemathesis reads by default still ends in `[DONE]`."""
    url, _ = server
    case = schema[path]["POST"].Case(body={**body, "stream": True}, media_type="application/json")
    response = case.call(base_url=url, timeout=30)
    assert not response.stream_cut_short
    check_response(response.status_code, response.headers["content-type"][0], response.content)
    events = [e for e in response.content.decode().split("\n\n") if e]
    assert len(events) > 20  # more than schemathesis's default


# -- hypothesis over the request models' fields --------------------------------------------------

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
ANY_JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
TOKEN_IDS = st.lists(st.integers(-5, VOCAB_SIZE + 5), min_size=0, max_size=MAX_MODEL_LEN + 4)
MESSAGES = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "robot"]),
     "content": st.text(max_size=40) | st.none() | st.just([{"type": "text", "text": "hi"}])}),
    min_size=0, max_size=3)
PLAUSIBLE = {  # values near the valid range; each field also gets any JSON at all
    "prompt": st.text(max_size=60) | TOKEN_IDS | st.lists(TOKEN_IDS, max_size=3) | st.lists(st.text(max_size=9), max_size=3),
    "messages": MESSAGES,
    "max_tokens": st.integers(-2, MAX_MODEL_LEN + 2) | st.integers(),
    "max_completion_tokens": st.integers(-2, MAX_MODEL_LEN + 2),
    "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5), "top_k": st.integers(-3, 2000),
    "min_p": st.floats(-0.5, 1.5), "seed": st.integers(), "n": st.integers(0, 3),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3),
    "stop_token_ids": st.lists(st.integers(-3, VOCAB_SIZE + 3), max_size=3),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(), "model": st.sampled_from(["fake-real", "other-model"]),
}


def request_bodies(model: type) -> st.SearchStrategy[dict]:
    fields = {name: PLAUSIBLE.get(name, ANY_JSON) | ANY_JSON for name in model.model_fields}
    return st.fixed_dictionaries({}, optional=fields)


@FUZZ_SETTINGS
@given(path_and_body=st.sampled_from(["/v1/completions"]).flatmap(lambda p: st.tuples(st.just(p), request_bodies(CompletionRequest)))
       | st.sampled_from(["/v1/chat/completions"]).flatmap(lambda p: st.tuples(st.just(p), request_bodies(ChatCompletionRequest))))
def test_hypothesis_request_fields(server, path_and_body):
    url, _ = server
    path, body = path_and_body
    resp = httpx.post(f"{url}{path}", json=body, timeout=30)
    check_response(resp.status_code, resp.headers.get("content-type", ""), resp.content)


@FUZZ_SETTINGS
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/nope"]),
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
       content=st.binary(max_size=300) | ANY_JSON.map(lambda v: json.dumps(v).encode()),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]))
def test_hypothesis_raw_bodies(server, path, method, content, content_type):
    url, _ = server
    headers = {"content-type": content_type} if content_type else {}
    resp = httpx.request(method, f"{url}{path}", content=content, headers=headers, timeout=30)
    check_response(resp.status_code, resp.headers.get("content-type", ""), resp.content)


@pytest.mark.parametrize("raw", [  # Python's JSON parser reads these non-standard literals
    b'{"prompt": "a", "temperature": NaN}', b'{"prompt": "a", "top_p": Infinity}', b'{"prompt": "a", "min_p": -Infinity}',
    b'{"prompt": "a", "max_tokens": 1e999}', b'{"prompt": "a", "seed": 99999999999999999999999}',
    b'{"prompt": [' + b"1," * 5000 + b'1]}', b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
])
def test_edge_literals(server, raw):
    url, _ = server
    resp = httpx.post(f"{url}/v1/completions", content=raw, headers={"content-type": "application/json"}, timeout=30)
    check_response(resp.status_code, resp.headers.get("content-type", ""), resp.content)


# -- chat_template_kwargs and unicode edge cases, through the real tokenizer's chat template -------

EDGE_TEXT = st.sampled_from(["\ud800", "a\udfffb", "\x00", "nul\x00in", "\U0010ffff", "\ufffe\uffff", "\u202e",
                             "\U0001f600" * 3, "{{ messages }}", "{% for %}", "\r\n\t"])
UNICODE_TEXT = (st.text(st.characters(codec="utf-8"), max_size=30) | st.text(max_size=30) | EDGE_TEXT
                | st.lists(EDGE_TEXT, max_size=4).map("".join))
TEMPLATE_KWARGS = st.dictionaries(
    st.sampled_from(sorted(RESERVED_TEMPLATE_ARGS)) | st.sampled_from(["enable_thinking", "date_string"])
    | UNICODE_TEXT,
    ANY_JSON | UNICODE_TEXT, max_size=4)
TEMPLATES = st.sampled_from(["{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
                             "{{ messages | tojson }}{{ enable_thinking }}", "{{ raise_exception(x) }}",
                             "{% for i in range(100000) %}{{ i }}{% endfor %}", "{{ ''.__class__ }}"]) | UNICODE_TEXT
UNICODE_MESSAGES = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": UNICODE_TEXT}), min_size=1, max_size=3)
TEMPLATE_EXAMPLES = 40  # with the flag each render starts a child process (~0.1-0.5 s)


def post_json(url: str, body: dict) -> httpx.Response:
    """POST `body` as ASCII JSON: a lone surrogate travels as the escape `\\ud800`, as JSON allows
    (httpx's own encoder writes UTF-8, which cannot carry one)."""
    return httpx.post(url, content=json.dumps(body).encode(), headers={"content-type": "application/json"},
                      timeout=30)


@pytest.fixture(scope="module", params=[False, True], ids=["default", "trusted"])
def template_server(request):
    config = ServerConfig(request_timeout_s=10.0, trust_request_chat_template=request.param)
    with engine_server(config, num_blocks=256, max_model_len=MAX_MODEL_LEN, tokenizer=byte_tokenizer()) as served:
        yield served


@settings(FUZZ_SETTINGS, max_examples=TEMPLATE_EXAMPLES)
@given(messages=UNICODE_MESSAGES, kwargs=TEMPLATE_KWARGS | st.none(), template=st.none() | TEMPLATES,
       path=st.sampled_from(["/v1/chat/completions", "/tokenize"]), stream=st.booleans())
def test_hypothesis_chat_template_kwargs_and_unicode(template_server, messages, kwargs, template, path, stream):
    url, _ = template_server
    if template is not None:
        kwargs = {**(kwargs or {}), "chat_template": template}
    body = {"messages": messages, "chat_template_kwargs": kwargs, "max_tokens": 3, "stream": stream}
    if path == "/tokenize":
        del body["max_tokens"], body["stream"]
    resp = post_json(f"{url}{path}", body)
    check_response(resp.status_code, resp.headers.get("content-type", ""), resp.content)


@pytest.mark.parametrize("prompt", ["\ud800", "a\udfffb", "\x00", "\U0010ffff", "\ufffe"])
def test_unicode_edges_in_prompts(template_server, prompt):
    url, _ = template_server
    for path, body in (("/v1/completions", {"prompt": prompt, "max_tokens": 2}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], "max_tokens": 2}),
                       ("/tokenize", {"prompt": prompt})):
        resp = post_json(f"{url}{path}", body)
        check_response(resp.status_code, resp.headers.get("content-type", ""), resp.content)


def test_nothing_leaked_after_the_template_fuzz(template_server):
    _, engine = template_server
    assert_all_blocks_free(engine)
    assert engine.is_healthy()


def test_nothing_leaked_after_the_fuzz(server):
    _, engine = server
    assert_all_blocks_free(engine)
    assert engine.is_healthy()
