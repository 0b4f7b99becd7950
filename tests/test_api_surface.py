"""POST /tokenize and /detokenize, GET /v1/compat and --strict, through the official openai client."""

from __future__ import annotations

import logging

import httpx
import openai
import pytest
from fake_engine import BOS_TOKEN_ID, FakeEngine, FakeTokenizer
from server_fixtures import FAKE_API_KEY, live_server

from fitserve.config import ServerConfig
from fitserve.server.app import build_app
from fitserve.server.compat import CHAT, COMPLETIONS, TABLE, markdown_tables
from fitserve.server.protocol import ChatCompletionRequest, CompletionRequest, StreamOptions

USER = [{"role": "user", "content": "hi"}]
API_KEY = "sk-surface"


def root_client(url: str, api_key: str = FAKE_API_KEY) -> openai.OpenAI:
    """An openai client whose base is the server root: /tokenize is not under /v1, as in vLLM."""
    return openai.OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=10)


def post(client: openai.OpenAI, path: str, body: dict) -> dict:
    return client.post(path, body=body, cast_to=object)


# ---------------------------------------------------------------- tokenize / detokenize


def test_tokenize_prompt_and_detokenize_round_trip(api_server):
    with root_client(api_server.url) as client:
        out = post(client, "/tokenize", {"model": "fake-model", "prompt": "héllo"})
        assert out["tokens"] == FakeTokenizer().encode("héllo")
        assert out["count"] == len(out["tokens"]) and out["max_model_len"] == api_server.engine.max_model_len
        assert "token_strs" not in out
        plain = post(client, "/tokenize", {"prompt": "abc", "add_special_tokens": False, "return_token_strs": True})
        assert plain["tokens"] == [97, 98, 99] and plain["token_strs"] == ["a", "b", "c"]
        assert post(client, "/detokenize", {"tokens": out["tokens"]}) == {"prompt": "héllo"}


def test_tokenize_messages_matches_what_chat_feeds_the_model(api_server, client):
    with root_client(api_server.url) as root:
        out = post(root, "/tokenize", {"messages": USER})
    assert out["tokens"] == FakeTokenizer().apply_chat_template(USER) and out["tokens"][0] == BOS_TOKEN_ID
    resp = client.chat.completions.create(model="fake-model", messages=USER, max_tokens=1)
    assert resp.usage.prompt_tokens == out["count"]


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {}, None),
    ("/tokenize", {"prompt": "a", "messages": USER}, None),
    ("/tokenize", {"messages": USER, "add_special_tokens": True}, None),
    ("/tokenize", {"prompt": "a", "model": "other"}, "model"),
    ("/detokenize", {"tokens": [1, 10**6]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens.0"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
])
def test_tokenizer_errors_are_openai_errors(api_server, path, body, param):
    with root_client(api_server.url) as client, pytest.raises(openai.APIStatusError) as info:
        post(client, path, body)
    assert info.value.status_code in (400, 404)
    error = info.value.body["error"] if "error" in info.value.body else info.value.body
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param


def test_tokenizer_routes_need_the_api_key():
    with live_server(build_app(FakeEngine(), api_key=API_KEY)) as url:
        with root_client(url, "wrong") as client, pytest.raises(openai.AuthenticationError):
            post(client, "/tokenize", {"prompt": "a"})
        with root_client(url, API_KEY) as client:
            assert post(client, "/detokenize", {"tokens": [97]}) == {"prompt": "a"}


def test_tokenizer_routes_wait_for_the_engine():
    with live_server(build_app(config=ServerConfig())) as url, httpx.Client(base_url=url) as http:
        resp = http.post("/tokenize", json={"prompt": "a"})
        assert resp.status_code == 503 and resp.json()["error"]["message"]


# ---------------------------------------------------------------- the compat table


def test_every_request_model_field_is_in_the_table():
    """Fails when a request model accepts a field the table does not describe."""
    for endpoint, model in ((CHAT, ChatCompletionRequest), (COMPLETIONS, CompletionRequest)):
        listed = {f.field for f in TABLE[endpoint]}
        assert set(model.model_fields) - listed == set(), endpoint
        nested = {f"stream_options.{name}" for name in StreamOptions.model_fields}
        assert nested - listed == set(), endpoint
        assert len(listed) == len(TABLE[endpoint]), f"{endpoint}: a field is listed twice"


def test_docs_show_the_table():
    from pathlib import Path
    docs = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    assert markdown_tables().strip() in docs, "regenerate with: python -m fitserve.server.compat"


def test_compat_endpoint_serves_the_table(client):
    doc = client.get("/compat", cast_to=object)
    assert doc["strict"] is False
    chat = {row["field"]: row for row in doc["endpoints"][CHAT]}
    assert chat["response_format"]["status"] == "supported" and chat["user"]["status"] == "ignored"
    assert {row["field"] for row in doc["endpoints"][COMPLETIONS]} == {f.field for f in TABLE[COMPLETIONS]}


def test_unsupported_fields_are_ignored_and_logged_once(client, caplog):
    caplog.set_level(logging.WARNING, logger="fitserve.server.compat")
    for _ in range(2):
        resp = client.chat.completions.create(model="fake-model", messages=USER, max_tokens=2, user="u1",
                                              extra_body={"frobnicate": 3, "nothing": None})
        assert resp.choices[0].finish_reason == "length"
    warnings = [r.getMessage() for r in caplog.records if r.name == "fitserve.server.compat"]
    assert sum("'frobnicate'" in w for w in warnings) == 1
    assert sum("'user'" in w for w in warnings) == 1
    assert not any("'nothing'" in w for w in warnings), "a null field is not set"


def test_made_up_field_names_cannot_grow_memory_or_flood_the_log(caplog):
    from fitserve.server.compat import MAX_LOGGED_FIELDS, CompatChecker
    from fitserve.server.protocol import ChatCompletionRequest

    caplog.set_level(logging.WARNING, logger="fitserve.server.compat")
    checker = CompatChecker()
    for i in range(MAX_LOGGED_FIELDS + 50):
        body = ChatCompletionRequest.model_validate({"messages": USER, f"f\n{i}\u202e" + "x" * 500: 1})
        checker.check(CHAT, body)
    warnings = [r.getMessage() for r in caplog.records if r.name == "fitserve.server.compat"]
    assert len(warnings) == MAX_LOGGED_FIELDS + 1 and "no longer logging" in warnings[-1]
    assert all("\n" not in w and len(w) < 200 for w in warnings), "names are escaped and cut"


@pytest.fixture(scope="module")
def strict_client():
    with live_server(build_app(FakeEngine(), config=ServerConfig(strict=True))) as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key=FAKE_API_KEY, max_retries=0, timeout=10) as client:
            yield client


def test_strict_rejects_unsupported_fields_by_name(strict_client):
    cases = [
        (strict_client.chat.completions.create, {"messages": USER, "extra_body": {"frobnicate": 1}}, "frobnicate"),
        (strict_client.chat.completions.create, {"messages": USER, "user": "u1"}, "user"),
        (strict_client.chat.completions.create, {"messages": USER, "metadata": {"a": "b"}}, "metadata"),
        (strict_client.completions.create, {"prompt": "a", "extra_body": {"guided_json": {}}}, "guided_json"),
    ]
    for create, kwargs, field in cases:
        with pytest.raises(openai.BadRequestError) as info:
            create(model="fake-model", max_tokens=2, **kwargs)
        error = info.value.body
        assert error["param"] == field and error["code"] == "unsupported_parameter" and field in error["message"]


def test_strict_serves_supported_fields(strict_client):
    resp = strict_client.chat.completions.create(model="fake-model", messages=USER, max_tokens=2, temperature=0,
                                                 seed=1, stop=["zz"], extra_body={"top_k": 3})
    assert resp.choices[0].finish_reason == "length"
    assert strict_client.get("/compat", cast_to=object)["strict"] is True
