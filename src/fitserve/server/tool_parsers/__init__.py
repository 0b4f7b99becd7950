"""`--tool-call-parser`: how a model writes tool calls, one module per format, looked up by name.

A parser answers three questions: `extract` (a whole reply's calls, and any content before them, or
None when the reply holds no well-formed call of an offered tool: it is then plain content),
`hold_from` (streaming: from which position the text not yet sent may be the start of a call), and
`call_texts` (streaming: the call objects written so far, the last perhaps cut short, whose
arguments can then stream as they grow: tool_parsers/streaming.py; None: the calls are sent whole
when the reply ends).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from fitserve.server.chat_tools import ToolPlan
    from fitserve.server.protocol_tools import ToolCall


@dataclass(frozen=True, slots=True)
class ExtractedCalls:
    content: str | None  # text before the calls (None: none)
    calls: list[ToolCall]


class ToolParser(Protocol):
    name: str

    def extract(self, text: str, plan: ToolPlan) -> ExtractedCalls | None: ...

    def hold_from(self, text: str, at_start: bool) -> int | None:
        """Where in `text` (the unsent rest; `at_start`: nothing was sent) a call may begin; None: nowhere."""
        ...

    def call_texts(self, tail: str) -> list[str] | None:
        """The text of each call object in `tail` (held from a call's start on), the last one perhaps
        cut short; None when this format's calls are sent whole at the end of the reply."""
        ...


def partial_suffix_start(text: str, marker: str) -> int | None:
    """Where `marker` starts in text, or where a cut-short marker ends it; None: neither."""
    found = text.find(marker)
    if found >= 0:
        return found
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return len(text) - size
    return None


def tool_parser(name: str) -> ToolParser:
    from fitserve.server.tool_parsers.hermes import HermesToolParser
    from fitserve.server.tool_parsers.llama3_json import Llama3JsonToolParser
    from fitserve.server.tool_parsers.mistral import MistralToolParser

    parsers: dict[str, ToolParser] = {"llama3_json": Llama3JsonToolParser(), "hermes": HermesToolParser(),
                                      "mistral": MistralToolParser()}
    try:
        return parsers[name]
    except KeyError:
        raise ValueError(f"Unknown tool-call parser {name!r}; choose one of {sorted(parsers)}.") from None

