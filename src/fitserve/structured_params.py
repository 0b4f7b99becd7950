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
    json_schema: str  # a JSON Schema, serialized (a string keeps the params hashable and immutable)
    param: str = "response_format"  # the request field it came from, named in errors

    @classmethod
    def from_schema(cls, schema: dict[str, Any], param: str = "response_format") -> StructuredOutputParams:
        return cls(json.dumps(schema), param)  # key order kept: properties are generated in it
