"""What a request asks of structured output (torch-free, no grammar library).

The HTTP layer turns `response_format` and forced tool calls into a StructuredOutputParams;
the engine compiles it into a grammar matcher (engine/structured_output.py) that masks, at
every step, the tokens that could not continue a valid output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

ANY_JSON_OBJECT_SCHEMA = '{"type": "object"}'  # response_format json_object: any JSON object


@dataclass(frozen=True, slots=True)
class StructuredOutputParams:
    """One of: a JSON Schema, a regular expression (Rust `regex` syntax, as llguidance reads it) or a
    Lark grammar (llguidance's dialect), each serialized as text (hashable and immutable)."""

    json_schema: str | None = None
    param: str = "response_format"  # the request field it came from, named in errors
    regex: str | None = None
    lark: str | None = None

    def __post_init__(self) -> None:
        if sum(spec is not None for spec in (self.json_schema, self.regex, self.lark)) != 1:
            raise ValueError("StructuredOutputParams takes exactly one of json_schema, regex and lark")

    @classmethod
    def from_schema(cls, schema: dict[str, Any] | str, param: str = "response_format") -> StructuredOutputParams:
        # key order kept: properties are generated in it
        return cls(schema if isinstance(schema, str) else json.dumps(schema), param)

    @classmethod
    def from_choice(cls, choices: list[str], param: str) -> StructuredOutputParams:
        """Exactly one of these strings (a grammar of quoted literals: no regex escaping to get wrong)."""
        literals = " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)
        return cls(param=param, lark=f"start: {literals}")

    @property
    def kind(self) -> str:
        """What the spec is, as errors name it."""
        return "JSON schema" if self.json_schema is not None else "regex" if self.regex is not None else "grammar"
