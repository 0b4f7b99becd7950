"""ASGI middleware for Ray Serve's HTTP proxy: a replica that dies mid-request is a clear error.

Ray's proxy answers a request whose replica died before answering with nothing (uvicorn then
sends a bare `500 Internal Server Error` in plain text), and ends a stream whose replica died mid-way as if it had finished
(the client sees a short answer and no error). This middleware, run inside the proxy, makes both
visible in OpenAI's shape:
- an error answer that did not come from a replica (no `x-fitserve-replica` header: a dead
  replica, Ray's 503 backpressure, 408 timeout, 404) gets OpenAI's error JSON, same status;
- a `text/event-stream` answer that ends without `data: [DONE]` gets an error event, then
  `[DONE]`; the openai client raises `APIError` on it (fitserve's own streams always end with
  `[DONE]`, also after an in-band error).

The proxy loads it from $RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH =
`fitserve.scaleout.proxy:proxy_middlewares`, which must be set in the environment of every Ray
node (`fitserve serve --replicas` sets it for the local instance it starts; deploy/ sets it).
"""

from __future__ import annotations

import json
from typing import Any

from fitserve.scaleout.options import REPLICA_HEADER
from fitserve.server.errors import error_body

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "fitserve.scaleout.proxy:proxy_middlewares"
REPLICA_FAILED_CODE = "replica_failed"
_SSE_DONE = b"data: [DONE]"
_PROXY_MESSAGES = {
    404: ("No route for this path.", "not_found_error"),
    500: ("The replica serving this request stopped or failed before it answered; the request did not "
          "finish. Other replicas keep serving: retry it.", "server_error"),
}


def proxy_middlewares() -> list[Any]:
    """What Ray's proxy calls through $RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaFailureMiddleware)]


def _error_json(status: int, ray_text: str) -> bytes:
    message, error_type = _PROXY_MESSAGES.get(status, (ray_text.strip() or "Request failed.", "server_error"))
    if status in (408, 429, 503):
        error_type = {408: "timeout_error", 429: "rate_limit_error", 503: "service_unavailable_error"}[status]
    code = REPLICA_FAILED_CODE if status == 500 else None
    return json.dumps(error_body(status, message, error_type, code=code)).encode()


def _stream_cut_event() -> bytes:
    body = error_body(500, "The replica serving this stream stopped before it finished; the answer is "
                           "incomplete. Retry the request.", "server_error", code=REPLICA_FAILED_CODE)
    return b"data: " + json.dumps(body).encode() + b"\n\n" + _SSE_DONE + b"\n\n"


class ReplicaFailureMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = _Response()
        try:
            await self.app(scope, receive, lambda message: state.relay(message, send))
        finally:
            if state.status == 0:  # the proxy gave up without answering (a dead replica): uvicorn would send a bare 500
                body = _error_json(500, "")
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body, "more_body": False})
            elif state.stream_cut():
                await send({"type": "http.response.body", "body": _stream_cut_event(), "more_body": False})


class _Response:
    """What one response has sent so far, and the rewriting of proxy errors."""

    def __init__(self) -> None:
        self.status = 0
        self.from_replica = False
        self.is_sse = False
        self.rewrite = False  # an error answer made by the proxy itself: the body becomes OpenAI JSON
        self.ended = False
        self.tail = b""  # the end of the body sent so far, to find `data: [DONE]`
        self.ray_text = b""

    async def relay(self, message: dict, send: Any) -> None:
        if message["type"] == "http.response.start":
            headers = {name.lower(): value for name, value in message.get("headers", [])}
            self.status = message["status"]
            self.from_replica = REPLICA_HEADER.encode() in headers
            self.is_sse = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            self.rewrite = self.status >= 400 and not self.from_replica
            if self.rewrite:
                kept = [(n, v) for n, v in message.get("headers", [])
                        if n.lower() not in (b"content-type", b"content-length")]
                self.start = {**message, "headers": [*kept, (b"content-type", b"application/json")]}
                return  # sent with the body, once its length is known
        elif message["type"] == "http.response.body":
            if self.rewrite:
                self.ray_text += message.get("body", b"")
                if message.get("more_body", False):
                    return
                body = _error_json(self.status, self.ray_text.decode(errors="replace"))
                self.start["headers"].append((b"content-length", str(len(body)).encode()))
                await send(self.start)
                message = {"type": "http.response.body", "body": body, "more_body": False}
                self.ended = True
            else:
                self.tail = (self.tail + message.get("body", b""))[-64:]
                if self.stream_cut() and not message.get("more_body", False):
                    message = {**message, "more_body": True}  # the error event closes the body instead
                    await send(message)
                    return
                self.ended = not message.get("more_body", False)
        await send(message)

    def stream_cut(self) -> bool:
        """A replica's 200 event stream whose body ended (or will end now) without `data: [DONE]`."""
        return (self.from_replica and self.is_sse and self.status == 200 and not self.ended
                and _SSE_DONE not in self.tail)
