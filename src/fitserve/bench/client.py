"""One benchmark request over HTTP: a streamed OpenAI completion or chat completion, timed
per chunk. Works against any OpenAI-compatible server (fitserve, vLLM, llama.cpp's)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from fitserve.bench.workloads import RequestSpec

COMPLETIONS_ENDPOINT = "/v1/completions"
CHAT_ENDPOINT = "/v1/chat/completions"
MAX_ERROR_CHARS = 500  # an error body is kept up to this length in the report
READY_RETRY_INTERVAL_S = 1.0


class BenchError(RuntimeError):
    """A problem a user can fix (unreachable server, unknown model, bad flag); printed, exit code 2."""


@dataclass(frozen=True, slots=True)
class RequestSettings:
    """What every request of a run shares."""
    base_url: str                    # http://host:port, no /v1
    endpoint: str                    # COMPLETIONS_ENDPOINT or CHAT_ENDPOINT
    model: str
    ignore_eos: bool = True
    temperature: float = 0.0
    api_key: str | None = None
    extra_body: dict = field(default_factory=dict)

    @property
    def chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("chat/completions")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(slots=True)
class RequestOutcome:
    """What the client saw of one request; times from time.perf_counter()."""
    index: int
    role: str                        # "main", or W5's "long" / "short"
    prompt_len: int                  # prompt tokens: the server's usage count when it sends one
    expected_output_len: int
    success: bool = False
    error: str = ""
    start_s: float = 0.0             # when the request was sent
    ttft_s: float = 0.0              # send -> first chunk with text
    latency_s: float = 0.0           # send -> end of the stream
    itl_s: list[float] = field(default_factory=list)  # gaps between chunks with text after the first
    output_tokens: int = 0           # the server's usage count; else the number of chunks with text

    @property
    def end_s(self) -> float:
        return self.start_s + self.latency_s


def request_payload(spec: RequestSpec, settings: RequestSettings) -> dict:
    body: dict = {
        "model": settings.model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": settings.temperature,
    }
    if settings.chat:
        body["messages"] = [{"role": "user", "content": spec.prompt}]
        body["max_completion_tokens"] = spec.output_len
    else:
        body["prompt"] = spec.prompt
        body["max_tokens"] = spec.output_len
    if settings.ignore_eos:
        body["ignore_eos"] = True
    body.update(settings.extra_body)
    return body


def _chunk_text(chunk: dict, chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


def _error_text(body: str, status: int) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.strip()
    return f"HTTP {status}: {message}"[:MAX_ERROR_CHARS]


async def _read_stream(response: httpx.Response, outcome: RequestOutcome, chat: bool,
                       on_first_token: Callable[[], None] | None) -> None:
    last_s = outcome.start_s
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(_error_text(json.dumps(chunk), response.status_code))
        if chunk.get("usage"):
            outcome.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
            outcome.prompt_len = int(chunk["usage"].get("prompt_tokens") or outcome.prompt_len)
        if not _chunk_text(chunk, chat):
            continue
        now_s = time.perf_counter()
        if outcome.ttft_s == 0.0:
            outcome.ttft_s = now_s - outcome.start_s
            if on_first_token is not None:
                on_first_token()
        else:
            outcome.itl_s.append(now_s - last_s)
        last_s = now_s


async def send_request(http: httpx.AsyncClient, spec: RequestSpec, settings: RequestSettings,
                       on_first_token: Callable[[], None] | None = None) -> RequestOutcome:
    """Send one streamed request; never raises for a failed request (it is counted instead)."""
    outcome = RequestOutcome(spec.index, spec.role, spec.prompt_len, spec.output_len)
    outcome.start_s = time.perf_counter()
    try:
        async with http.stream("POST", settings.base_url + settings.endpoint, json=request_payload(spec, settings),
                               headers=settings.headers()) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                raise RuntimeError(_error_text(body, response.status_code))
            await _read_stream(response, outcome, settings.chat, on_first_token)
        outcome.latency_s = time.perf_counter() - outcome.start_s
        if outcome.ttft_s == 0.0:
            raise RuntimeError("the stream ended without any text")
        if outcome.output_tokens == 0:  # no usage chunk: count chunks, as a lower bound
            outcome.output_tokens = len(outcome.itl_s) + 1
        outcome.success = True
    except Exception as exc:  # every failure is a result, never a crash of the run
        outcome.latency_s = time.perf_counter() - outcome.start_s
        outcome.error = str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
        outcome.error = outcome.error[:MAX_ERROR_CHARS]
    return outcome


def make_http_client(timeout_s: float) -> httpx.AsyncClient:
    # No pool limit: the workload's semaphore is the only cap on requests in flight.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=30.0, pool=None), limits=limits)


async def wait_until_ready(http: httpx.AsyncClient, spec: RequestSpec, settings: RequestSettings,
                           timeout_s: float) -> RequestOutcome:
    """Send `spec` until the server answers (connection errors are retried up to `timeout_s`);
    raise BenchError if the answer is an error, since every request would then fail alike."""
    deadline_s = time.monotonic() + timeout_s
    while True:
        outcome = await send_request(http, spec, settings)
        if outcome.success:
            return outcome
        retryable = outcome.error.startswith(("ConnectError", "RemoteProtocolError", "ReadError", "HTTP 503"))
        if not retryable or time.monotonic() > deadline_s:
            raise BenchError(f"the initial test request to {settings.base_url}{settings.endpoint} failed: "
                             f"{outcome.error}")
        await asyncio.sleep(max(0.0, min(READY_RETRY_INTERVAL_S, deadline_s - time.monotonic())))


async def get_json(http: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None) -> dict | None:
    """GET a JSON document; None when the server does not have it (404, not JSON, unreachable)."""
    try:
        response = await http.get(url, headers=headers or {}, timeout=10.0)
        if response.status_code != 200:
            return None
        return response.json()
    except (httpx.HTTPError, ValueError):
        return None


async def first_model_name(http: httpx.AsyncClient, settings: RequestSettings) -> str:
    models = await get_json(http, settings.base_url + "/v1/models", settings.headers())
    try:
        return str(models["data"][0]["id"])
    except (TypeError, KeyError, IndexError):
        raise BenchError(f"could not read a model name from {settings.base_url}/v1/models (is the server up?): "
                         "pass --model") from None
