"""The engine core in its own process: the LLMEngine's step loop, fed and read over ZeroMQ.

`run_core` is the process's entry point (started with `spawn` by engine/core_client.py). It
builds the engine with the builder it is handed (startup.build_core for `fitserve serve`),
reports CoreReady or CoreFailed, then loops: take every message waiting (new requests,
aborts) without blocking, run one step, send that step's outputs as one StepOutputs message.
It blocks only when it has nothing to run. Sends never wait on the API process: the output
socket has no high-water mark, so a slow reader costs memory, never a step.

Signals: SIGINT (Ctrl-C reaches the whole process group) is ignored, since the API process
decides when the core stops (after its drain); SIGTERM keeps its default, so a supervisor can
still end the core. If the API process dies, the core notices within PARENT_CHECK_S and exits.
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
from fitserve.engine.core_messages import (
    AbortRequests,
    AddRequest,
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
    to_core: str  # ipc:// address the API process binds and sends requests on
    from_core: str  # ipc:// address the API process binds and reads outputs on


def run_core(build: CoreBuilder, config: Any, addresses: CoreAddresses, log_level: int, parent_pid: int) -> None:
    """The core process's main: build, report, loop until Shutdown or the API process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [core]: %(message)s")
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    inbox.connect(addresses.to_core)
    outbox = context.socket(zmq.PUSH)
    outbox.setsockopt(zmq.SNDHWM, 0)  # never block a send: the step loop waits on nobody
    outbox.setsockopt(zmq.LINGER, int(LAST_WORD_TIMEOUT_S * 1000))  # the last message still leaves on exit
    outbox.setsockopt(zmq.SNDTIMEO, int(LAST_WORD_TIMEOUT_S * 1000))  # a blocking send gives up (parent gone)
    outbox.connect(addresses.from_core)
    try:
        engine, ready = build(config, True)  # progress: the weights bar, as in one process
    except ConfigError as error:
        _last_word(outbox, CoreFailed(str(error), config_error=True))
        return _close(context, inbox, outbox)
    except BaseException as error:  # noqa: BLE001 - reported to the API process, which raises it
        logger.exception("The engine failed to start.")
        _last_word(outbox, CoreFailed(f"{type(error).__name__}: {error}"))
        return _close(context, inbox, outbox)
    try:
        if _last_word(outbox, ready):
            CoreLoop(engine, inbox, outbox, parent_pid).run()
    except ApiProcessGone:
        logger.info("The API process has gone; the engine core stops.")
    except BaseException as error:  # noqa: BLE001 - the API process must hear of every failure
        logger.exception("The engine loop failed; the API process fails the requests in flight.")
        _last_word(outbox, CoreFailed(f"{type(error).__name__}: {error}"))
        raise SystemExit(1) from error
    finally:
        engine.shutdown()
        _close(context, inbox, outbox)


def _last_word(outbox: zmq.Socket, message: CoreReady | CoreFailed) -> bool:
    """A blocking send that gives up after LAST_WORD_TIMEOUT_S (the API process has gone); False then."""
    try:
        outbox.send(from_core_codec()[0].encode(message))
        return True
    except zmq.Again:
        return False


def _close(context: zmq.Context, *sockets: zmq.Socket) -> None:
    for sock in sockets:
        sock.close()
    context.term()


class ApiProcessGone(Exception):
    """The API process closed its end: nobody is left to serve."""


class CoreLoop:
    def __init__(self, engine: LLMEngine, inbox: zmq.Socket, outbox: zmq.Socket, parent_pid: int) -> None:
        self.engine = engine
        self.inbox = inbox
        self.outbox = outbox
        self.parent_pid = parent_pid
        self.encoder, _ = from_core_codec()
        _, self.decoder = to_core_codec()
        self._stats_sent_s = time.monotonic()
        self._stats_stale = False  # something changed since the last stats went out
        self._parent_checked_s = time.monotonic()

    def run(self) -> None:
        while True:
            if not self.engine.has_unfinished:
                if self._stats_stale:  # going idle: the API process gets the final figures
                    self._send(StepOutputs([], self.engine.stats()))
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
        """Block until a message waits; False when the API process has gone."""
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
                for request_id in message.request_ids:
                    self.engine.abort_request(request_id)
            elif isinstance(message, Shutdown):
                return False

    def _add(self, message: AddRequest) -> None:
        try:
            request = self.engine.make_request(message.request_id, message.prompt_token_ids, message.sampling_params)
        except InvalidRequestError as error:
            self._send(RequestFailed(message.request_id, str(error), error.param))
            return
        except Exception:  # noqa: BLE001 - one request's failure must not stop the core
            logger.exception("Request %s could not be added.", message.request_id)
            self._send(RequestFailed(message.request_id, "internal error", internal=True))
            return
        request.arrival_time_s = message.arrival_time_s
        self.engine.add_request(request)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now_s = time.monotonic()
        stats = None
        if any(o.finished for o in outputs) or now_s - self._stats_sent_s >= STATS_INTERVAL_S:
            stats, self._stats_sent_s = self.engine.stats(), now_s
        self._send(StepOutputs(outputs, stats))

    def _send(self, message: StepOutputs | RequestFailed) -> None:
        try:  # with no high-water mark, a send can only find no peer: the API process has gone
            self.outbox.send(self.encoder.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            raise ApiProcessGone from None

    def _parent_alive_now_and_then(self) -> bool:
        """While busy, the API process is checked once per PARENT_CHECK_S (one syscall)."""
        now_s = time.monotonic()
        if now_s - self._parent_checked_s < PARENT_CHECK_S:
            return True
        self._parent_checked_s = now_s
        return self._parent_alive()

    def _parent_alive(self) -> bool:
        return os.getppid() == self.parent_pid
