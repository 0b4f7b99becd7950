"""Mistral's tool calls: `[TOOL_CALLS]` then a JSON array of `{"name", "arguments"}` objects
(text before the marker stays content)."""

from __future__ import annotations

import json

from fitserve.server.chat_tools import ToolPlan, calls_from_objects
from fitserve.server.tool_parsers import ExtractedCalls, partial_suffix_start

TOOL_CALLS_MARKER = "[TOOL_CALLS]"


class MistralToolParser:
    name = "mistral"

    def extract(self, text: str, plan: ToolPlan) -> ExtractedCalls | None:
        start = text.find(TOOL_CALLS_MARKER)
        if start < 0:
            return None
        try:
            value = json.loads(text[start + len(TOOL_CALLS_MARKER):])
        except json.JSONDecodeError:
            return None
        calls = calls_from_objects(value if isinstance(value, list) else [value], plan)
        if calls is None:
            return None
        content = text[:start].strip()
        return ExtractedCalls(content or None, calls)

    def hold_from(self, text: str, at_start: bool) -> int | None:
        return partial_suffix_start(text, TOOL_CALLS_MARKER)
