"""Exposure: several API keys (or FITSERVE_API_KEY), a separate /metrics key, CORS as vLLM
names it, request ids in headers, logs and 500s, and prompts kept out of the logs."""

from __future__ import annotations

import logging

import httpx
import pytest
from fake_engine import FakeEngine
from reliability_helpers import assert_openai_error, engine_server
from server_fixtures import live_server

from fitserve.config import API_KEY_ENV, ServerConfig
from fitserve.server.app import build_app

KEYS = ("sk-first", "sk-second-longer-key")
METRICS_KEY = "metrics-secret"
SECRET_PROMPT = "my-password-is-hunter2"


@pytest.fixture(scope="module")
def url():
    config = ServerConfig(api_keys=KEYS, metrics_api_key=METRICS_KEY, allowed_origins=("https://app.example",))
    with live_server(build_app(FakeEngine(), config=config)) as url:
        yield url


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("key", KEYS)
def test_every_configured_key_opens_v1(url, key):
    resp = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 1}, headers=bearer(key))
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "b"
    lower = httpx.get(f"{url}/v1/models", headers={"Authorization": f"bearer {key}"})
    assert lower.status_code == 200  # the scheme is case-insensitive


@pytest.mark.parametrize("headers", [
    {}, bearer("sk-first x"), bearer("sk-firs"), bearer(METRICS_KEY), {"Authorization": KEYS[0]},
    {"Authorization": f"Basic {KEYS[0]}"}, {"Authorization": f"Bearer {KEYS[0]}{KEYS[1]}"},
])
def test_anything_else_is_401(url, headers):
    resp = httpx.get(f"{url}/v1/models", headers=headers)
    assert_openai_error(resp, 401)
    assert resp.headers["www-authenticate"] == "Bearer" and resp.headers["x-request-id"]


def test_metrics_needs_its_own_key_whether_or_not_the_route_exists(url):
    assert_openai_error(httpx.get(f"{url}/metrics"), 401)
    assert_openai_error(httpx.get(f"{url}/metrics", headers=bearer(KEYS[0])), 401)
    assert httpx.get(f"{url}/metrics", headers=bearer(METRICS_KEY)).status_code in (200, 404)
    assert httpx.get(f"{url}/health").status_code == 200  # probes need no key
    assert httpx.get(f"{url}/version").status_code == 200


def test_metrics_need_the_api_key_without_a_metrics_key():
    with live_server(build_app(FakeEngine(), api_key="k")) as url:
        assert_openai_error(httpx.get(f"{url}/metrics"), 401)
        assert httpx.get(f"{url}/metrics", headers=bearer("k")).status_code in (200, 404)
    with live_server(build_app(FakeEngine())) as url:  # no key at all: open
        assert httpx.get(f"{url}/metrics").status_code in (200, 404)


def test_api_keys_from_the_environment(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, " one, two ,")
    assert ServerConfig().api_keys == ("one", "two")
    assert ServerConfig(api_keys=("flag",)).api_keys == ("flag",)  # a flag wins over the environment


def test_cors_preflight_and_origins(url):
    allowed = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}
    preflight = httpx.options(f"{url}/v1/chat/completions", headers=allowed)  # no key: browsers send none
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    denied = httpx.options(f"{url}/v1/chat/completions", headers={**allowed, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in denied.headers
    resp = httpx.get(f"{url}/v1/models", headers={**bearer(KEYS[0]), "Origin": "https://app.example"})
    assert resp.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in resp.headers["access-control-expose-headers"].lower()


def test_internal_error_names_the_request_id_never_the_exception(caplog, monkeypatch):
    engine = FakeEngine()

    def boom(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(engine.tokenizer, "encode", boom)
    with live_server(build_app(engine)) as url, caplog.at_level(logging.ERROR):
        resp = httpx.post(f"{url}/v1/completions", json={"prompt": "a"}, headers={"X-Request-Id": "trace-42"})
    error = assert_openai_error(resp, 500)
    assert "secret" not in resp.text and "trace-42" in error["message"]
    assert resp.headers["x-request-id"] == "trace-42"
    logged = [r for r in caplog.records if "trace-42" in r.getMessage()]
    assert logged and logged[0].exc_info is not None


def _serve_one_request(config: ServerConfig, caplog) -> str:
    with caplog.at_level(logging.DEBUG), engine_server(config) as (url, _):
        resp = httpx.post(f"{url}/v1/completions", json={"prompt": SECRET_PROMPT, "max_tokens": 2})
        assert resp.status_code == 200
        return resp.headers["x-request-id"]


def test_prompts_are_not_logged_by_default_but_request_ids_are(caplog):
    request_id = _serve_one_request(ServerConfig(), caplog)
    text = caplog.text
    assert SECRET_PROMPT not in text and "prompt tokens" not in text
    access = [r.getMessage() for r in caplog.records if r.name == "fitserve.access"]
    assert any(request_id in line and "/v1/completions" in line and " 200 " in line for line in access)


def test_enable_log_requests_logs_the_prompt_tokens(caplog):
    request_id = _serve_one_request(ServerConfig(enable_log_requests=True, max_log_len=4), caplog)
    logged = [r.getMessage() for r in caplog.records if "prompt tokens" in r.getMessage()]
    assert len(logged) == 1 and request_id in logged[0] and f"{len(SECRET_PROMPT) + 1} prompt tokens" in logged[0]
