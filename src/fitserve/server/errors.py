"""Typed HTTP errors and the one place that turns any failure into OpenAI's error JSON.

Every response that is not a success has the shape
`{"error": {"message", "type", "param", "code"}}`. Internal exception text never reaches a
client: unexpected failures are logged with their traceback and answered with a generic 500.
"""

from __future__ import annotations

import http
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fitserve.engine.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError
from fitserve.sampling_params import InvalidSamplingParam
from fitserve.server.protocol import INVALID_TEXT_ERROR, ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

INTERNAL_ERROR_MESSAGE = "The server had an error while processing your request."
# Seconds a client should wait before retrying a 503: about one short request's time in a full batch.
OVERLOADED_RETRY_AFTER_S = 1
VALUE_ERROR_PREFIX = "Value error, "  # pydantic prepends it to messages of ValueErrors raised in validators


class OpenAIHTTPError(Exception):
    """An error a handler raises on purpose; its message is safe to show the client."""

    status_code = http.HTTPStatus.BAD_REQUEST
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}  # extra response headers, e.g. Retry-After


class BadRequestError(OpenAIHTTPError):
    pass


class ModelNotFoundError(OpenAIHTTPError):
    status_code = http.HTTPStatus.NOT_FOUND
    error_type = "NotFoundError"  # what vLLM answers for an unknown model

    def __init__(self, requested: str, served: str) -> None:
        super().__init__(
            f"The model `{requested}` does not exist. This server serves `{served}`.",
            param="model",
            code="model_not_found",
        )


class AuthenticationError(OpenAIHTTPError):
    status_code = http.HTTPStatus.UNAUTHORIZED
    error_type = "authentication_error"

    def __init__(self) -> None:
        super().__init__(
            "Missing or invalid API key: send it as `Authorization: Bearer <key>`.",
            code="invalid_api_key",
        )


class InternalServerError(OpenAIHTTPError):
    status_code = http.HTTPStatus.INTERNAL_SERVER_ERROR
    error_type = "internal_server_error"

    def __init__(self, request_id: str | None = None) -> None:
        suffix = f" Request id: {request_id}." if request_id else ""
        super().__init__(INTERNAL_ERROR_MESSAGE + suffix)


class ServiceUnavailableError(OpenAIHTTPError):
    status_code = http.HTTPStatus.SERVICE_UNAVAILABLE
    error_type = "service_unavailable"


class ServerOverloadedError(ServiceUnavailableError):
    def __init__(self, message: str) -> None:
        super().__init__(message, code="server_overloaded",
                         headers={"Retry-After": str(OVERLOADED_RETRY_AFTER_S)})


class RequestTimeoutError(OpenAIHTTPError):
    """The request ran past --request-timeout and was aborted."""

    status_code = http.HTTPStatus.REQUEST_TIMEOUT
    error_type = "timeout_error"

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"The request did not finish within the server's --request-timeout of {timeout_s:g} s "
                         "and was aborted.", code="request_timeout")


class RequestTooLargeError(OpenAIHTTPError):
    status_code = http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(f"The request body is larger than this server's limit of {limit_bytes} bytes "
                         "(--max-request-body-bytes).", code="request_too_large")


def error_body(status_code: int, message: str, error_type: str, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    info = ErrorInfo(message=message, type=error_type, param=param, code=code)
    return ErrorResponse(error=info).model_dump()


def error_response(status_code: int, message: str, error_type: str, param: str | None = None,
                   code: str | int | None = None) -> JSONResponse:
    return JSONResponse(error_body(status_code, message, error_type, param, code), status_code=status_code)


def to_openai_error(exc: BaseException, request_id: str | None = None) -> OpenAIHTTPError:
    """Map any exception to a typed error; unknown ones are logged and become a generic 500."""
    if isinstance(exc, OpenAIHTTPError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return BadRequestError(str(exc), param=exc.param)
    if isinstance(exc, InvalidSamplingParam):
        return BadRequestError(str(exc), param=exc.param)
    if isinstance(exc, EngineOverloadedError):
        return ServerOverloadedError(str(exc))
    if isinstance(exc, EngineDeadError):
        return ServiceUnavailableError("The engine is not running; the server cannot serve requests.")
    logger.error("Internal error while serving request %s", request_id or "(no id)", exc_info=exc)
    return InternalServerError(request_id)


def openai_error_json(exc: BaseException, request_id: str | None = None) -> tuple[int, dict[str, Any]]:
    err = to_openai_error(exc, request_id)
    return int(err.status_code), error_body(err.status_code, err.message, err.error_type, err.param, err.code)


def openai_error_response(exc: BaseException, request_id: str | None = None) -> JSONResponse:
    """The error as a response, with its headers (Retry-After on a 503 for overload)."""
    err = to_openai_error(exc, request_id)
    body = error_body(err.status_code, err.message, err.error_type, err.param, err.code)
    return JSONResponse(body, status_code=int(err.status_code), headers=err.headers or None)


def request_id_of(request: Request) -> str | None:
    """The id the client sees in X-Request-Id (set by the app's RequestIdMiddleware)."""
    return request.scope.get("state", {}).get("public_request_id")


def _common_prefix(locs: list[tuple[str, ...]]) -> tuple[str, ...]:
    prefix: tuple[str, ...] = ()
    for parts in zip(*locs):
        if len(set(parts)) != 1:
            break
        prefix += (parts[0],)
    return prefix


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The validation failure as (message, param), e.g. ('Missing required parameter: `messages`.', 'messages')."""
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    if first.get("type") == INVALID_TEXT_ERROR:  # found by protocol.check_text, anywhere in the body
        return str(first.get("msg")), first.get("ctx", {}).get("param")
    if first.get("type") == "json_invalid":
        return f"The request body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}.", None
    locs = [tuple(str(p) for p in e.get("loc", ()) if p != "body") for e in errors]
    if not locs[0]:
        if first.get("type") == "value_error":  # a check across fields
            return str(first.get("msg", "Invalid request.")).removeprefix(VALUE_ERROR_PREFIX), None
        return "The request body must be a JSON object.", None
    message = str(first.get("msg", "Invalid value.")).removeprefix(VALUE_ERROR_PREFIX)
    # Several errors under one field are the members of a union (e.g. `prompt`: str, list of
    # str, list of ids) each failing: name the field, not pydantic's internal union tags.
    shared = _common_prefix(locs) if len(errors) > 1 else locs[0]
    if shared:
        param = ".".join(shared)
        if len(errors) > 1:
            return f"Invalid value for `{param}`: it has none of the accepted types ({message}).", param
        if first.get("type") == "missing":
            return f"Missing required parameter: `{param}`.", param
        return (message if message.startswith("`") else f"Invalid value for `{param}`: {message}"), param
    param = ".".join(locs[0])
    return f"Invalid value for `{param}`: {message} ({len(errors) - 1} more error(s) in the request.)", param


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the app as OpenAI error JSON, FastAPI's 422 shape included."""

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        phrase = http.HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404:
            message = f"Not found: {request.method} {request.url.path}"
            error_type = "NotFoundError"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
            error_type = "method_not_allowed"
        else:
            message = exc.detail if isinstance(exc.detail, str) else phrase
            error_type = phrase.lower().replace(" ", "_")
        return JSONResponse(error_body(exc.status_code, message, error_type), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(OpenAIHTTPError)
    @app.exception_handler(InvalidRequestError)
    @app.exception_handler(InvalidSamplingParam)
    @app.exception_handler(EngineDeadError)
    @app.exception_handler(EngineOverloadedError)
    @app.exception_handler(Exception)
    async def _typed(request: Request, exc: Exception) -> JSONResponse:
        return openai_error_response(exc, request_id_of(request))


def sse_error_event(exc: BaseException, request_id: str | None = None) -> str:
    """An error met mid-stream, after the 200 headers went out: sent as a data event."""
    _, body = openai_error_json(exc, request_id)
    return f"data: {json.dumps(body)}\n\n"
