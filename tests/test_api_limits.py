"""Request intake over HTTP: the caps on the work one request creates (checked before anything is
tokenized), tokenizing off the event loop, text that is not valid Unicode, and the engine's limit
errors renamed to the fields the client sent."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from fake_engine import FakeEngine, FakeTokenizer
from server_fixtures import FAKE_API_KEY, live_server

from fitserve.config import ServerConfig
from fitserve.server.app import build_app

USER = [{"role": "user", "content": "hi"}]
CAPS = ServerConfig(max_n=4, max_prompts_per_request=3, max_choices_per_request=6, max_prompt_tokens_per_request=20)
BLOCKED_WAIT_S = 10.0  # a bound on each wait for the blocked tokenizer's server; never reached when all is well


class CountingTokenizer(FakeTokenizer):
    """The fake tokenizer, counting the prompts it encodes."""

    def __init__(self) -> None:
        self.num_encoded = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.num_encoded += 1
        return super().encode(text, add_special_tokens)


class BlockingTokenizer(FakeTokenizer):
    """Encodes only once `release` is set (the test always sets it on the way out); `entered` says
    an encode has started. On the event loop it would hold every other request until then."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.entered.set()
        self.release.wait()
        return super().encode(text, add_special_tokens)


@pytest.fixture(scope="module")
def capped():
    tokenizer = CountingTokenizer()
    engine = FakeEngine(tokenizer=tokenizer)
    with live_server(build_app(engine, config=CAPS)) as url, httpx.Client(base_url=url, timeout=10) as http:
        yield http, engine, tokenizer


def assert_400(resp: httpx.Response, param: str, *words: str) -> dict[str, Any]:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert all(word in error["message"] for word in words), error["message"]
    return error


@pytest.mark.parametrize("body, param, flag", [
    ({"prompt": ["a", "b"], "n": 5}, "n", "--max-n"),
    ({"prompt": ["a", "b", "c", "d"]}, "prompt", "--max-prompts-per-request"),
    ({"prompt": ["a", "b", "c"], "n": 3}, "n", "--max-choices-per-request"),  # 9 choices, each cap alone allows it
])
def test_fan_out_caps_are_400s_before_anything_is_tokenized(capped, body, param, flag):
    http, engine, tokenizer = capped
    num_encoded, num_requests = tokenizer.num_encoded, len(engine.requests)
    assert_400(http.post("/v1/completions", json={**body, "max_tokens": 2}), param, flag)
    assert tokenizer.num_encoded == num_encoded and len(engine.requests) == num_requests


def test_n_cap_on_chat(capped):
    http, _, _ = capped
    assert_400(http.post("/v1/chat/completions", json={"messages": USER, "n": 5}), "n", "--max-n")


def test_prompt_token_total_of_token_id_prompts_is_counted_before_tokenizing(capped):
    http, engine, tokenizer = capped
    num_encoded, num_requests = tokenizer.num_encoded, len(engine.requests)
    body = {"prompt": [[1] * 11, [2] * 10], "max_tokens": 2}
    assert_400(http.post("/v1/completions", json=body), "prompt", "--max-prompt-tokens-per-request")
    assert tokenizer.num_encoded == num_encoded and len(engine.requests) == num_requests


def test_prompt_token_total_stops_tokenizing_at_the_prompt_past_it(capped):
    http, engine, tokenizer = capped
    num_encoded, num_requests = tokenizer.num_encoded, len(engine.requests)
    body = {"prompt": ["a" * 10, "b" * 10, "c" * 10], "max_tokens": 2}  # 11 tokens each with BOS: 22 > 20
    assert_400(http.post("/v1/completions", json=body), "prompt", "--max-prompt-tokens-per-request")
    assert tokenizer.num_encoded == num_encoded + 2 and len(engine.requests) == num_requests


def test_requests_within_the_caps_are_served(capped):
    http, _, _ = capped
    resp = http.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 2})
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 6


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", '{"prompt": "x\\ud800y", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', "prompt.1"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}', "stop.0"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], '
     '"chat_template_kwargs": {"\\ud800": 1}}', "chat_template_kwargs.'\\ud800'"),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
    ("/tokenize", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages.0.content.0.text"),
])
def test_unpaired_surrogates_are_400s(capped, path, body, param):
    http, _, _ = capped
    resp = http.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert_400(resp, param, "Unicode")


def test_a_paired_surrogate_is_text(capped):
    http, _, _ = capped
    resp = http.post("/tokenize", content=b'{"prompt": "\\ud83d\\ude00"}', headers={"content-type": "application/json"})
    assert resp.status_code == 200 and resp.json()["tokens"][1:] == list("\N{GRINNING FACE}".encode())


def test_stop_token_ids_outside_the_vocabulary_are_a_400(capped):
    http, _, _ = capped
    resp = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "stop_token_ids": [5, 100_000]})
    assert_400(resp, "stop_token_ids", "100000", "vocabulary")


@pytest.mark.parametrize("field, value", [("temperature", True), ("stream", "yes"), ("n", 2.0), ("max_tokens", "5"),
                                          ("top_p", "0.5"), ("ignore_eos", 1)])
def test_loose_types_are_400s(capped, field, value):
    http, _, _ = capped
    assert_400(http.post("/v1/completions", json={"prompt": "a", field: value}), field)


def test_engine_limit_errors_name_the_clients_fields():
    with live_server(build_app(FakeEngine())) as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key=FAKE_API_KEY, max_retries=0, timeout=10) as client:
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model="fake-model", messages=USER, logprobs=True, top_logprobs=21)
            assert info.value.param == "top_logprobs" and "`top_logprobs` is too large" in info.value.message
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model="fake-model", messages=USER, max_completion_tokens=500)
            assert info.value.param == "max_completion_tokens"
            assert "`max_completion_tokens` is too large" in info.value.message
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x" * 200}])
            assert info.value.param == "messages" and "context length" in info.value.message
            with pytest.raises(openai.BadRequestError) as info:
                client.completions.create(model="fake-model", prompt="a", logprobs=21, echo=True)
            assert info.value.param == "logprobs"


@pytest.mark.parametrize("path, body", [
    ("/tokenize", {"prompt": "huge"}),
    ("/v1/completions", {"prompt": "huge", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 2}),
])
def test_health_answers_while_a_prompt_is_being_tokenized(path, body):
    tokenizer = BlockingTokenizer()
    with live_server(build_app(FakeEngine(tokenizer=tokenizer))) as url, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{url}{path}", json=body, timeout=BLOCKED_WAIT_S * 2)
        try:
            assert tokenizer.entered.wait(BLOCKED_WAIT_S)
            health = httpx.get(f"{url}/health", timeout=BLOCKED_WAIT_S)  # on the event loop, beside the encode
            assert health.status_code == 200 and not tokenizer.release.is_set()
        finally:
            tokenizer.release.set()
        assert pending.result().status_code == 200
