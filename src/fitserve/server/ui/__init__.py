"""The built-in page: GET / and /ui (docs/ui.md).

One HTML page with its script and style files, shipped as package data in `static/` and
served from memory: no build step, nothing fetched from elsewhere (the Content-Security-Policy
allows this origin only). The page reads /health and /metrics every second (both access-logged
at DEBUG only) and /ui/api/info once (the model, its settings and the start-up memory plan),
and chats through /v1/chat/completions. /ui/api/info is guarded like /metrics: by
--metrics-api-key when it is set, else by --api-key. `--disable-ui` leaves all of it out.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from functools import cache
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from fitserve.server.errors import AuthenticationError, error_response, openai_error_response
from fitserve.server.ui.info import ui_info

__all__ = ["add_ui_routes"]

ASSET_TYPES = {  # the files under static/ that are served, and their media types
    "app.js": "text/javascript; charset=utf-8",
    "charts.js": "text/javascript; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "metrics.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# Only this origin: the page can neither load nor send anything elsewhere. `data:` images: the favicon.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"}
AUTH_MARKER = "{{AUTH_JSON}}"  # replaced in index.html by which keys the server asks for


@cache
def _asset(name: str) -> str:
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


def _page(request: Request) -> Response:
    config = request.app.state.config
    # Tells the page which keys to ask for; says no more than a 401 would.
    auth = {"api_key": bool(config.api_keys), "metrics_key": bool(config.metrics_api_key)}
    html = _asset("index.html").replace(AUTH_MARKER, json.dumps(auth).replace('"', "&quot;"))
    return HTMLResponse(html, headers=PAGE_HEADERS)


def _key_matches(request: Request, key: str | None) -> bool:
    """Constant-time `Authorization: Bearer <key>` check; no key configured means open."""
    if not key:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given, wanted = hashlib.sha256(token.encode()).digest(), hashlib.sha256(key.encode()).digest()
    return hmac.compare_digest(given, wanted) and scheme.lower() == "bearer"


def add_ui_routes(app: FastAPI) -> None:
    """GET /, /ui, /ui/static/<file> and /ui/api/info."""

    @app.get("/", include_in_schema=False)
    async def root(request: Request) -> Response:
        return _page(request)

    @app.get("/ui", include_in_schema=False)
    async def ui(request: Request) -> Response:
        return _page(request)

    @app.get("/ui/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        media_type = ASSET_TYPES.get(name)
        if media_type is None:
            return error_response(404, "No such file.", "NotFoundError")
        return Response(_asset(name), media_type=media_type, headers=PAGE_HEADERS)

    @app.get("/ui/api/info", include_in_schema=False)
    async def info(request: Request) -> Response:
        if not _key_matches(request, request.app.state.config.metrics_api_key):
            response = openai_error_response(AuthenticationError())
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        state = request.app.state
        return JSONResponse(ui_info(state.engine, state.lifecycle.phase.value, request.app.version))
