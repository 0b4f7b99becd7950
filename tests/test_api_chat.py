"""POST /v1/chat/completions through the official openai client against a live server."""

from __future__ import annotations

import asyncio

import httpx

from fake_engine import FakeTokenizer

USER = [{"role": "user", "content": "hi"}]


def expected_chat_text(messages, num_tokens: int) -> str:
    """The fake model continues the templated prompt's last byte: '>' -> '?@ABC...'."""
    last = FakeTokenizer().apply_chat_template(messages)[-1]
    return "".join(chr(last + i) for i in range(1, num_tokens + 1))


def test_non_streaming_chat(client, api_server):
    resp = client.chat.completions.create(model="fake-model", messages=USER, max_tokens=5)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.created > 0
    assert resp.model == "fake-model"
    choice = resp.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == expected_chat_text(USER, 5)
    assert choice.finish_reason == "length"
    num_prompt = len(FakeTokenizer().apply_chat_template(USER))
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (
        num_prompt, 5, num_prompt + 5)


def test_sampling_fields_reach_the_engine(client, api_server):
    resp = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=USER, max_tokens=3, max_completion_tokens=4, temperature=0, top_p=0.9,
        seed=7, extra_body={"top_k": 5, "min_p": 0.05, "ignore_eos": True})
    request_id = resp.headers["x-request-id"]
    _, params = api_server.engine.requests[f"chatcmpl-{request_id}"]
    assert params.max_tokens == 4  # max_completion_tokens wins
    assert (params.temperature, params.top_p, params.seed, params.top_k, params.min_p) == (0, 0.9, 7, 5, 0.05)
    assert params.ignore_eos


def test_default_max_tokens_fills_the_context(client, api_server):
    resp = client.chat.completions.create(model="fake-model", messages=USER)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.total_tokens == api_server.engine.max_model_len


def test_stop_string_ends_with_finish_reason_stop(client):
    resp = client.chat.completions.create(model="fake-model", messages=USER, max_tokens=20, stop=["BC"])
    assert resp.choices[0].message.content == "?@A"
    assert resp.choices[0].finish_reason == "stop"


def test_content_parts_and_system_messages(client):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    resp = client.chat.completions.create(model="fake-model", messages=messages, max_tokens=2)
    assert resp.usage.prompt_tokens == len(FakeTokenizer().apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]))


def test_streaming_chat(client):
    chunks = list(client.chat.completions.create(model="fake-model", messages=USER, max_tokens=4, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_chat_text(USER, 4)
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)


def test_streaming_include_usage(client):
    chunks = list(client.chat.completions.create(model="fake-model", messages=USER, max_tokens=3, stream=True,
                                                 stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 3
    assert last.usage.total_tokens == last.usage.prompt_tokens + 3
    assert chunks[-2].choices[0].finish_reason == "length"


def test_streaming_wire_format(api_server):
    body = {"model": "fake-model", "messages": USER, "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.Client() as http:
        resp = http.post(f"{api_server.base_url}/chat/completions", json=body)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = resp.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert '"usage":null' in events[0]  # OpenAI sends usage: null on every chunk but the last


def test_async_client_streaming_and_not(async_client_factory):
    async def main():
        async with async_client_factory() as aclient:
            resp = await aclient.chat.completions.create(model="fake-model", messages=USER, max_tokens=3)
            stream = await aclient.chat.completions.create(model="fake-model", messages=USER, max_tokens=3,
                                                           stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream])
            return resp.choices[0].message.content, text

    full, streamed = asyncio.run(main())
    assert full == streamed == expected_chat_text(USER, 3)


def test_concurrent_requests(async_client_factory):
    async def main():
        async with async_client_factory() as aclient:
            return await asyncio.gather(*(aclient.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": str(i)}], max_tokens=2) for i in range(8)))

    assert len({r.id for r in asyncio.run(main())}) == 8


def test_request_id_header_is_echoed(api_server):
    with httpx.Client() as http:
        resp = http.get(f"{api_server.base_url}/models", headers={"X-Request-Id": "abc-123"})
        generated = http.get(f"{api_server.base_url}/models")
    assert resp.headers["x-request-id"] == "abc-123"
    assert len(generated.headers["x-request-id"]) >= 16


PREFILLED = [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "Red,"}]


def test_continue_final_message_leaves_the_final_message_open(client, api_server):
    """vLLM's `continue_final_message`: the prompt ends inside the assistant's prefill, and the reply goes
    on from its last character (the fake model continues ',' with '-./...'), without the prefill itself."""
    resp = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=PREFILLED, max_tokens=3,
        extra_body={"continue_final_message": True, "add_generation_prompt": False})
    prompt_ids, _ = api_server.engine.requests[f"chatcmpl-{resp.headers['x-request-id']}"]
    assert FakeTokenizer().decode(prompt_ids).endswith("<assistant>Red,")
    assert resp.parse().choices[0].message.content == "-./"
    tokenized = httpx.post(f"{api_server.url}/tokenize", json={
        "messages": PREFILLED, "continue_final_message": True, "add_generation_prompt": False}).json()
    assert tokenized["tokens"] == prompt_ids


def test_continue_final_message_with_a_generation_prompt_is_a_400(client, api_server):
    for url in (f"{api_server.base_url}/chat/completions", f"{api_server.url}/tokenize"):
        response = httpx.post(url, json={"model": "fake-model", "messages": PREFILLED, "continue_final_message": True})
        assert response.status_code == 400, url
        assert "add_generation_prompt" in response.json()["error"]["message"]
