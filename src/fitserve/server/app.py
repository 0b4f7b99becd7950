"""The FastAPI app: routes, request ids, API-key auth, error handlers, and the uvicorn runner.

All per-app state (the engine, the serving objects, the API key) lives on `app.state` or in
middleware instances; nothing in this module holds state.
"""

from __future__ import annotations

import hmac
import importlib.metadata
import re
import uuid
from collections.abc import Awaitable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import fitserve
from fitserve.engine.client import EngineClient
from fitserve.server.errors import (
    AuthenticationError,
    ServiceUnavailableError,
    install_error_handlers,
    openai_error_json,
)
from fitserve.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from fitserve.server.serving_chat import OpenAIServingChat
from fitserve.server.serving_common import ClientDisconnected
from fitserve.server.serving_completion import OpenAIServingCompletion

REQUEST_ID_HEADER = "x-request-id"
# A client's X-Request-Id is echoed only when it is short and plain (it ends up in logs).
_CLIENT_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "client went away"; never seen by the client


def server_version() -> str:
    version = getattr(fitserve, "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version("fitserve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class RequestIdMiddleware:
    """Gives every HTTP request a unique id; answers with the client's X-Request-Id if sane, else ours."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The engine sees only our own unique id: two clients may send the same header.
        request_id = uuid.uuid4().hex
        client_id = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        echoed_id = client_id if _CLIENT_REQUEST_ID_RE.match(client_id) else request_id
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", echoed_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <api_key>` on /v1/* routes (health and version stay open)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                status, body = openai_error_json(AuthenticationError())
                await JSONResponse(body, status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _respond(work: Awaitable[Response]) -> Response:
    """Run an endpoint; any failure becomes OpenAI error JSON (never exception text)."""
    try:
        return await work
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except Exception as exc:
        status, body = openai_error_json(exc)
        return JSONResponse(body, status_code=status)


def _add_routes(app: FastAPI) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw_request: Request) -> Response:
        serving: OpenAIServingChat = raw_request.app.state.serving_chat
        return await _respond(serving.create(body, raw_request, raw_request.state.request_id))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw_request: Request) -> Response:
        serving: OpenAIServingCompletion = raw_request.app.state.serving_completion
        return await _respond(serving.create(body, raw_request, raw_request.state.request_id))

    @app.get("/v1/models")
    async def models(raw_request: Request) -> Response:
        engine: EngineClient = raw_request.app.state.engine
        card = ModelCard(id=engine.model_name, root=engine.model_name, max_model_len=engine.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.get("/health")
    async def health(raw_request: Request) -> Response:
        engine: EngineClient = raw_request.app.state.engine
        try:
            healthy = engine.is_healthy()
        except Exception:
            healthy = False
        if healthy:
            return JSONResponse({})
        status, body = openai_error_json(ServiceUnavailableError("The engine is not healthy."))
        return JSONResponse(body, status_code=status)

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": server_version()})


def build_app(engine: EngineClient, *, api_key: str | None = None) -> FastAPI:
    """The OpenAI-compatible app over `engine`; with `api_key`, /v1/* needs it as a Bearer token."""
    app = FastAPI(title="fitserve", version=server_version(), docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.serving_chat = OpenAIServingChat(engine)
    app.state.serving_completion = OpenAIServingCompletion(engine)
    install_error_handlers(app)
    _add_routes(app)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(RequestIdMiddleware)  # added last: outermost, so 401s carry the id too
    return app


def build_server(engine: EngineClient, host: str, port: int, *, api_key: str | None = None,
                 log_level: str = "info") -> uvicorn.Server:
    config = uvicorn.Config(build_app(engine, api_key=api_key), host=host, port=port, log_level=log_level)
    return uvicorn.Server(config)


def run_server(engine: EngineClient, host: str, port: int, api_key: str | None = None,
               log_level: str = "info") -> None:
    """Serve until interrupted (blocks). The engine's lifecycle belongs to the caller."""
    build_server(engine, host, port, api_key=api_key, log_level=log_level).run()
