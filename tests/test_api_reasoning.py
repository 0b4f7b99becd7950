"""--reasoning-parser through the openai client: reasoning_content whole and streamed."""

from __future__ import annotations

import openai
import pytest
from server_fixtures import FAKE_API_KEY, live_server
from test_api_tools import ScriptedEngine

from fitserve.config import ServerConfig
from fitserve.server.app import build_app

USER = [{"role": "user", "content": "2 + 2?"}]
REPLY = "<think>\nAdd them.\n</think>\n\n4."


@pytest.fixture(scope="module")
def qwen3():
    engine = ScriptedEngine(max_model_len=4096)
    engine.reply = REPLY
    with live_server(build_app(engine, config=ServerConfig(reasoning_parser="qwen3"))) as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key=FAKE_API_KEY, max_retries=0, timeout=10) as client:
            yield client


def test_whole_reply_splits_reasoning(qwen3):
    resp = qwen3.chat.completions.create(model="fake-model", messages=USER)
    message = resp.choices[0].message
    assert message.content == "4." and message.model_extra["reasoning_content"] == "Add them."


def test_stream_sends_reasoning_then_content(qwen3):
    chunks = list(qwen3.chat.completions.create(model="fake-model", messages=USER, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert reasoning == "Add them." and content == "4."
