"""Reasoning parsers (vLLM's `--reasoning-parser`): split a reply's `<think>...</think>` part into
`reasoning_content`, the rest into `content`, whole or streamed.

- `qwen3`: the model writes the opening `<think>` itself; a reply that does not open with it is content.
- `deepseek_r1`: the chat template puts `<think>` in the prompt, so the reply starts in reasoning
  (a leading `<think>` is dropped if the model writes one anyway).
Reasoning runs to `</think>`, or to the end of a reply cut off before it. Whitespace next to the tags
is dropped. Whole replies are parsed by the same stream, so both ways give the same split.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"
REASONING_PARSERS = ("qwen3", "deepseek_r1")


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    reasoning: str = ""  # new reasoning_content text
    content: str = ""  # new content text


def _partial_tag_chars(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (may still become it)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ReasoningStream:
    """Feeds a reply's text pieces; returns the reasoning and content each piece releases."""

    def __init__(self, parser: str) -> None:
        if parser not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {parser!r}")
        self._starts_in_reasoning = parser == "deepseek_r1"
        self._state = "start"  # start | reasoning | content
        self._drop_space = False  # right after a tag: leading whitespace is dropped
        self._held = ""

    def feed(self, text: str) -> ReasoningDelta:
        self._held += text
        reasoning, content = "", ""
        if self._state == "start":
            head = self._held.lstrip()
            if head.startswith(THINK_START):
                self._held, self._state, self._drop_space = head[len(THINK_START):], "reasoning", True
            elif THINK_START.startswith(head):
                return ReasoningDelta()  # may still open with the tag
            elif self._starts_in_reasoning:
                self._held, self._state, self._drop_space = head, "reasoning", True
            else:
                self._state = "content"
        if self._state == "reasoning":
            if self._drop_space:
                self._held = self._held.lstrip()
                self._drop_space = not self._held
            end = self._held.find(THINK_END)
            if end < 0:
                safe = len(self._held) - _partial_tag_chars(self._held, THINK_END)
                keep = len(self._held[:safe].rstrip())  # spaces may precede the end tag
                reasoning, self._held = self._held[:keep], self._held[keep:]
                return ReasoningDelta(reasoning=reasoning)
            reasoning = self._held[:end].rstrip()
            self._held, self._state, self._drop_space = self._held[end + len(THINK_END):], "content", True
        if self._drop_space:
            self._held = self._held.lstrip()
            self._drop_space = not self._held
        content, self._held = self._held, ""
        return ReasoningDelta(reasoning, content)

    def finish(self) -> ReasoningDelta:
        """What is still held when the reply ends."""
        held, self._held = self._held, ""
        if self._state == "reasoning" or (self._state == "start" and self._starts_in_reasoning):
            return ReasoningDelta(reasoning=held.strip().removeprefix(THINK_START).strip())
        return ReasoningDelta(content=held)


def split_reasoning(text: str, parser: str) -> tuple[str | None, str | None]:
    """(reasoning_content, content) of a whole reply; None for an empty part."""
    stream = ReasoningStream(parser)
    first, last = stream.feed(text), stream.finish()
    reasoning, content = first.reasoning + last.reasoning, first.content + last.content
    return reasoning or None, content or None
