"""The FastAPI app: routes, health, error handlers and the middleware stack.

All per-app state (the lifecycle, the engine once loaded, the serving objects) lives on
`app.state` or in middleware instances; nothing in this module holds state. The app can be
built before its engine exists (`build_app(config=...)`, then `attach_engine`): until then
/health answers 503 naming the start-up phase and /v1/* answers 503.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Awaitable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.middleware.cors import CORSMiddleware

import fitserve
from fitserve.config import ServerConfig
from fitserve.engine.chat_template import template_variables
from fitserve.engine.client import EngineClient
from fitserve.server.compat import CHAT, COMPLETIONS, CompatChecker, compat_document
from fitserve.server.errors import (
    ModelNotFoundError,
    ServiceUnavailableError,
    error_body,
    install_error_handlers,
    openai_error_response,
    request_id_of,
)
from fitserve.server.lifecycle import Phase, ServerLifecycle
from fitserve.server.metrics import add_metrics_route
from fitserve.server.middleware import (
    REQUEST_ID_HEADER,
    ApiKeyMiddleware,
    BodySizeLimitMiddleware,
    FramingMiddleware,
    ReadinessMiddleware,
    RequestIdMiddleware,
    ShutdownCutMiddleware,
    ShutdownCuts,
)
from fitserve.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from fitserve.server.serving_chat import OpenAIServingChat
from fitserve.server.serving_responses import OpenAIServingResponses, ResponsesRequest
from fitserve.server.serving_common import ClientDisconnected, ServingOptions
from fitserve.server.serving_completion import OpenAIServingCompletion
from fitserve.server.serving_tokenize import DetokenizeRequest, OpenAIServingTokenization, TokenizeRequest
from fitserve.server.ui import add_ui_routes

__all__ = ["REQUEST_ID_HEADER", "attach_engine", "build_app", "server_version"]
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "client went away"; never seen by the client


def server_version() -> str:
    version = getattr(fitserve, "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version("fitserve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


async def _respond(work: Awaitable[Response], request: Request) -> Response:
    """Run an endpoint; any failure becomes OpenAI error JSON (never exception text)."""
    try:
        return await work
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except Exception as exc:
        return openai_error_response(exc, request_id_of(request))


def _health(lifecycle: ServerLifecycle) -> Response:
    """200 `{"phase": "ready"}`, else 503 with OpenAI's error JSON and the phase beside it."""
    phase = lifecycle.phase
    if phase == Phase.READY:
        return JSONResponse({"phase": phase.value})
    body = error_body(503, lifecycle.message, ServiceUnavailableError.error_type, code=phase.value)
    return JSONResponse({**body, "phase": phase.value}, status_code=503)


def _model_card(engine: EngineClient) -> ModelCard:
    return ModelCard(id=engine.model_name, root=engine.model_name, max_model_len=engine.max_model_len)


def _check_template_kwargs(kwargs: dict[str, Any] | None, request: Request) -> None:
    """400 for a request's own chat template unless --trust-request-chat-template, or a reserved key."""
    template_variables(kwargs, allow_template=request.app.state.config.trust_request_chat_template)


def _add_routes(app: FastAPI) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw_request: Request) -> Response:
        serving: OpenAIServingChat = raw_request.app.state.serving_chat
        raw_request.app.state.compat.check(CHAT, body)
        _check_template_kwargs(body.chat_template_kwargs, raw_request)
        return await _respond(serving.create(body, raw_request, raw_request.state.request_id), raw_request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw_request: Request) -> Response:
        serving: OpenAIServingCompletion = raw_request.app.state.serving_completion
        raw_request.app.state.compat.check(COMPLETIONS, body)
        return await _respond(serving.create(body, raw_request, raw_request.state.request_id), raw_request)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, raw_request: Request) -> Response:
        serving: OpenAIServingResponses = raw_request.app.state.serving_responses
        return await _respond(serving.create(body, raw_request, raw_request.state.request_id), raw_request)

    @app.get("/v1/models")
    async def models(raw_request: Request) -> Response:
        return JSONResponse(ModelList(data=[_model_card(raw_request.app.state.engine)]).model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, raw_request: Request) -> Response:
        engine: EngineClient = raw_request.app.state.engine
        if model_id != engine.model_name:
            return openai_error_response(ModelNotFoundError(model_id, engine.model_name), request_id_of(raw_request))
        return JSONResponse(_model_card(engine).model_dump())

    @app.get("/v1/compat")
    async def compat(raw_request: Request) -> Response:
        return JSONResponse(compat_document(raw_request.app.state.compat.strict))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, raw_request: Request) -> Response:
        serving: OpenAIServingTokenization = raw_request.app.state.serving_tokenization
        _check_template_kwargs(body.chat_template_kwargs, raw_request)
        return JSONResponse((await serving.tokenize(body)).model_dump(exclude_none=True))

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, raw_request: Request) -> Response:
        serving: OpenAIServingTokenization = raw_request.app.state.serving_tokenization
        return JSONResponse((await serving.detokenize(body)).model_dump())

    @app.get("/health")
    async def health(raw_request: Request) -> Response:
        return _health(raw_request.app.state.lifecycle)

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": server_version()})


def attach_engine(app: FastAPI, engine: EngineClient) -> None:
    """Start serving `engine` (call on the app's event loop): /health turns 200, /v1/* opens."""
    options: ServingOptions = app.state.serving_options
    app.state.engine = engine
    app.state.serving_chat = OpenAIServingChat(engine, options)
    app.state.serving_responses = OpenAIServingResponses(app.state.serving_chat)
    app.state.serving_completion = OpenAIServingCompletion(engine, options)
    app.state.serving_tokenization = OpenAIServingTokenization(engine, options)
    app.state.lifecycle.attach(engine)


def build_app(engine: EngineClient | None = None, *, api_key: str | None = None,
              config: ServerConfig | None = None, lifecycle: ServerLifecycle | None = None) -> FastAPI:
    """The OpenAI-compatible app; `engine` may come later through `attach_engine`.

    `api_key` is a shorthand for `config=ServerConfig(api_keys=(api_key,))`.
    """
    if config is None:
        config = ServerConfig(api_keys=(api_key,) if api_key else ())
    app = FastAPI(title="fitserve", version=server_version(), docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config = config
    app.state.lifecycle = lifecycle or ServerLifecycle()
    app.state.shutdown_cuts = ShutdownCuts()  # requests a forced shutdown cut; the launcher's exit code
    app.state.serving_options = ServingOptions.from_config(config)
    app.state.engine = None
    app.state.compat = CompatChecker(config.strict)  # unsupported fields: logged once, or 400 with --strict
    install_error_handlers(app)
    _add_routes(app)
    add_metrics_route(app)
    if config.enable_ui:
        add_ui_routes(app)  # GET / and /ui: the built-in page (docs/ui.md)
    if engine is not None:
        attach_engine(app, engine)
    _add_middleware(app, config)
    return app


def _add_middleware(app: FastAPI, config: ServerConfig) -> None:
    # Starlette runs the last added outermost. From the outside in: request id and access log
    # (every answer carries the id), framing (Content-Length with Transfer-Encoding: 400, closed),
    # the ending of requests a forced shutdown cuts, CORS (so browsers can read 401s), API keys,
    # readiness, body size (read only for requests that will be served), then the routes.
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=config.max_request_body_bytes)
    app.add_middleware(ReadinessMiddleware, lifecycle=app.state.lifecycle)
    if config.api_keys or config.metrics_api_key:
        app.add_middleware(ApiKeyMiddleware, api_keys=config.api_keys, metrics_api_key=config.metrics_api_key)
    app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                       allow_methods=list(config.allowed_methods), allow_headers=list(config.allowed_headers),
                       allow_credentials=config.allow_credentials, expose_headers=[REQUEST_ID_HEADER])
    app.add_middleware(ShutdownCutMiddleware, lifecycle=app.state.lifecycle, cuts=app.state.shutdown_cuts)
    app.add_middleware(FramingMiddleware)
    app.add_middleware(RequestIdMiddleware)
