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

    def call_texts(self, tail: str) -> list[str] | None:
        """The array's objects so far: each whole one as the decoder reads it, then the one being written."""
        body = tail[len(TOOL_CALLS_MARKER):].lstrip()
        if body.startswith("{"):  # one object without the array, as call_objects accepts
            return [body]
        if not body.startswith("["):
            return []
        texts: list[str] = []
        decoder, position = json.JSONDecoder(), 1
        while True:
            while position < len(body) and (body[position].isspace() or body[position] == ","):
                position += 1
            if position >= len(body) or body[position] != "{":
                return texts
            try:
                _, end = decoder.raw_decode(body, position)
            except json.JSONDecodeError:  # cut short (or malformed: extract decides at the end)
                texts.append(body[position:])
                return texts
            texts.append(body[position:end])
            position = end
