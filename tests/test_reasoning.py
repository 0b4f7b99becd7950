"""--reasoning-parser: the <think> part of a reply goes to reasoning_content, whole and streamed,
with the tags cut at every character boundary; through the openai client on a scripted fake engine."""

from __future__ import annotations

import openai
import pytest
from server_fixtures import FAKE_API_KEY, live_server
from test_api_tools import PIECE_CHARS, USER, ScriptedEngine

from fitserve.config import ServerConfig
from fitserve.server.app import build_app
from fitserve.server.reasoning import REASONING_PARSERS, ReasoningStream, split_reasoning

QWEN3 = REASONING_PARSERS["qwen3"]
DEEPSEEK_R1 = REASONING_PARSERS["deepseek_r1"]


@pytest.mark.parametrize(("fmt", "text", "expected"), [
    (QWEN3, "<think>a < b</think>\n\nHello", ("a < b", "\n\nHello")),
    (QWEN3, "Hello <think>x</think>", (None, "Hello <think>x</think>")),
    (QWEN3, "<think>never closed", ("never closed", "")),
    (QWEN3, "<thin", (None, "<thin")),
    (DEEPSEEK_R1, "step 1</think>Answer", ("step 1", "Answer")),
    (DEEPSEEK_R1, "<think>step 1</think>Answer", ("step 1", "Answer")),
    (DEEPSEEK_R1, "all reasoning", ("all reasoning", "")),
])
def test_split_whole_reply(fmt, text, expected):
    assert split_reasoning(text, fmt) == expected


def stream_split(fmt, pieces):
    stream = ReasoningStream(fmt)
    reasoning, content = "", ""
    for piece in pieces:
        more_reasoning, more_content = stream.feed(piece)
        reasoning, content = reasoning + more_reasoning, content + more_content
    more_reasoning, more_content = stream.finish()
    return reasoning + more_reasoning, content + more_content


@pytest.mark.parametrize(("fmt", "text"), [
    (QWEN3, "<think>a < b </ c</think>\n\nHello"),
    (QWEN3, "Hello <think>x</think>"),
    (QWEN3, "  <think>x</thin"),
    (DEEPSEEK_R1, "<think>step</think>Answer"),
    (DEEPSEEK_R1, "step <th 1</think>An</think>swer"),
])
def test_stream_cut_at_every_boundary_matches_the_whole_split(fmt, text):
    whole_reasoning, whole_content = split_reasoning(text, fmt)
    for cut in range(len(text) + 1):
        assert stream_split(fmt, [text[:cut], text[cut:]]) == (whole_reasoning or "", whole_content), cut
    assert stream_split(fmt, list(text)) == (whole_reasoning or "", whole_content)


def test_reasoning_never_passes_a_partial_tag_to_content():
    stream = ReasoningStream(QWEN3)
    assert stream.feed("<thi") == ("", "")
    assert stream.feed("nk>why</th") == ("why", "")
    assert stream.feed("ink>ok") == ("", "ok")


@pytest.fixture(scope="module")
def thinking():
    engine = ScriptedEngine(max_model_len=4096)
    with live_server(build_app(engine, config=ServerConfig(reasoning_parser="qwen3"))) as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key=FAKE_API_KEY, max_retries=0, timeout=10) as client:
            yield engine, client


def test_live_reasoning_content_whole(thinking):
    engine, client = thinking
    engine.reply = "<think>The user greets.</think>\n\nHello!"
    resp = client.chat.completions.create(model="fake-model", messages=USER)
    message = resp.choices[0].message
    assert message.reasoning_content == "The user greets." and message.content == "\n\nHello!"
    num_pieces = -(-len(engine.reply) // PIECE_CHARS)
    assert resp.usage.completion_tokens == num_pieces, "usage counts the engine's outputs, reasoning included"


def test_live_reasoning_content_streamed(thinking):
    engine, client = thinking
    engine.reply = "<think>The user greets.</think>\n\nHello!"
    chunks = list(client.chat.completions.create(model="fake-model", messages=USER, stream=True))
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert reasoning == "The user greets." and content == "\n\nHello!"
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert all(not getattr(d, "reasoning_content", None) for d in deltas[first_content:])
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_without_the_flag_think_stays_in_content():
    engine = ScriptedEngine(max_model_len=4096)
    engine.reply = "<think>x</think>y"
    with live_server(build_app(engine)) as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key=FAKE_API_KEY, max_retries=0, timeout=10) as client:
            message = client.chat.completions.create(model="fake-model", messages=USER).choices[0].message
    assert message.content == "<think>x</think>y" and getattr(message, "reasoning_content", None) is None


def test_responses_api_gives_the_reasoning_its_own_item(thinking):
    """/v1/responses with --reasoning-parser: a `reasoning` item before the message, whole and streamed
    (the reasoning item is done before the reply's text starts)."""
    engine, client = thinking
    engine.reply = "<think>The user greets.</think>\n\nHello!"
    resp = client.responses.create(model="fake-model", input="hi")
    assert [item.type for item in resp.output] == ["reasoning", "message"]
    assert resp.output[0].content[0].text == "The user greets." and resp.output_text == "\n\nHello!"
    events = list(client.responses.create(model="fake-model", input="hi", stream=True))
    kinds = [event.type for event in events]
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert reasoning == "The user greets." and text == "\n\nHello!"
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    final = events[-1].response
    assert final.status == "completed" and [item.type for item in final.output] == ["reasoning", "message"]
    assert [(e.output_index, e.item.type) for e in events if e.type == "response.output_item.added"] == [
        (0, "reasoning"), (1, "message")]
