"""ASGI middleware around the routes: request ids and access log, framing, API keys, body size,
readiness, and the last words of requests that a forced shutdown cuts.

Each is a plain ASGI class that holds only its settings; per-request data travels in the
ASGI scope (`scope["state"]`), never in module state.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fitserve.server.errors import (
    AuthenticationError,
    BadRequestError,
    RequestTooLargeError,
    ServiceUnavailableError,
    openai_error_response,
    sse_error_event,
)
from fitserve.server.lifecycle import STARTUP_PHASES, Phase, ServerLifecycle

REQUEST_ID_HEADER = "x-request-id"
# A client's X-Request-Id is echoed only when it is short and plain (it ends up in logs).
_CLIENT_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
API_PREFIX = "/v1"  # needs one of --api-key
TOKENIZER_PATHS = ("/tokenize", "/detokenize")  # vLLM's paths, outside /v1; guarded and gated like it
METRICS_PREFIX = "/metrics"  # needs --metrics-api-key when it is set, else --api-key when that is
UI_DATA_PREFIX = "/ui/api/"  # the built-in page's data (model path, settings, memory plan): guarded as /metrics
QUIET_PATHS = ("/health", "/metrics")  # polled every few seconds: access-logged at DEBUG only
STARTUP_RETRY_AFTER_S = 5  # a client may retry a starting server after this long

access_logger = logging.getLogger("fitserve.access")


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return b""


def _under(path: str, prefix: str) -> bool:
    # Deliberately a plain prefix test: "/v1x" is guarded too (an extra 401 costs nothing).
    return path.startswith(prefix)


def _is_api(path: str) -> bool:
    """Routes that serve the model: they need an API key (when set) and a ready engine."""
    return _under(path, API_PREFIX) or path.rstrip("/") in TOKENIZER_PATHS


class RequestIdMiddleware:
    """Gives every HTTP request a unique id, returns it in X-Request-Id, and logs one access line.

    The engine sees only our own unique id (`state["request_id"]`): two clients may send the
    same header. The client's X-Request-Id, when sane, is what it gets back
    (`state["public_request_id"]`); the access line shows both when they differ.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        client_id = _header(scope, REQUEST_ID_HEADER.encode()).decode("latin-1")
        public_id = client_id if _CLIENT_REQUEST_ID_RE.match(client_id) else request_id
        state = scope.setdefault("state", {})
        state["request_id"], state["public_request_id"] = request_id, public_id
        status = [0]  # 0: no response started (the client went away first)
        start_s = time.monotonic()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), public_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._log(scope, request_id, public_id, status[0], time.monotonic() - start_s)

    @staticmethod
    def _log(scope: Scope, request_id: str, public_id: str, status: int, elapsed_s: float) -> None:
        path = scope["path"]
        level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
        if not access_logger.isEnabledFor(level):
            return
        client = scope.get("client") or ("-", 0)
        client_note = "" if public_id == request_id else f" client_id={public_id}"
        access_logger.log(level, '%s:%s "%s %s" %s %.3fs id=%s%s', client[0], client[1], scope["method"], path,
                          status or "-", elapsed_s, request_id, client_note)


def _digest(key: str) -> bytes:
    # Comparing fixed-size digests keeps the comparison's time independent of the key's length.
    return hashlib.sha256(key.encode()).digest()


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>`: one of `api_keys` on /v1/*; on /metrics and /ui/api/* the
    `metrics_api_key` when set, else one of `api_keys` (they show the model path and settings).

    With neither key, everything is open. CORS preflights (OPTIONS) pass: browsers send
    them without credentials. Every key is compared, in constant time, whatever matches.
    """

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...] = (), metrics_api_key: str | None = None) -> None:
        self.app = app
        self.api_digests = tuple(_digest(key) for key in api_keys)
        self.metrics_digests = (_digest(metrics_api_key),) if metrics_api_key else ()

    def _required(self, path: str) -> tuple[bytes, ...]:
        if _is_api(path):
            return self.api_digests
        if _under(path, METRICS_PREFIX) or _under(path, UI_DATA_PREFIX):  # the metrics key, else the API keys
            return self.metrics_digests or self.api_digests
        return ()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS":
            required = self._required(scope["path"])
            if required and not _bearer_matches(_header(scope, b"authorization"), required):
                response = openai_error_response(AuthenticationError())
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _bearer_matches(authorization: bytes, digests: tuple[bytes, ...]) -> bool:
    scheme, _, token = authorization.decode("latin-1").partition(" ")
    given = _digest(token)
    matched = False
    for digest in digests:  # no early exit: the time does not tell which key matched
        matched |= hmac.compare_digest(given, digest)
    return matched and scheme.lower() == "bearer"


class BodySizeLimitMiddleware:
    """Answers 413 to a request body over `max_body_bytes`, before any handler reads it.

    A declared Content-Length over the limit is refused unread. Otherwise the body is read
    here, counting, and replayed to the app; later `receive` calls (disconnect) pass through.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        num_bytes = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                await self.app(scope, _replay([message], receive), send)
                return
            chunks.append(message.get("body", b""))
            num_bytes += len(chunks[-1])
            if num_bytes > self.max_body_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body_message: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body_message], receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await openai_error_response(RequestTooLargeError(self.max_body_bytes))(scope, receive, send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay_receive() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay_receive


class ReadinessMiddleware:
    """While the engine is not serving (starting, draining, failed), /v1/* answers 503 with the phase."""

    def __init__(self, app: ASGIApp, lifecycle: ServerLifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _is_api(scope["path"]):
            phase = self.lifecycle.phase
            if phase != Phase.READY:
                retry = {"Retry-After": str(STARTUP_RETRY_AFTER_S)} if phase in STARTUP_PHASES else None
                error = ServiceUnavailableError(self.lifecycle.message, code=phase.value, headers=retry)
                await openai_error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class FramingMiddleware:
    """A request with both Content-Length and Transfer-Encoding is refused (400) and its connection
    closed: a proxy in front may have framed it the other way (request smuggling, RFC 9112 6.3)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            names = {key for key, _ in scope["headers"]}
            if b"content-length" in names and b"transfer-encoding" in names:
                error = BadRequestError("A request may not carry both Content-Length and Transfer-Encoding.")
                response = openai_error_response(error)
                response.headers["Connection"] = "close"  # uvicorn closes the connection after this answer
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


SHUTDOWN_CUT_MESSAGE = "The server is shutting down and this request ran past --shutdown-timeout; it was stopped."
shutdown_logger = logging.getLogger("fitserve.shutdown")


class ShutdownCuts:
    """The ids of the requests a forced shutdown cut (the launcher then exits non-zero)."""

    def __init__(self) -> None:
        self.request_ids: list[str] = []


class ShutdownCutMiddleware:
    """When uvicorn cancels the requests still open past --shutdown-timeout, each gets an ending:
    a stream its OpenAI error event and `[DONE]`, a request not yet answered a 503; one log line each.

    Only a cancellation while the server drains is treated so (uvicorn cancels request tasks only
    then); the cancellation has already run through the handlers, so engine requests are aborted.
    """

    def __init__(self, app: ASGIApp, lifecycle: ServerLifecycle, cuts: ShutdownCuts) -> None:
        self.app = app
        self.lifecycle = lifecycle
        self.cuts = cuts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = {"started": False, "streaming": False, "done": False}
        start_s = time.monotonic()

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                sent["started"], sent["streaming"] = True, content_type.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                sent["done"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if self.lifecycle.phase != Phase.DRAINING or sent["done"] or (sent["started"] and not sent["streaming"]):
                raise
            await self._end(scope, receive, send, sent["started"], time.monotonic() - start_s)

    async def _end(self, scope: Scope, receive: Receive, send: Send, streaming: bool, elapsed_s: float) -> None:
        request_id = scope.get("state", {}).get("request_id")
        self.cuts.request_ids.append(request_id or "-")
        shutdown_logger.warning('Cut request id=%s "%s %s" after %.1f s: past --shutdown-timeout.', request_id,
                                scope["method"], scope["path"], elapsed_s)
        error = ServiceUnavailableError(SHUTDOWN_CUT_MESSAGE, code="shutdown")
        if streaming:
            ending = sse_error_event(error, request_id) + "data: [DONE]\n\n"
            await send({"type": "http.response.body", "body": ending.encode(), "more_body": False})
        else:
            await openai_error_response(error, request_id)(scope, receive, send)
