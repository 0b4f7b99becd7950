"""POST /v1/responses (OpenAI's Responses API) through the official openai client, against a live
server on the fake engine: text output, instructions, incomplete replies, the streamed events, a
conversation with function-call items, and the requests it refuses."""

from __future__ import annotations

import httpx
import openai
import pytest
from fake_engine import FakeTokenizer

MODEL = "fake-model"


def expected_text(messages, num_tokens: int) -> str:
    """The fake model continues the templated prompt's last byte ('>' of "<assistant>": '?@ABC...')."""
    last = FakeTokenizer().apply_chat_template(messages)[-1]
    return "".join(chr(last + i) for i in range(1, num_tokens + 1))


def prompt_of(api_server, response_id: str) -> str:
    prompt_ids, _ = api_server.engine.requests[f"chatcmpl-{response_id.removeprefix('resp_')}"]
    return FakeTokenizer().decode(prompt_ids)


def test_a_text_input_gets_one_message_with_its_usage(client, api_server):
    resp = client.responses.create(model=MODEL, input="hi", instructions="be brief", max_output_tokens=5)
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.model == MODEL
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert resp.output_text == expected_text(messages, 5)
    assert prompt_of(api_server, resp.id).startswith("<system>be brief\n<user>hi\n")
    [item] = resp.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    num_prompt = len(FakeTokenizer().apply_chat_template(messages))
    assert (resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.total_tokens) == (num_prompt, 5,
                                                                                           num_prompt + 5)


def test_a_reply_cut_by_max_output_tokens_is_incomplete(client):
    resp = client.responses.create(model=MODEL, input="hi", max_output_tokens=3)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output[0].status == "incomplete" and len(resp.output_text) == 3


def test_the_stream_sends_the_events_in_order_and_their_text_adds_up(client):
    events = list(client.responses.create(model=MODEL, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "hi"}]}], max_output_tokens=6, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == expected_text([{"role": "user", "content": "hi"}], 6)
    assert events[-1].response.output[0].content[0].text == deltas


def test_function_call_items_continue_a_conversation(client, api_server):
    """An earlier turn's call and its output arrive as chat's assistant tool_calls and tool message."""
    resp = client.responses.create(model=MODEL, max_output_tokens=2, input=[
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}])
    prompt = prompt_of(api_server, resp.id)
    assert "<user>weather?\n" in prompt and "<tool>sunny\n" in prompt and prompt.index("<assistant>") < \
        prompt.index("<tool>")


@pytest.mark.parametrize("body, param", [
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, "input"),
    ({"input": "hi", "temperature": 5}, None),
])
def test_what_it_cannot_serve_is_a_400(api_server, body, param):
    response = httpx.post(f"{api_server.base_url}/responses", json={"model": MODEL, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and (param is None or error["param"] == param)


def test_an_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="hi")
