"""/health names the phase: 503 while starting, draining or failed, 200 when ready; /v1/*
waits for the engine; an engine-loop crash fails requests, turns /health to 503 and is logged."""

from __future__ import annotations

import logging

import httpx
import pytest
from reliability_helpers import (
    MODEL,
    SlowRunner,
    assert_openai_error,
    engine_server,
    expected_text,
    make_engine,
)
from server_fixtures import live_server

from fitserve.bench.server_process import free_port
from fitserve.config import ConfigError, ServerConfig
from fitserve.server import launcher
from fitserve.server.app import attach_engine, build_app
from fitserve.server.lifecycle import Phase, ServerLifecycle


def health(http: httpx.Client) -> tuple[int, str]:
    resp = http.get("/health")
    body = resp.json()
    if resp.status_code != 200:
        assert_openai_error(resp, 503)
        assert body["error"]["code"] == body["phase"]
    return resp.status_code, body["phase"]


def test_server_answers_while_the_engine_loads_then_serves():
    lifecycle = ServerLifecycle()
    app = build_app(config=ServerConfig(), lifecycle=lifecycle)
    engine = make_engine()
    try:
        with live_server(app) as url, httpx.Client(base_url=url) as http:
            assert health(http) == (503, "starting")
            lifecycle.set_phase(Phase.LOADING)
            assert health(http) == (503, "loading")
            refused = http.post("/v1/completions", json={"prompt": [1]})
            assert assert_openai_error(refused, 503)["code"] == "loading"
            assert int(refused.headers["retry-after"]) > 0
            assert_openai_error(http.get("/v1/models"), 503)
            assert http.get("/version").status_code == 200
            attach_engine(app, engine)
            assert health(http) == (200, "ready")
            resp = http.post("/v1/completions", json={"model": MODEL, "prompt": [1], "max_tokens": 2})
            assert resp.json()["choices"][0]["text"] == expected_text(1, 2)
            lifecycle.begin_draining()
            assert health(http) == (503, "draining")
            assert_openai_error(http.post("/v1/completions", json={"prompt": [1]}), 503)
    finally:
        engine.shutdown()


class CrashingRunner(SlowRunner):
    def execute(self, scheduler_output):
        if self.num_steps >= 3:
            raise RuntimeError("device fell over: secret detail")
        return super().execute(scheduler_output)


def test_engine_loop_crash_fails_requests_and_health(caplog):
    with engine_server(step_delay_s=0.01) as (url, engine):
        engine.engine.runner.__class__ = CrashingRunner  # same state, crashing from step 3 on
        with httpx.Client(base_url=url, timeout=10) as http, caplog.at_level(logging.ERROR):
            assert health(http) == (200, "ready")
            resp = http.post("/v1/completions", json={"prompt": [1], "max_tokens": 50})
            error = assert_openai_error(resp, 503)
            assert "secret" not in error["message"]
            assert health(http) == (503, "failed")
            assert_openai_error(http.post("/v1/completions", json={"prompt": [1]}), 503)
    crash_logs = [r for r in caplog.records if r.name == "fitserve.engine.async_engine"]
    assert crash_logs and crash_logs[0].exc_info is not None  # logged with its traceback


def test_a_failed_load_stops_the_server_and_raises():
    def load_engine(report_phase):
        report_phase(Phase.LOADING)
        raise ConfigError("--max-model-len 99999 is longer than the model's context")

    with pytest.raises(ConfigError, match="max-model-len"):
        launcher.serve(ServerConfig(), "127.0.0.1", free_port(), load_engine, log_level="warning")
