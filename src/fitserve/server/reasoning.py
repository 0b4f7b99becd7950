"""`--reasoning-parser`: a reply's `<think>...</think>` goes to `reasoning_content`, the rest to `content`.

qwen3: the model writes the opening `<think>` itself; a reply without one is all content.
deepseek_r1: the chat template already opened `<think>`, so the reply starts inside the reasoning
(an opening tag, if written, is dropped); a reply with no `</think>` is all reasoning.
Streaming holds back only text that may be the start of a tag split across chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"


@dataclass(frozen=True, slots=True)
class ReasoningFormat:
    name: str
    starts_in_reasoning: bool  # the prompt opened <think> (DeepSeek-R1): the reply begins inside it


REASONING_PARSERS: dict[str, ReasoningFormat] = {
    "qwen3": ReasoningFormat("qwen3", starts_in_reasoning=False),
    "deepseek_r1": ReasoningFormat("deepseek_r1", starts_in_reasoning=True),
}


def reasoning_format(name: str) -> ReasoningFormat:
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"Unknown reasoning parser {name!r}; choose one of {sorted(REASONING_PARSERS)}.") from None


def split_reasoning(text: str, fmt: ReasoningFormat) -> tuple[str | None, str]:
    """(reasoning_content or None, content) of a whole reply."""
    stream = ReasoningStream(fmt)
    reasoning, content = stream.feed(text)
    more_reasoning, more_content = stream.finish()
    reasoning += more_reasoning
    content += more_content
    return (reasoning if stream.saw_reasoning else None), content


def _partial_tag_len(text: str, tag: str) -> int:
    """How many trailing characters of text are a proper prefix of tag."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class ReasoningStream:
    """Per choice: feed text deltas, get (reasoning, content) deltas; finish() flushes what was held."""

    def __init__(self, fmt: ReasoningFormat) -> None:
        self.state = "reasoning" if fmt.starts_in_reasoning else "start"  # start -> reasoning -> content
        self.saw_reasoning = fmt.starts_in_reasoning
        self.held = ""
        self.reasoning_emitted = False

    def feed(self, text: str) -> tuple[str, str]:
        reasoning, content = "", ""
        buffer = self.held + text
        self.held = ""
        while buffer:
            if self.state == "content":
                content += buffer
                break
            if self.state == "start":
                stripped = buffer.lstrip()
                if stripped.startswith(THINK_START):
                    self.state, self.saw_reasoning = "reasoning", True
                    buffer = stripped[len(THINK_START):]
                    continue
                if THINK_START.startswith(stripped):  # empty, whitespace, or a tag cut short: wait
                    self.held = buffer
                    break
                self.state = "content"
                continue
            # reasoning: an opening tag right at its start is dropped (DeepSeek-R1 may repeat it)
            if buffer.startswith(THINK_START) and not (reasoning or self.reasoning_emitted):
                buffer = buffer[len(THINK_START):]
                continue
            if not (reasoning or self.reasoning_emitted) and THINK_START.startswith(buffer):
                self.held = buffer
                break
            end = buffer.find(THINK_END)
            if end >= 0:
                reasoning += buffer[:end]
                self.state = "content"
                buffer = buffer[end + len(THINK_END):]
                continue
            keep = _partial_tag_len(buffer, THINK_END)
            reasoning += buffer[:len(buffer) - keep]
            self.held = buffer[len(buffer) - keep:]
            break
        self.reasoning_emitted = self.reasoning_emitted or bool(reasoning)
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        held, self.held = self.held, ""
        if self.state == "reasoning":
            return held, ""
        return "", held
