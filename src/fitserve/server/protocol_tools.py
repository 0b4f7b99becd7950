"""Pydantic models of tool calling and `response_format` (OpenAI's shapes), and vLLM's `structured_outputs`.

Kept apart from protocol.py so the request models there only name these types. A tool's
`parameters` and a json_schema's `schema` are checked here to be JSON Schemas that can
constrain output (the same compiler the engine uses), so a bad one is a 400 naming its path.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from fitserve.engine.structured_output import grammar_error, json_schema_error
from fitserve.structured_params import ANY_JSON_OBJECT_SCHEMA, StructuredOutputParams

FUNCTION_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}  # a function without arguments


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _checked_schema(schema: dict[str, Any]) -> dict[str, Any]:
    error = json_schema_error(schema)
    if error is not None:
        raise ValueError(f"not a usable JSON Schema: {error}")
    return schema


class FunctionDefinition(_Model):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of the arguments object
    strict: bool | None = None  # accepted; calls forced by tool_choice always follow the schema

    @field_validator("parameters")
    @classmethod
    def _schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else _checked_schema(value)

    def parameters_schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters is not None else EMPTY_PARAMETERS


class ChatTool(_Model):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: ToolChoiceFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(_Model):
    name: str
    arguments: str  # a JSON object, serialized, as OpenAI sends it


class ToolCall(_Model):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(_Model):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class DeltaToolCall(_Model):
    """A streamed piece of a tool call: id, type and name first, then the arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class JsonSchemaFormat(_Model):
    name: str = Field(default="response", pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # accepted; the output always follows the schema

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _checked_schema(value)


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("`response_format.json_schema` is required when its type is json_schema.")
        return self

    def params(self) -> StructuredOutputParams | None:
        """The grammar it asks for; None for text."""
        if self.type == "json_object":
            return StructuredOutputParams(ANY_JSON_OBJECT_SCHEMA)
        if self.type == "json_schema":
            assert self.json_schema is not None
            return StructuredOutputParams.from_schema(self.json_schema.json_schema)
        return None


STRUCTURED_OUTPUTS = "structured_outputs"
# Compiling a spec runs in the event loop (validation) and in the engine: bounded, it stays in milliseconds
# (4096 choices: about 20 ms; 50,000 took 1.4 s).
MAX_CHOICES = 4096
MAX_SPEC_CHARS = 65536  # a regex or grammar


class StructuredOutputs(_Model):
    """vLLM's `structured_outputs` extra, on both endpoints: exactly one of a JSON Schema (`json`, an
    object or its text), any JSON object (`json_object`), a regex (Rust syntax), a list of strings the
    output is one of (`choice`), or a grammar (`grammar`, in llguidance's Lark dialect). vLLM's
    backend tuning fields (disable_any_whitespace, whitespace_pattern, ...) are ignored."""

    json_spec: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = Field(default=None, max_length=MAX_SPEC_CHARS)
    choice: list[str] | None = Field(default=None, min_length=1, max_length=MAX_CHOICES)
    grammar: str | None = Field(default=None, max_length=MAX_SPEC_CHARS)
    json_object: bool | None = None

    @model_validator(mode="after")
    def _one_usable_spec(self) -> StructuredOutputs:
        given = [name for name, value in (("json", self.json_spec), ("regex", self.regex), ("choice", self.choice),
                                          ("grammar", self.grammar), ("json_object", self.json_object or None))
                 if value is not None]
        if len(given) != 1:
            raise ValueError("`structured_outputs` takes exactly one of json, regex, choice, grammar and json_object"
                             + (f"; got {', '.join(given)}." if given else "."))
        error = grammar_error(self.params())
        if error is not None:
            raise ValueError(f"`structured_outputs.{given[0]}` cannot constrain output: {error}")
        return self

    def params(self) -> StructuredOutputParams:
        param = STRUCTURED_OUTPUTS
        if self.json_spec is not None:
            return StructuredOutputParams.from_schema(self.json_spec, param)
        if self.regex is not None:
            return StructuredOutputParams(param=param, regex=self.regex)
        if self.choice is not None:
            return StructuredOutputParams.from_choice(self.choice, param)
        if self.grammar is not None:
            return StructuredOutputParams(param=param, lark=self.grammar)
        return StructuredOutputParams(ANY_JSON_OBJECT_SCHEMA, param)
