"""The engine behind the HTTP server: a background thread steps the LLMEngine while
requests stream their outputs to asyncio tasks.

The step loop runs in its own thread so that the event loop stays free for HTTP work
while the model computes (torch releases the interpreter lock inside its kernels). The
two sides meet in two places only: a locked inbox of new requests and aborts, and
`call_soon_threadsafe`, which hands each step's outputs to the event loop in one call.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from fitserve.core.engine_stats import EngineStats
from fitserve.engine.errors import EngineDeadError, EngineOverloadedError
from fitserve.engine.llm_engine import LLMEngine
from fitserve.engine.outputs import RequestOutput
from fitserve.request import Request
from fitserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class RequestStream:
    """Where one request's outputs wait for its consumer (also engine/core_client.py's)."""

    __slots__ = ("loop", "queue", "finished")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they arrive, up to its finished one; a delivered exception is raised."""
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return


def check_capacity(num_in_flight: int, max_num_in_flight: int | None, max_queue_len: int | None) -> None:
    """EngineOverloadedError (503) when `num_in_flight` requests already fill the engine and its queue."""
    if max_num_in_flight is not None and num_in_flight >= max_num_in_flight:
        raise EngineOverloadedError(
            f"The server is at capacity: {num_in_flight} requests are in flight "
            f"(--max-num-seqs plus --max-queue-len {max_queue_len}). Retry later.")


# The queue's default length, per request the engine runs at once: a request waits for at most
# this many batches to drain, and a flood is refused with 503 instead of growing without end.
DEFAULT_MAX_QUEUE_LEN_PER_SEQ = 8


class AsyncEngine:
    """`max_queue_len`: requests that may wait beyond the `max_num_seqs` the engine runs at once;
    past `max_num_seqs + max_queue_len` requests in flight, `generate` raises EngineOverloadedError.
    None: DEFAULT_MAX_QUEUE_LEN_PER_SEQ x max_num_seqs. `startup_info`: the page's memory plan and settings
    (server/ui/info.py)."""

    def __init__(self, engine: LLMEngine, model_name: str, tokenizer: Any, max_queue_len: int | None = None,
                 default_sampling_params: dict[str, Any] | None = None,
                 startup_info: dict[str, Any] | None = None) -> None:
        self.engine = engine
        self.startup_info = startup_info
        self.model_name = model_name
        self.max_model_len = engine.max_model_len
        self.max_logprobs = engine.limits.max_logprobs
        # The model's generation_config.json defaults, for fields a request leaves unset.
        self.default_sampling_params = dict(default_sampling_params or {})
        max_num_seqs = engine.limits.scheduler.max_num_seqs
        self.max_queue_len = DEFAULT_MAX_QUEUE_LEN_PER_SEQ * max_num_seqs if max_queue_len is None else max_queue_len
        self.max_num_in_flight: int | None = max_num_seqs + self.max_queue_len
        self._tokenizer = tokenizer
        self._inbox_lock = threading.Lock()
        self._new_requests: list[Request] = []
        self._aborts: list[str] = []
        self._wakeup = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._stop = False
        self._dead_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run_loop, name="fitserve-engine", daemon=True)

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stop = True
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.engine.shutdown()  # tensor-parallel workers stop with the engine

    def is_healthy(self) -> bool:
        return self._dead_error is None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def num_requests_in_flight(self) -> int:
        """Requests accepted and not yet finished or aborted (read on the event loop)."""
        return len(self._streams)

    # -- requests ----------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        if self._dead_error is not None:
            raise EngineDeadError("The engine has stopped after an internal error.")
        request = self.engine.make_request(request_id, prompt_token_ids, sampling_params)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id} is already in use")
        # `_streams` changes only on the event loop, so this check and the insert below are atomic.
        check_capacity(len(self._streams), self.max_num_in_flight, self.max_queue_len)
        stream = RequestStream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        with self._inbox_lock:
            self._new_requests.append(request)
        self._wakeup.set()
        try:
            async for output in stream.outputs():
                yield output
        finally:
            # Reached on normal end, on an error, and when the consumer closes us early
            # (client disconnect): in the last two cases the request is still running.
            self._streams.pop(request_id, None)
            if not stream.finished:
                self._request_abort(request_id)

    async def abort(self, request_id: str) -> None:
        self._request_abort(request_id)

    def _request_abort(self, request_id: str) -> None:
        with self._inbox_lock:
            self._aborts.append(request_id)
        self._wakeup.set()

    # -- the engine thread --------------------------------------------------------------------

    def _run_loop(self) -> None:
        try:
            while not self._stop:
                self._drain_inbox()
                if not self.engine.has_unfinished:
                    self._wakeup.wait()
                    continue
                self.engine.step(deliver=self._deliver)  # outputs go out before the step's GPU work ends
        except BaseException as error:  # noqa: BLE001 - the loop must report every failure
            logger.exception("The engine loop failed; failing all in-flight requests.")
            self._dead_error = error
            self._fail_all(EngineDeadError("The engine failed while running this request."))

    def _drain_inbox(self) -> None:
        self._wakeup.clear()  # before taking the inbox: a later set() is never lost
        with self._inbox_lock:
            new_requests, self._new_requests = self._new_requests, []
            aborts, self._aborts = self._aborts, []
        for request in new_requests:
            self.engine.add_request(request)
        for request_id in aborts:
            self.engine.abort_request(request_id)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        deliver_to_streams(self._streams, outputs)

    def _fail_all(self, error: BaseException) -> None:
        fail_streams(self._streams, error)


def deliver_to_streams(streams: dict[str, RequestStream], outputs: list[RequestOutput]) -> None:
    """From the thread that reads the engine: each output to its request's stream, one call per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
    for output in outputs:
        stream = streams.get(output.request_id)
        if stream is None:
            continue  # its consumer left; the abort is already queued
        stream.finished = output.finished
        by_loop.setdefault(stream.loop, []).append((stream, output))
    for loop, items in by_loop.items():
        _call_soon(loop, _put_all, items)


def fail_streams(streams: dict[str, RequestStream], error: BaseException) -> None:
    """From the thread that reads the engine: every stream ends with `error`."""
    for stream in list(streams.values()):
        stream.finished = True
        _call_soon(stream.loop, stream.queue.put_nowait, error)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # that event loop has closed: nobody is left to read
        pass


def _put_all(items: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)
