"""--api-key: /v1/* needs `Authorization: Bearer <key>`; /health and /version stay open."""

from __future__ import annotations

import httpx
import openai
import pytest
from fake_engine import FakeEngine
from server_fixtures import live_server

from fitserve.server.app import build_app

API_KEY = "sk-test-key"


@pytest.fixture(scope="module")
def url():
    with live_server(build_app(FakeEngine(), api_key=API_KEY)) as url:
        yield url


def test_right_key_is_accepted(url):
    with openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0) as client:
        resp = client.completions.create(model="fake-model", prompt="a", max_tokens=1)
    assert resp.choices[0].text == "b"


@pytest.mark.parametrize("key", ["wrong", API_KEY + "x", ""])
def test_wrong_key_is_401(url, key):
    with openai.OpenAI(base_url=f"{url}/v1", api_key=key or "-", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as info:
            client.models.list()
    assert info.value.status_code == 401


def test_missing_header_gets_openai_shape(url):
    with httpx.Client(base_url=url) as http:
        resp = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert resp.status_code == 401 and resp.headers.get("x-request-id")
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
        assert http.get("/health").status_code == 200
        assert http.get("/version").status_code == 200
