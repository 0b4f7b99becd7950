"""Errors the engine raises towards the HTTP layer; each maps to one HTTP status."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """The client asked for something impossible (HTTP 400); `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineDeadError(RuntimeError):
    """The engine loop has failed; in-flight and new requests get HTTP 500/503."""


class EngineOverloadedError(RuntimeError):
    """More requests wait than the server's queue limit allows (HTTP 503 with Retry-After)."""
