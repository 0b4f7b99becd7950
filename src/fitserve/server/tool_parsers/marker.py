"""The shape hermes and mistral share: calls start at a marker, text before it stays content."""

from __future__ import annotations

import json
from typing import Any

from fitserve.server.chat_tools import ToolPlan, calls_from_objects
from fitserve.server.tool_parsers import ExtractedCalls, partial_suffix_start


class MarkerToolParser:
    """A format whose calls follow `marker`; subclasses read the call objects from the text after it."""

    name: str
    marker: str

    def call_objects(self, tail: str) -> list[Any]:
        """The call objects in `tail` (from the marker on); json.JSONDecodeError when malformed."""
        raise NotImplementedError

    def extract(self, text: str, plan: ToolPlan) -> ExtractedCalls | None:
        start = text.find(self.marker)
        if start < 0:
            return None
        try:
            objects = self.call_objects(text[start:])
        except json.JSONDecodeError:
            return None
        calls = calls_from_objects(objects, plan)
        if calls is None:
            return None
        return ExtractedCalls(text[:start].strip() or None, calls)

    def hold_from(self, text: str, at_start: bool) -> int | None:
        return partial_suffix_start(text, self.marker)

    def call_texts(self, tail: str) -> list[str] | None:
        """Each call object's text so far (tail starts at the marker); subclasses say where they lie."""
        raise NotImplementedError
