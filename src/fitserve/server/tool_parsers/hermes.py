"""Hermes' (and Qwen2.5's, Qwen3's) tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
one block per call, possibly after some text (which stays content)."""

from __future__ import annotations

import json
import re

from fitserve.server.chat_tools import ToolPlan, calls_from_objects
from fitserve.server.tool_parsers import ExtractedCalls, partial_suffix_start

TOOL_CALL_START = "<tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


class HermesToolParser:
    name = "hermes"

    def extract(self, text: str, plan: ToolPlan) -> ExtractedCalls | None:
        start = text.find(TOOL_CALL_START)
        if start < 0:
            return None
        try:
            objects = [json.loads(body) for body in _BLOCK.findall(text[start:])]
        except json.JSONDecodeError:
            return None
        calls = calls_from_objects(objects, plan)
        if calls is None:
            return None
        content = text[:start].strip()
        return ExtractedCalls(content or None, calls)

    def hold_from(self, text: str, at_start: bool) -> int | None:
        return partial_suffix_start(text, TOOL_CALL_START)
