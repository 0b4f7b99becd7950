"""Hermes' (and Qwen2.5's, Qwen3's) tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
one block per call, possibly after some text (which stays content)."""

from __future__ import annotations

import json
import re
from typing import Any

from fitserve.server.tool_parsers.marker import MarkerToolParser

TOOL_CALL_START = "<tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


class HermesToolParser(MarkerToolParser):
    name = "hermes"
    marker = TOOL_CALL_START

    def call_objects(self, tail: str) -> list[Any]:
        return [json.loads(body) for body in _BLOCK.findall(tail)]

    def call_texts(self, tail: str) -> list[str] | None:
        return [body.lstrip() for body in _BLOCK.findall(tail)]
