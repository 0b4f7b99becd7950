"""Mistral's tool calls: `[TOOL_CALLS]` then a JSON array of `{"name", "arguments"}` objects
(text before the marker stays content)."""

from __future__ import annotations

import json
from typing import Any

from fitserve.server.tool_parsers.marker import MarkerToolParser

TOOL_CALLS_MARKER = "[TOOL_CALLS]"


class MistralToolParser(MarkerToolParser):
    name = "mistral"
    marker = TOOL_CALLS_MARKER

    def call_objects(self, tail: str) -> list[Any]:
        value = json.loads(tail[len(TOOL_CALLS_MARKER):])
        return value if isinstance(value, list) else [value]
