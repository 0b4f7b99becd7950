"""Sampling and output fields on the embedded SmolLM2-135M-Instruct, through the openai client."""

from __future__ import annotations

import math

import openai
import pytest
from server_fixtures import FAKE_API_KEY, built_engine_server

from fitserve.config import EngineConfig
from fitserve.startup import build_engine

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client():
    built = build_engine(EngineConfig(dtype="float32"), progress=False)
    with built_engine_server(built) as (url, _):
        with openai.OpenAI(base_url=f"{url}/v1", api_key=FAKE_API_KEY, max_retries=0, timeout=120) as c:
            c.tokenizer = built.tokenizer
            yield c


def test_chat_logprobs_of_a_greedy_answer(client):
    resp = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0,
                                          logprobs=True, top_logprobs=5)
    content = resp.choices[0].logprobs.content
    assert "Paris" in resp.choices[0].message.content
    assert len(content) == resp.usage.completion_tokens
    for token in content:
        assert token.top_logprobs[0].token == token.token and token.top_logprobs[0].logprob == token.logprob
        assert sum(math.exp(t.logprob) for t in token.top_logprobs) <= 1.0 + 1e-4
    paris = next(t for t in content if "Paris" in t.token)
    assert paris.logprob > math.log(0.5)  # the model is sure of it


def test_logit_bias_steers_the_real_model(client):
    (token_id,) = client.tokenizer.encode(" banana", add_special_tokens=False)[:1]
    resp = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0,
                                     logit_bias={str(token_id): 100})
    assert resp.choices[0].text.startswith(" banana")


def test_echo_logprobs_score_the_prompt(client):
    resp = client.completions.create(model=MODEL, prompt="The capital of France is Paris", max_tokens=1,
                                     temperature=0, logprobs=1, echo=True)
    lp = resp.choices[0].logprobs
    assert lp.token_logprobs[0] is None and all(v is not None for v in lp.token_logprobs[1:])
    assert lp.tokens[-2].strip() == "Paris" and lp.token_logprobs[-2] > math.log(0.3)
    assert resp.choices[0].text.startswith("The capital of France is Paris")


def test_n_seeded_choices_and_penalties(client):
    fields = dict(model=MODEL, messages=[{"role": "user", "content": "Write a word."}], max_tokens=16,
                  temperature=1.0, seed=1, n=4)
    first = client.chat.completions.create(**fields)
    again = client.chat.completions.create(**fields)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices] and len(set(texts)) > 1
    prompt = "List the numbers: one, one, one, one,"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    penalized = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                          extra_body={"repetition_penalty": 2.0}).choices[0].text
    assert plain.count("one") > penalized.count("one")
