"""The HTTP layer over the real AsyncEngine + LLMEngine + scheduler, with the fake runner.

The fake runner samples `(last token + 1) % vocab`; FakeDecoder turns token t into " t".
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from fake_engine import FakeTokenizer
from server_fixtures import FAKE_API_KEY, live_server

from fitserve.core.scheduler import SchedulerLimits
from fitserve.engine.async_engine import AsyncEngine
from fitserve.engine.llm_engine import EngineLimits, LLMEngine
from fitserve.server.app import build_app
from fitserve.testing import FakeDecoder, FakeRunner

VOCAB_SIZE = 1000
EOS_TOKEN_ID = VOCAB_SIZE - 1
MAX_MODEL_LEN = 256


@pytest.fixture(scope="module", params=["sync", "async_scheduling"])
def engine(request):
    """The engine loop as on a CPU, and with async scheduling as on CUDA (a step always in flight)."""
    runner = FakeRunner(num_blocks=128, block_size=4, vocab_size=VOCAB_SIZE)
    limits = EngineLimits(VOCAB_SIZE, (EOS_TOKEN_ID,), SchedulerLimits(8, 64, MAX_MODEL_LEN))
    llm_engine = LLMEngine(runner, FakeDecoder(), limits, async_scheduling=request.param == "async_scheduling")
    engine = AsyncEngine(llm_engine, "fake-real", FakeTokenizer()).start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def url(engine):
    with live_server(build_app(engine)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    with openai.OpenAI(base_url=f"{url}/v1", api_key=FAKE_API_KEY, max_retries=0, timeout=10) as c:
        yield c


def test_completion_with_token_ids(client):
    resp = client.completions.create(model="fake-real", prompt=[5, 6, 7], max_tokens=3)
    assert resp.choices[0].text == " 8 9 10" and resp.choices[0].finish_reason == "length"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (3, 3)


def test_streaming_chat_with_usage(client):
    chunks = list(client.chat.completions.create(
        model="fake-real", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True,
        stream_options={"include_usage": True}))
    last_prompt_id = FakeTokenizer().apply_chat_template([{"role": "user", "content": "hi"}])[-1]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(f" {last_prompt_id + k}" for k in range(1, 5))
    assert chunks[-1].usage.completion_tokens == 4


def test_stop_string_and_eos(client):
    resp = client.completions.create(model="fake-real", prompt=[1], max_tokens=10, stop=[" 4"])
    assert resp.choices[0].text == " 2 3" and resp.choices[0].finish_reason == "stop"
    eos = client.completions.create(model="fake-real", prompt=[EOS_TOKEN_ID - 2], max_tokens=10)
    assert eos.choices[0].finish_reason == "stop" and eos.usage.completion_tokens == 2


def test_engine_rejections_are_400(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="fake-real", prompt=[1] * MAX_MODEL_LEN)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="fake-real", prompt=[1], max_tokens=MAX_MODEL_LEN)


def test_disconnect_mid_stream_frees_the_request(url, engine):
    with httpx.Client(base_url=url) as http:
        with http.stream("POST", "/v1/completions",
                         json={"prompt": [1], "max_tokens": 200, "stream": True, "ignore_eos": True}) as resp:
            next(resp.iter_lines())
    deadline = time.monotonic() + 3.0
    while engine.engine.has_unfinished and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.engine.has_unfinished
    engine.engine.check_invariants()
