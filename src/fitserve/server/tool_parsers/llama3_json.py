"""Llama 3's JSON tool calls: optional `<|python_tag|>`, then `{"name", "parameters"}` objects
(separated by `;` or in a JSON array); the reply must be wholly calls."""

from __future__ import annotations

from fitserve.server.chat_tools import PYTHON_TAG, ToolPlan, parse_tool_calls
from fitserve.server.tool_parsers import ExtractedCalls


class Llama3JsonToolParser:
    name = "llama3_json"

    def extract(self, text: str, plan: ToolPlan) -> ExtractedCalls | None:
        calls = parse_tool_calls(text, plan)
        return None if calls is None else ExtractedCalls(None, calls)

    def call_texts(self, tail: str) -> list[str] | None:
        return None  # sent whole when the reply ends

    def hold_from(self, text: str, at_start: bool) -> int | None:
        start = text.lstrip()
        if at_start and (start.startswith(("{", "[", PYTHON_TAG)) or PYTHON_TAG.startswith(start)):
            return 0
        return None
