"""Hermes' (and Qwen2.5's, Qwen3's) tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
one block per call, possibly after some text (which stays content)."""

from __future__ import annotations

import json
from typing import Any

from fitserve.server.tool_parsers.marker import MarkerToolParser

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"


def _blocks(tail: str) -> list[str]:
    """The text of each <tool_call> block, the last one to the end of `tail` when it is not closed yet.
    str.find, not a regular expression: streaming calls this at every token of a call that may run to
    thousands of them."""
    blocks, position = [], 0
    while (start := tail.find(TOOL_CALL_START, position)) >= 0:
        body_at = start + len(TOOL_CALL_START)
        end = tail.find(TOOL_CALL_END, body_at)
        if end < 0:
            blocks.append(tail[body_at:])
            break
        blocks.append(tail[body_at:end])
        position = end + len(TOOL_CALL_END)
    return blocks


class HermesToolParser(MarkerToolParser):
    name = "hermes"
    marker = TOOL_CALL_START

    def call_objects(self, tail: str) -> list[Any]:
        return [json.loads(body) for body in _blocks(tail)]

    def call_texts(self, tail: str) -> list[str] | None:
        return [body.lstrip() for body in _blocks(tail)]
