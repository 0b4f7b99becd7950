"""Reasoning parsers: whole replies, and streams cut at every character boundary."""

from __future__ import annotations

import pytest

from fitserve.server.reasoning import ReasoningStream, split_reasoning

CASES = [
    ("qwen3", "<think>\nLet me add.\n</think>\n\n2 + 2 = 4.", "Let me add.", "2 + 2 = 4."),
    ("qwen3", "Just the answer.", None, "Just the answer."),
    ("qwen3", "<think>cut off mid thou", "cut off mid thou", None),
    ("qwen3", "<thin k>", None, "<thin k>"),
    ("deepseek_r1", "Let me add.\n</think>\n\n4.", "Let me add.", "4."),
    ("deepseek_r1", "<think>Let me add.</think>4.", "Let me add.", "4."),
    ("deepseek_r1", "never closed", "never closed", None),
    ("qwen3", "<think>a < b </thin and more</think>done", "a < b </thin and more", "done"),
]


@pytest.mark.parametrize(("parser", "text", "reasoning", "content"), CASES)
def test_whole_reply(parser, text, reasoning, content):
    assert split_reasoning(text, parser) == (reasoning, content)


def _streamed(parser: str, pieces: list[str]) -> tuple[str | None, str | None]:
    stream = ReasoningStream(parser)
    deltas = [stream.feed(piece) for piece in pieces] + [stream.finish()]
    reasoning = "".join(d.reasoning for d in deltas)
    content = "".join(d.content for d in deltas)
    seen_content = False
    for delta in deltas:  # reasoning never comes after content
        assert not (seen_content and delta.reasoning)
        seen_content = seen_content or bool(delta.content)
    return reasoning or None, content or None


@pytest.mark.parametrize(("parser", "text", "reasoning", "content"), CASES)
def test_split_at_every_boundary_gives_the_whole_reply_split(parser, text, reasoning, content):
    for cut in range(len(text) + 1):
        assert _streamed(parser, [text[:cut], text[cut:]]) == (reasoning, content), cut
    assert _streamed(parser, list(text)) == (reasoning, content)


def test_unknown_parser_is_refused():
    with pytest.raises(ValueError):
        ReasoningStream("nope")
