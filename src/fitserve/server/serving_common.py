"""What both endpoints share: model check, the caps on the work one request creates, tokenizing
off the event loop, engine streams that always abort on exit (their 400s renamed to the client's
fields), disconnect detection, and Server-Sent Events framing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Generic, TypeVar

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from fitserve.config import ServerConfig
from fitserve.core.outputs import TokenLogprobs
from fitserve.engine.client import EngineClient
from fitserve.engine.errors import InvalidRequestError
from fitserve.engine.outputs import RequestOutput
from fitserve.engine.request_limits import RequestLimitError
from fitserve.sampling_params import SamplingParams
from fitserve.server.errors import BadRequestError, ModelNotFoundError, RequestTimeoutError, sse_error_event
from fitserve.server.logprobs import TokenTexts
from fitserve.server.protocol import SamplingFields
from fitserve.server.request_caps import RequestCaps

T = TypeVar("T")
SSE_DONE = "data: [DONE]\n\n"
logger = logging.getLogger(__name__)


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was ready."""


@dataclass(slots=True)
class FinalOutput:
    """One request's whole result, accumulated from its RequestOutput deltas."""

    text: str
    finish_reason: str | None
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_output_tokens: int
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprobs, ...] | None = None  # per output token, when asked
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None  # per prompt token, when asked


def sse_event(chunk: BaseModel, include_usage: bool) -> str:
    # OpenAI sends `usage: null` on every chunk only when the client asked for usage.
    exclude = None if include_usage else {"usage"}
    return f"data: {chunk.model_dump_json(exclude=exclude)}\n\n"


async def sse_body(events: AsyncIterator[str], streams: list[AsyncIterator[Any]],
                   request_id: str | None) -> AsyncIterator[str]:
    """An endpoint's events as an SSE body: an error after the 200 headers is reported in-band,
    as vLLM does; the engine streams are closed on the way out; `[DONE]` ends it."""
    try:
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            async for event in events:
                yield event
    except Exception as exc:
        yield sse_error_event(exc, request_id)
    finally:
        await close_all(streams)  # the events' merged streams close them only if they started
    yield SSE_DONE


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator and the engine streams behind it.

    Starlette stops iterating when the client disconnects but leaves the generator to the
    garbage collector; closing it here runs its `finally`, which aborts the engine requests.
    A body that never started has no `finally` to run, so `sources` (the streams it reads) are
    closed here too: a client that leaves before the first chunk aborts them all the same.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], sources: Sequence[AsyncIterator[Any]] = ()) -> None:
        super().__init__(content)
        self.sources = list(sources)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            await close_all(self.sources)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it and raising ClientDisconnected if the client goes away."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        if work_task.done():
            return work_task.result()
        raise ClientDisconnected()
    finally:
        for task in (work_task, watch_task):
            task.cancel()
        # Let the cancelled work run its `finally` blocks (engine aborts) before we return.
        await asyncio.gather(work_task, watch_task, return_exceptions=True)


async def gather_or_cancel(*works: Awaitable[T]) -> list[T]:
    """Like asyncio.gather, but a failure or cancellation cancels the others and waits for them."""
    tasks = [asyncio.ensure_future(work) for work in works]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(stream: AsyncIterator[RequestOutput]) -> FinalOutput:
    pieces: list[str] = []
    token_ids: list[int] = []
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs = None
    last: RequestOutput | None = None
    async for out in stream:
        pieces.append(out.new_text)
        token_ids.extend(out.new_token_ids)
        if out.new_logprobs is not None:
            logprobs = (logprobs or []) + list(out.new_logprobs)
        prompt_logprobs = out.prompt_logprobs or prompt_logprobs
        last = out
    assert last is not None and last.finished, "an engine stream must end with a finished output"
    return FinalOutput("".join(pieces), last.finish_reason, last.stop_reason,
                       last.num_prompt_tokens, last.num_output_tokens, tuple(token_ids),
                       None if logprobs is None else tuple(logprobs), prompt_logprobs)


async def close_all(streams: list[AsyncIterator[Any]]) -> None:
    """Close every stream (aborting its engine request if it is still running)."""
    await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)  # type: ignore[attr-defined]


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several streams as (index, item) in arrival order; closes all on exit."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    finished = object()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
            await queue.put((index, finished))
        except Exception as exc:  # handed to the consumer, which re-raises it
            await queue.put((index, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        num_running = len(tasks)
        while num_running:
            index, item = await queue.get()
            if item is finished:
                num_running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class ServingOptions:
    request_timeout_s: float | None = None  # from arrival to the last token; None: no limit
    enable_log_requests: bool = False  # log each request's prompt token ids and settings
    max_log_len: int | None = None  # prompt tokens shown in that log line; None: all
    caps: RequestCaps = RequestCaps()
    reasoning_parser: str | None = None  # --reasoning-parser's name; None: no split
    tool_call_parser: str = "llama3_json"  # --tool-call-parser's name

    @classmethod
    def from_config(cls, config: ServerConfig) -> ServingOptions:
        caps = RequestCaps(config.max_n, config.max_prompts_per_request, config.max_choices_per_request,
                           config.max_prompt_tokens_per_request)
        return cls(config.request_timeout_s, config.enable_log_requests, config.max_log_len, caps,
                   config.reasoning_parser, config.tool_call_parser)


def client_error(exc: InvalidRequestError, field_names: Mapping[str, str]) -> BadRequestError:
    """An engine's 400, naming the field the client sent (`max_completion_tokens`, `top_logprobs`,
    `messages`) where the engine names its own parameter."""
    param = None if exc.param is None else field_names.get(exc.param, exc.param)
    message = exc.message_for(param or "") if isinstance(exc, RequestLimitError) else str(exc)
    return BadRequestError(message, param=param)


class ServingBase:
    """Holds the engine; turns validated requests into engine streams."""

    def __init__(self, engine: EngineClient, options: ServingOptions | None = None) -> None:
        self.engine = engine
        self.options = options or ServingOptions()

    def deadline(self) -> float | None:
        """The event-loop time by which a request arriving now must finish."""
        timeout_s = self.options.request_timeout_s
        return None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @cached_property
    def token_texts(self) -> TokenTexts:
        return TokenTexts(self.engine.tokenizer)

    @property
    def default_sampling_params(self) -> dict[str, Any]:
        """The model's generation_config.json defaults (empty with --generation-config vllm)."""
        return self.engine.default_sampling_params

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.engine.model_name:
            raise ModelNotFoundError(requested, self.engine.model_name)

    @staticmethod
    async def off_loop(work: Callable[..., T], *args: Any) -> T:
        """Run tokenizing or template rendering in a worker thread: a huge body must not hold
        the event loop (and with it /health and every other request) while it is read."""
        return await asyncio.to_thread(work, *args)

    def sampling_params(self, body: SamplingFields, num_prompt_tokens: int) -> SamplingParams:
        """The request's SamplingParams, unset fields from the model's defaults. The engine checks
        every limit (engine/request_limits.py) and fills an unset max_tokens with the room left."""
        defaults = self.default_sampling_params
        max_tokens = body.requested_max_tokens()
        room_tokens = self.engine.max_model_len - num_prompt_tokens
        if body.max_tokens_unset() and "max_tokens" in defaults and room_tokens > 0:
            max_tokens = min(defaults["max_tokens"], room_tokens)  # generation_config's max_new_tokens
        return body.to_sampling_params(max_tokens=max_tokens, defaults=defaults)

    def log_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Prompts are logged only with --enable-log-requests: they may hold private data."""
        if not self.options.enable_log_requests:
            return
        shown = prompt_token_ids if self.options.max_log_len is None else prompt_token_ids[:self.options.max_log_len]
        logger.info("Request %s: %d prompt tokens %s, %s", request_id, len(prompt_token_ids), shown, params)

    def fan_out(self, request_ids: list[str], prompt_token_ids: list[int], params: SamplingParams,
                deadline: float | None, field_names: Mapping[str, str]) -> list[AsyncIterator[RequestOutput]]:
        """One engine request per id: the choices of one prompt (`n`), sharing its prompt.

        Choice i of a request with a seed gets seed + i (vLLM's rule), so the choices differ and
        are reproducible. `field_names` renames the engine's parameters in its errors.
        """
        return [
            self.engine_stream(request_id, prompt_token_ids,
                               params if i == 0 or params.seed is None else replace(params, seed=params.seed + i),
                               deadline, field_names)
            for i, request_id in enumerate(request_ids)
        ]

    async def prime_all(self, raw_request: Request, streams: list[AsyncIterator[T]]) -> list[AsyncIterator[T]]:
        """Each stream's first output before the 200 headers (so engine errors are 400s); a failure
        or a disconnect closes them all."""
        try:
            return await until_disconnected(raw_request, gather_or_cancel(*map(prime, streams)))
        except BaseException:
            await close_all(streams)
            raise

    async def engine_stream(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                            deadline: float | None = None, field_names: Mapping[str, str] | None = None,
                            ) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one request; leaving early in any way aborts it.

        `generate` is called lazily, so a stream that is never started never reaches the engine.
        Past `deadline` (event-loop time) it raises RequestTimeoutError, which aborts the request.
        The engine's 400s name the client's fields (`field_names`: engine name -> client's).
        """
        self.log_request(request_id, prompt_token_ids, params)
        outputs = self.engine.generate(request_id, prompt_token_ids, params)
        finished = False
        try:
            while True:  # to StopAsyncIteration: a source may do its bookkeeping after the last output
                try:
                    async with asyncio.timeout_at(deadline):
                        out = await outputs.__anext__()
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise RequestTimeoutError(self.options.request_timeout_s or 0.0) from None
                except InvalidRequestError as exc:
                    raise client_error(exc, field_names or {}) from None
                finished = out.finished
                yield out
        finally:
            # Closing the engine's iterator is the seam's abort; abort by id only when it
            # cannot be closed.
            aclose = getattr(outputs, "aclose", None)
            if aclose is not None:
                await aclose()
            elif not finished:
                await self.engine.abort(request_id)


async def prime(stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """Fetch the first item now (so errors raised before it become HTTP errors), then replay it."""
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        return _Primed([], stream)
    return _Primed([first], stream)


class _Primed(Generic[T]):
    """A stream whose first item was fetched ahead, then handed out first.

    Not an async generator on purpose: closing a generator that never ran runs none of its code,
    which would leave `source` (an engine request) open until the garbage collector finds it.
    `aclose` here closes `source` whether or not anyone read from this stream.
    """

    __slots__ = ("_pending", "_source")

    def __init__(self, pending: list[T], source: AsyncIterator[T]) -> None:
        self._pending = pending  # the fetched first item until it is handed out; empty after
        self._source = source

    def __aiter__(self) -> _Primed[T]:
        return self

    async def __anext__(self) -> T:
        if self._pending:
            return self._pending.pop()
        return await self._source.__anext__()

    async def aclose(self) -> None:
        self._pending.clear()
        await self._source.aclose()  # type: ignore[attr-defined]
