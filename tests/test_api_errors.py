"""Every failure answers OpenAI's error JSON with the right status, never FastAPI's 422 shape."""

from __future__ import annotations

import httpx
import openai
import pytest

from fitserve.engine.errors import EngineDeadError

USER = [{"role": "user", "content": "hi"}]


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.fixture(scope="module")
def http(api_server):
    with httpx.Client(base_url=api_server.url) as c:
        yield c


def test_bad_temperature(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="fake-model", messages=USER, temperature=5)
    assert info.value.status_code == 400 and info.value.param == "temperature"
    assert info.value.type == "invalid_request_error"


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-9", prompt="a")
    assert "gpt-9" in info.value.message and "fake-model" in info.value.message


def test_prompt_too_long(client, api_server):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="fake-model", prompt="a" * api_server.engine.max_model_len)
    assert "context length" in info.value.message and info.value.param == "prompt"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="fake-model", stream=True,
                                       messages=[{"role": "user", "content": "a" * 500}])


def test_engine_rejection_of_a_stream_is_a_400_not_a_broken_stream(client):
    # The server waits for the first engine output before sending 200 headers.
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="fake-model", prompt=[999999], stream=True)
    assert info.value.param == "prompt"


def test_max_tokens_past_the_context(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="fake-model", messages=USER, max_completion_tokens=10_000)
    assert info.value.param == "max_completion_tokens"


def test_n_out_of_range(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="fake-model", messages=USER, n=1000)
    assert info.value.param == "n" and "at most 128" in info.value.message and "--max-n" in info.value.message


def test_malformed_json(http):
    resp = http.post("/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    error = assert_openai_error(resp, 400)
    assert error["type"] == "invalid_request_error" and "JSON" in error["message"]


def test_missing_messages(http):
    error = assert_openai_error(http.post("/v1/chat/completions", json={"model": "fake-model"}), 400, "messages")
    assert "messages" in error["message"]


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "stop": ["", "x"]}, "stop"),
    ({"prompt": "a", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": [999999]}, "prompt"),
    ({"prompt": []}, "prompt"),
])
def test_invalid_completion_params(http, body, param):
    assert_openai_error(http.post("/v1/completions", json=body), 400, param)


def test_unknown_route_and_wrong_method(http):
    assert_openai_error(http.get("/v1/nothing-here"), 404)
    assert_openai_error(http.get("/v1/chat/completions"), 405)


def test_internal_error_is_generic(api_server, http, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(api_server.engine.tokenizer, "encode", boom)
    error = assert_openai_error(http.post("/v1/completions", json={"prompt": "a"}), 500)
    assert "secret" not in error["message"]
    assert error["type"] == "internal_server_error"


def test_error_mid_stream_is_sent_in_band(api_server, http, monkeypatch):
    original = api_server.engine._run

    async def failing_run(*args):
        async for i, out in _enumerate(original(*args)):
            if i == 2:
                raise RuntimeError("secret failure")
            yield out

    monkeypatch.setattr(api_server.engine, "_run", failing_run)
    resp = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 5, "stream": True})
    assert resp.status_code == 200
    events = resp.text.split("\n\n")
    assert '"error"' in events[-3] and "secret" not in resp.text
    assert events[-2] == "data: [DONE]"


async def _enumerate(stream):
    i = 0
    async for item in stream:
        yield i, item
        i += 1


def test_union_type_errors_name_the_field(http):
    error = assert_openai_error(http.post("/v1/completions", json={"prompt": {"text": "x"}}), 400, "prompt")
    assert "accepted types" in error["message"]
    assert_openai_error(http.post("/v1/completions", content=b"[1]", headers={"content-type": "application/json"}), 400)


def test_dead_engine_is_503(api_server, client, monkeypatch):
    async def dead(*args, **kwargs):
        raise EngineDeadError("secret loop failure")
        yield  # an async generator, like the real one

    monkeypatch.setattr(api_server.engine, "generate", dead)
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model="fake-model", prompt="a")
    assert info.value.status_code == 503 and "secret" not in info.value.message
