"""POST /v1/completions through the official openai client against a live server."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from fake_engine import BOS_TOKEN_ID


def continuation(last_char: str, num_tokens: int) -> str:
    return "".join(chr(ord(last_char) + i) for i in range(1, num_tokens + 1))


def test_string_prompt(client):
    resp = client.completions.create(model="fake-model", prompt="abc", max_tokens=4)
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion" and resp.model == "fake-model"
    assert resp.choices[0].text == "defg" and resp.choices[0].finish_reason == "length"
    # BOS + 3 bytes
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (4, 4, 8)


def test_list_of_strings_gives_one_choice_per_prompt(client):
    resp = client.completions.create(model="fake-model", prompt=["a", "xy", "0"], max_tokens=3)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.text for c in resp.choices] == ["bcd", "z{|", "123"]
    assert resp.usage.prompt_tokens == 2 + 3 + 2 and resp.usage.completion_tokens == 9


def test_token_id_prompts(client, api_server):
    one = client.completions.create(model="fake-model", prompt=[104, 105], max_tokens=2)
    assert one.choices[0].text == "jk" and one.usage.prompt_tokens == 2  # no BOS added to ids
    many = client.completions.create(model="fake-model", prompt=[[97], [BOS_TOKEN_ID, 65]], max_tokens=2)
    assert [c.text for c in many.choices] == ["bc", "BC"]


def test_stop_strings_and_stop_token_ids(client):
    resp = client.completions.create(model="fake-model", prompt="a", max_tokens=10, stop="de")
    assert resp.choices[0].text == "bc" and resp.choices[0].finish_reason == "stop"
    kept = client.completions.create(model="fake-model", prompt="a", max_tokens=10, stop=["zz", "de"],
                                     extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == "bcde"
    by_id = client.completions.create(model="fake-model", prompt="a", max_tokens=10,
                                      extra_body={"stop_token_ids": [ord("e")]})
    assert by_id.choices[0].text == "bcd" and by_id.choices[0].finish_reason == "stop"
    assert by_id.usage.completion_tokens == 4


def test_eos_stops_unless_ignored(client):
    # byte 254 -> 255 -> BOS (256) -> EOS (257): EOS is the 3rd... after 2 bytes and BOS
    resp = client.completions.create(model="fake-model", prompt=[254], max_tokens=10)
    assert resp.choices[0].finish_reason == "stop" and resp.usage.completion_tokens == 3
    ignored = client.completions.create(model="fake-model", prompt=[254], max_tokens=10,
                                        extra_body={"ignore_eos": True})
    assert ignored.choices[0].finish_reason == "length" and ignored.usage.completion_tokens == 10


def test_default_max_tokens_is_16_as_in_openai(client):
    resp = client.completions.create(model="fake-model", prompt="a")
    assert resp.usage.completion_tokens == 16
    assert resp.choices[0].finish_reason == "length"


def test_null_max_tokens_fills_the_context(client, api_server):
    resp = client.completions.create(model="fake-model", prompt="a", max_tokens=None)
    assert resp.usage.total_tokens == api_server.engine.max_model_len
    assert resp.choices[0].finish_reason == "length"


def test_streaming_single_prompt(client):
    chunks = list(client.completions.create(model="fake-model", prompt="abc", max_tokens=4, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "defg"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)


def test_streaming_several_prompts_with_usage(client):
    chunks = list(client.completions.create(model="fake-model", prompt=["a", "k"], max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    finish = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
        if choice.finish_reason:
            finish[choice.index] = choice.finish_reason
    assert texts == {0: "bcd", 1: "lmn"} and finish == {0: "length", 1: "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == 4


def test_async_client(async_client_factory):
    async def main():
        async with async_client_factory() as aclient:
            resp = await aclient.completions.create(model="fake-model", prompt="abc", max_tokens=2)
            stream = await aclient.completions.create(model="fake-model", prompt="abc", max_tokens=2, stream=True)
            return resp.choices[0].text, "".join([c.choices[0].text async for c in stream])

    assert asyncio.run(main()) == ("de", "de")


def test_retrieve_one_model_and_unknown_model(client, api_server):
    card = client.models.retrieve("fake-model")
    assert card.id == "fake-model" and card.model_extra["max_model_len"] == api_server.engine.max_model_len
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["param"] == "model" and "fake-model" in info.value.body["message"]


def test_models_health_version(client, api_server):
    models = client.models.list()
    (card,) = models.data
    assert card.id == "fake-model" and card.owned_by == "fitserve"
    assert card.model_extra["max_model_len"] == api_server.engine.max_model_len
    with httpx.Client(base_url=api_server.url) as http:
        assert http.get("/health").status_code == 200
        version = http.get("/version").json()["version"]
        assert isinstance(version, str) and version
        api_server.engine.healthy = False
        try:
            unhealthy = http.get("/health")
        finally:
            api_server.engine.healthy = True
    assert unhealthy.status_code == 503 and "error" in unhealthy.json()
