"""The engine core in its own process: the LLMEngine's step loop, fed and read over ZeroMQ.

`run_core` is the process's entry point (started with `spawn` by engine/core_client.py). It
builds the engine with the builder it is handed (startup.build_core for `fitserve serve`),
reports CoreReady or CoreFailed, then loops: take every message waiting (new requests,
aborts) without blocking, run one step, send that step's outputs as one StepOutputs message.
It blocks only when it has nothing to run. Sends never wait on the API process: the output
socket has no high-water mark, so a slow reader costs memory, never a step.

Signals: SIGINT (Ctrl-C reaches the whole process group) is ignored, since the API process
decides when the core stops (after its drain); SIGTERM keeps its default, so a supervisor can
still end the core. If its parent dies (the API process, or the process that started several),
the core notices within PARENT_CHECK_S and exits.

Several API processes (--api-server-count): the core reads every one's requests on one PULL
socket, remembers which process sent each request, and sends each step's outputs as one message
per API process (only that process's requests); stats go to all of them, so every process's
/metrics shows the whole server. ClientGone (from the starting process) aborts a dead API
process's requests.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from fitserve.config import ConfigError
from fitserve.core.engine_stats import EngineStats
from fitserve.engine.async_engine import DEFAULT_MAX_QUEUE_LEN_PER_SEQ
from fitserve.engine.core_messages import (
    AbortRequests,
    AddRequest,
    ClientGone,
    CoreFailed,
    CoreReady,
    Shutdown,
    StepOutputs,
    RequestFailed,
    from_core_codec,
    to_core_codec,
)
from fitserve.engine.errors import InvalidRequestError
from fitserve.engine.llm_engine import LLMEngine
from fitserve.engine.outputs import RequestOutput

logger = logging.getLogger(__name__)
PARENT_CHECK_S = 1.0  # how often an idle (or busy) core checks that the API process still lives
LAST_WORD_TIMEOUT_S = 10.0  # how long a start-up or failure message waits for the API process to take it
STATS_INTERVAL_S = 0.5  # stats ride on a step message at least this often while requests run
# Builds the engine in the core process: (config, progress) -> the engine and what the API process needs.
CoreBuilder = Callable[[Any, bool], "tuple[LLMEngine, CoreReady]"]


@dataclass(frozen=True, slots=True)
class CoreAddresses:
    # ipc:// addresses the senders bind and the core reads requests from: one per API process, and
    # with several API processes one more for the process that started them (ClientGone, Shutdown)
    to_core: tuple[str, ...]
    from_core: tuple[str, ...]  # ipc:// address each API process binds and reads outputs on (by client index)


def run_core(build: CoreBuilder, config: Any, addresses: CoreAddresses, log_level: int, parent_pid: int,
             max_queue_len: int | None = None) -> None:
    """The core process's main: build, report, loop until Shutdown or its parent is gone.
    `max_queue_len` (None: the default per --max-num-seqs) bounds the requests of all API processes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [core]: %(message)s")
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    for address in addresses.to_core:
        inbox.connect(address)
    outboxes = [_outbox(context, address) for address in addresses.from_core]
    try:
        engine, ready = build(config, True)  # progress: the weights bar, as in one process
    except ConfigError as error:
        _last_word(outboxes, CoreFailed(str(error), config_error=True))
        return _close(context, inbox, *outboxes)
    except BaseException as error:  # noqa: BLE001 - reported to the API process, which raises it
        logger.exception("The engine failed to start.")
        _last_word(outboxes, CoreFailed(f"{type(error).__name__}: {error}"))
        return _close(context, inbox, *outboxes)
    try:
        if _last_word(outboxes, ready):
            queue_len = DEFAULT_MAX_QUEUE_LEN_PER_SEQ * ready.max_num_seqs if max_queue_len is None else max_queue_len
            CoreLoop(engine, inbox, outboxes, parent_pid, max_num_in_flight=ready.max_num_seqs + queue_len).run()
    except ApiProcessGone:
        logger.info("The API process has gone; the engine core stops.")
    except BaseException as error:  # noqa: BLE001 - the API process must hear of every failure
        logger.exception("The engine loop failed; the API process fails the requests in flight.")
        _last_word(outboxes, CoreFailed(f"{type(error).__name__}: {error}"))
        raise SystemExit(1) from error
    finally:
        engine.shutdown()
        _close(context, inbox, *outboxes)


def _outbox(context: zmq.Context, address: str) -> zmq.Socket:
    outbox = context.socket(zmq.PUSH)
    outbox.setsockopt(zmq.SNDHWM, 0)  # never block a send: the step loop waits on nobody
    outbox.setsockopt(zmq.LINGER, int(LAST_WORD_TIMEOUT_S * 1000))  # the last message still leaves on exit
    outbox.setsockopt(zmq.SNDTIMEO, int(LAST_WORD_TIMEOUT_S * 1000))  # a blocking send gives up (parent gone)
    outbox.connect(address)
    return outbox


def _last_word(outboxes: list[zmq.Socket], message: CoreReady | CoreFailed) -> bool:
    """A blocking send to every API process that gives up after LAST_WORD_TIMEOUT_S (the API process
    has gone); False when none took it."""
    raw, taken = from_core_codec()[0].encode(message), False
    for outbox in outboxes:
        try:
            outbox.send(raw)
            taken = True
        except zmq.Again:
            pass
    return taken


def _close(context: zmq.Context, *sockets: zmq.Socket) -> None:
    for sock in sockets:
        sock.close()
    context.term()


class ApiProcessGone(Exception):
    """The API process closed its end: nobody is left to serve."""


class CoreLoop:
    """`outboxes[i]` reaches API process i; `max_num_in_flight` bounds the requests of all of them."""

    def __init__(self, engine: LLMEngine, inbox: zmq.Socket, outboxes: list[zmq.Socket], parent_pid: int,
                 max_num_in_flight: int | None = None) -> None:
        self.engine = engine
        self.inbox = inbox
        self.outboxes: list[zmq.Socket | None] = list(outboxes)  # None: that API process has gone
        self.parent_pid = parent_pid
        self.max_num_in_flight = max_num_in_flight
        self.encoder, _ = from_core_codec()
        _, self.decoder = to_core_codec()
        self._owners: dict[str, int] = {}  # request id -> the API process it came from, until it ends
        self._stats_sent_s = time.monotonic()
        self._stats_stale = False  # something changed since the last stats went out
        self._parent_checked_s = time.monotonic()

    def run(self) -> None:
        while True:
            if not self.engine.has_unfinished:
                if self._stats_stale:  # going idle: the API processes get the final figures
                    self._send_stats(self.engine.stats())
                    self._stats_stale = False
                if not self._wait_for_messages():
                    return
            if not self._take_messages():
                return
            if self.engine.has_unfinished:
                self.engine.step(deliver=self._deliver)
                self._stats_stale = True
                if not self._parent_alive_now_and_then():
                    return

    def _wait_for_messages(self) -> bool:
        """Block until a message waits; False when the parent process has gone."""
        while not self.inbox.poll(int(PARENT_CHECK_S * 1000)):
            if not self._parent_alive():
                return False
        return True

    def _take_messages(self) -> bool:
        """Apply every message waiting, without blocking; False on Shutdown."""
        while True:
            try:
                raw = self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return True
            message = self.decoder.decode(raw)
            self._stats_stale = True
            if isinstance(message, AddRequest):
                self._add(message)
            elif isinstance(message, AbortRequests):
                self._abort(message.request_ids)
            elif isinstance(message, ClientGone):
                self._client_gone(message.client_index)
            elif isinstance(message, Shutdown):
                return False

    def _add(self, message: AddRequest) -> None:
        if self.outboxes[message.client_index] is None:
            return  # sent just before its process died
        if self.max_num_in_flight is not None and len(self._owners) >= self.max_num_in_flight:
            self._send_to(message.client_index, RequestFailed(
                message.request_id, f"The server is at capacity: {len(self._owners)} requests are in flight "
                "(--max-num-seqs plus --max-queue-len). Retry later.", overloaded=True))
            return
        try:
            request = self.engine.make_request(message.request_id, message.prompt_token_ids, message.sampling_params)
        except InvalidRequestError as error:
            self._send_to(message.client_index, RequestFailed(message.request_id, str(error), error.param))
            return
        except Exception:  # noqa: BLE001 - one request's failure must not stop the core
            logger.exception("Request %s could not be added.", message.request_id)
            self._send_to(message.client_index, RequestFailed(message.request_id, "internal error", internal=True))
            return
        request.arrival_time_s = message.arrival_time_s
        self._owners[message.request_id] = message.client_index
        self.engine.add_request(request)

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._owners.pop(request_id, None)
            self.engine.abort_request(request_id)

    def _client_gone(self, client_index: int) -> None:
        gone = [request_id for request_id, owner in self._owners.items() if owner == client_index]
        logger.warning("API process %d has gone; aborting its %d request(s).", client_index, len(gone))
        self.outboxes[client_index] = None
        self._abort(gone)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now_s = time.monotonic()
        stats = None
        if any(o.finished for o in outputs) or now_s - self._stats_sent_s >= STATS_INTERVAL_S:
            stats, self._stats_sent_s = self.engine.stats(), now_s
        if len(self.outboxes) == 1:  # one API process: every output is its own
            for output in outputs:
                if output.finished:
                    self._owners.pop(output.request_id, None)
            self._send_to(0, StepOutputs(outputs, stats))
            return
        by_client: list[list[RequestOutput]] = [[] for _ in self.outboxes]
        for output in outputs:
            owner = self._owners.pop(output.request_id, None) if output.finished else \
                self._owners.get(output.request_id)
            if owner is not None:  # None: aborted while its last step ran
                by_client[owner].append(output)
        for index, client_outputs in enumerate(by_client):
            if client_outputs or stats is not None:  # every API process gets the stats
                self._send_to(index, StepOutputs(client_outputs, stats))

    def _send_stats(self, stats: EngineStats) -> None:
        for index in range(len(self.outboxes)):
            self._send_to(index, StepOutputs([], stats))

    def _send_to(self, client_index: int, message: StepOutputs | RequestFailed) -> None:
        outbox = self.outboxes[client_index]
        if outbox is None:
            return
        try:  # with no high-water mark, a send can only find no peer: the API process has gone
            outbox.send(self.encoder.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            raise ApiProcessGone from None

    def _parent_alive_now_and_then(self) -> bool:
        """While busy, the parent is checked once per PARENT_CHECK_S (one syscall)."""
        now_s = time.monotonic()
        if now_s - self._parent_checked_s < PARENT_CHECK_S:
            return True
        self._parent_checked_s = now_s
        return self._parent_alive()

    def _parent_alive(self) -> bool:
        return os.getppid() == self.parent_pid
