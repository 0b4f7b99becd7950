"""The EngineClient of an engine core in its own process (engine/core_process.py), over ZeroMQ.

The API process keeps FastAPI, tokenization, chat templates and SSE framing; the core process
keeps the scheduler, the KV cache, the runner and (for now) detokenization with stop strings,
which LLMEngine still does inside its step (docs/engine_process.md says why and what moving it
would take). Requests and aborts go to the core on a PUSH socket; one thread here reads the
core's step messages and hands each request's outputs to its asyncio stream, as AsyncEngine's
engine thread does, and watches the process: if it dies, /health turns 503 and every request
in flight ends with EngineDeadError (an OpenAI error), never a hang.

With one API process (`start_core_client`) that process starts the core and owns it; with several
(--api-server-count, server/api_servers.py) the process that started them owns the core
(engine/core_group.py) and each API process attaches to it with `connect_core_client`, watching
the core by its pid.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

import zmq

from fitserve.config import ConfigError
from fitserve.core.engine_stats import EngineStats
from fitserve.engine.async_engine import (
    DEFAULT_MAX_QUEUE_LEN_PER_SEQ,
    RequestStream,
    check_capacity,
    deliver_to_streams,
    fail_streams,
)
from fitserve.engine.client import ServingTokenizer
from fitserve.engine.core_messages import (
    AbortRequests,
    AddRequest,
    CoreFailed,
    CoreReady,
    RequestFailed,
    Shutdown,
    StepOutputs,
    from_core_codec,
    to_core_codec,
)
from fitserve.engine.core_process import CoreAddresses, CoreBuilder, run_core
from fitserve.engine.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError
from fitserve.engine.outputs import RequestOutput
from fitserve.engine.request_limits import check_request
from fitserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
WATCH_INTERVAL_S = 0.2  # how often the reader thread, with no message, checks that the core lives
SHUTDOWN_TIMEOUT_S = 10.0  # how long the core gets to stop after Shutdown before it is killed
DEAD_MESSAGE = "The engine process has stopped; the server cannot run requests (see the server log)."
END_TIMEOUT_S = 5.0  # at exit, how long a terminated core gets before it is killed


class CoreProcess(Protocol):
    """What a client watches of the core: a multiprocessing Process it started, or a PidWatch."""

    pid: int | None

    @property
    def exitcode(self) -> int | None: ...

    def is_alive(self) -> bool: ...


class PidWatch:
    """The core as an API process among several sees it: a pid it did not start (so it cannot join it);
    alive while the kernel lists it and it is no zombie."""

    def __init__(self, pid: int) -> None:
        self.pid: int | None = pid
        self.exitcode: int | None = None  # not ours to reap: unknown

    def is_alive(self) -> bool:
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except FileNotFoundError:
            return False
        except OSError:  # no /proc (not Linux): a signal 0 tells whether the pid exists
            try:
                os.kill(self.pid or 0, 0)
            except ProcessLookupError:
                return False
            return True
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # the state, after the command name


class CoreClient:
    """EngineClient (engine/client.py) of a started core; `start_core_client` makes one."""

    def __init__(self, process: CoreProcess, context: zmq.Context, to_core: zmq.Socket,
                 from_core: zmq.Socket, ready: CoreReady, tokenizer: ServingTokenizer, max_queue_len: int | None,
                 socket_dir: str | None, client_index: int = 0) -> None:
        """`socket_dir` None: the core is not ours (several API processes): shutdown leaves it running."""
        self.model_name = ready.model_name
        self.max_model_len = ready.max_model_len
        self.max_logprobs = ready.max_logprobs
        self.default_sampling_params = dict(ready.default_sampling_params)
        self.startup_info = ready.startup_info
        self.gpu_ids = list(ready.gpu_ids)
        self.max_queue_len = DEFAULT_MAX_QUEUE_LEN_PER_SEQ * ready.max_num_seqs if max_queue_len is None else max_queue_len
        self.max_num_in_flight: int | None = ready.max_num_seqs + self.max_queue_len
        self._limits = ready.request_limits
        self._tokenizer = tokenizer
        self._stats = ready.stats
        self._process = process
        self._context = context
        self._to_core, self._from_core = to_core, from_core
        self._send_lock = threading.Lock()  # zmq sockets are not thread-safe; the event loop and shutdown send
        self._encoder, _ = to_core_codec()
        self._socket_dir = socket_dir
        self._owns_core = socket_dir is not None
        self.client_index = client_index
        self._streams: dict[str, RequestStream] = {}
        self._dead_message: str | None = None
        self._stopping = False
        self._reader = threading.Thread(target=self._read_loop, name="fitserve-core-reader", daemon=True)

    @property
    def tokenizer(self) -> ServingTokenizer:
        return self._tokenizer

    @property
    def num_requests_in_flight(self) -> int:
        return len(self._streams)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def is_healthy(self) -> bool:
        return self._dead_message is None and self._process.is_alive()

    def stats(self) -> EngineStats:
        """The core's latest stats (sent with its step messages, and whenever it goes idle)."""
        return self._stats

    # -- requests ----------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       sampling_params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if not self.is_healthy():
            raise EngineDeadError(DEAD_MESSAGE)
        check_request(prompt_token_ids, sampling_params, self._limits)  # the core checks again, with grammars
        if request_id in self._streams:
            raise ValueError(f"request id {request_id} is already in use")
        check_capacity(len(self._streams), self.max_num_in_flight, self.max_queue_len)
        stream = RequestStream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        self._send(AddRequest(request_id, list(prompt_token_ids), sampling_params, time.monotonic(),
                              self.client_index))
        try:
            if self._dead_message is not None:  # the core died between the check above and here
                raise EngineDeadError(DEAD_MESSAGE)
            async for output in stream.outputs():
                yield output
        finally:  # on a normal end, an error, or the consumer closing us early (client disconnect)
            self._streams.pop(request_id, None)
            if not stream.finished:
                self._send(AbortRequests([request_id]))

    async def abort(self, request_id: str) -> None:
        self._send(AbortRequests([request_id]))

    def _send(self, message: AddRequest | AbortRequests | Shutdown) -> None:
        if self._dead_message is not None or self._stopping:
            return  # nobody reads: the streams have been failed, or the sockets are closing
        with self._send_lock:
            self._to_core.send(self._encoder.encode(message))

    # -- the reader thread -------------------------------------------------------------------

    def start(self) -> CoreClient:
        self._reader.start()
        return self

    def _read_loop(self) -> None:
        try:
            self._read_until_stopped()
        except Exception:  # noqa: BLE001 - without its reader the server would hang: fail loudly instead
            logger.exception("Reading the engine process's messages failed.")
            self._die("The link to the engine process failed.")

    def _read_until_stopped(self) -> None:
        _, decoder = from_core_codec()
        while not self._stopping:
            if not self._from_core.poll(int(WATCH_INTERVAL_S * 1000)):
                if not self._process.is_alive() and not self._stopping:
                    self._die(f"The engine process exited with code {self._process.exitcode}.")
                    return
                continue
            message = decoder.decode(self._from_core.recv())
            if isinstance(message, StepOutputs):
                if message.stats is not None:
                    self._stats = message.stats
                if message.outputs:
                    deliver_to_streams(self._streams, message.outputs)
            elif isinstance(message, RequestFailed):
                stream = self._streams.get(message.request_id)
                if stream is not None:
                    fail_streams({message.request_id: stream}, _request_error(message))
            elif isinstance(message, CoreFailed):
                self._die(f"The engine loop failed: {message.message}")
                return

    def _die(self, reason: str) -> None:
        self._dead_message = reason  # first: a request that generate() adds from now on sees it
        logger.error("%s Failing %d request(s) in flight.", reason, len(self._streams))
        fail_streams(self._streams, EngineDeadError("The engine failed while running this request."))

    # -- shutdown ------------------------------------------------------------------------------

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Tell the core to stop, wait for it, kill it if it does not; idempotent."""
        if self._stopping:
            return
        self._stopping = True
        if self._owns_core and self._process.is_alive():
            with self._send_lock:
                self._to_core.send(self._encoder.encode(Shutdown()))
            _join_or_kill(self._process, timeout_s)  # type: ignore[arg-type]
        if self._reader.is_alive() and self._reader is not threading.current_thread():
            self._reader.join()
        _close(self._context, self._to_core, self._from_core)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)


def _join_or_kill(process: multiprocessing.process.BaseProcess, timeout_s: float) -> None:
    process.join(timeout_s)
    if process.is_alive():
        logger.warning("The engine process did not stop within %g s; killing it.", timeout_s)
        process.kill()
        process.join()


def end_if_alive(process: multiprocessing.process.BaseProcess) -> None:
    """At exit: a core still running (its server stopped while it loaded) is terminated, then joined.
    The core is not a daemon process (it may start tensor-parallel workers, which a daemon may not),
    so multiprocessing's own exit handler would only wait for it; this one, registered later, runs first."""
    if process.is_alive():
        process.terminate()
        _join_or_kill(process, END_TIMEOUT_S)


def _request_error(message: RequestFailed) -> Exception:
    if message.internal:  # logged in the core; the HTTP layer answers 500 without the text
        return RuntimeError(f"The engine could not start request {message.request_id}.")
    if message.overloaded:
        return EngineOverloadedError(message.message)
    return InvalidRequestError(message.message, message.param)


def _close(context: zmq.Context, *sockets: zmq.Socket) -> None:
    for sock in sockets:
        sock.close(linger=0)
    context.term()


def start_core_client(build: CoreBuilder, config: Any, tokenizer_for: Callable[[], ServingTokenizer],
                      *, max_queue_len: int | None) -> CoreClient:
    """Start the core process (spawn), wait until it has built the engine, and return its client.

    `build(config, progress)` runs in the core; `tokenizer_for()` here, while the core builds
    (_ready_and_tokenizer). A ConfigError in the core is raised here as a ConfigError (exit code 2);
    any other start-up failure as RuntimeError."""
    socket_dir = tempfile.mkdtemp(prefix="fitserve-core-")
    atexit.register(shutil.rmtree, socket_dir, ignore_errors=True)  # also when we exit while the core loads
    addresses = CoreAddresses((f"ipc://{socket_dir}/to_core",), (f"ipc://{socket_dir}/from_core",))
    context, to_core, from_core = bind_client_sockets(addresses.to_core[0], addresses.from_core[0])
    process = core_process(build, config, addresses, max_queue_len)
    try:
        process.start()
        atexit.register(end_if_alive, process)
        ready, tokenizer = _ready_and_tokenizer(process, from_core, tokenizer_for)
    except BaseException:
        if process.is_alive():
            process.kill()
            process.join()
        _close(context, to_core, from_core)
        shutil.rmtree(socket_dir, ignore_errors=True)
        raise
    logger.info("The engine core runs in process %d; this process serves HTTP.", process.pid)
    return CoreClient(process, context, to_core, from_core, ready, tokenizer, max_queue_len, socket_dir).start()


def core_process(build: CoreBuilder, config: Any, addresses: CoreAddresses,
                 max_queue_len: int | None) -> multiprocessing.process.BaseProcess:
    """The core's process, not started: spawned (CUDA cannot be used in a forked child), not a daemon."""
    return multiprocessing.get_context("spawn").Process(
        target=run_core, name="fitserve-engine-core",
        args=(build, config, addresses, logging.getLogger().getEffectiveLevel(), os.getpid(), max_queue_len))


def bind_client_sockets(to_core_address: str, from_core_address: str) -> tuple[zmq.Context, zmq.Socket, zmq.Socket]:
    """An API process's two sockets, bound: it sends requests on the first and reads outputs on the second."""
    context = zmq.Context()
    to_core = context.socket(zmq.PUSH)
    to_core.setsockopt(zmq.SNDHWM, 0)  # the event loop never waits to hand over a request
    to_core.bind(to_core_address)
    from_core = context.socket(zmq.PULL)
    from_core.setsockopt(zmq.RCVHWM, 0)
    from_core.bind(from_core_address)
    return context, to_core, from_core


def connect_core_client(addresses: CoreAddresses, client_index: int, core_pid: int,
                        tokenizer_for: Callable[[], ServingTokenizer], *,
                        max_queue_len: int | None) -> CoreClient:
    """In API process `client_index` of several: bind this process's sockets (`addresses` of
    engine/core_group.py), wait for the core's CoreReady, and return its client. The core belongs
    to the process that started it: this client's shutdown leaves it running."""
    context, to_core, from_core = bind_client_sockets(addresses.to_core[client_index],
                                                      addresses.from_core[client_index])
    watch = PidWatch(core_pid)
    try:
        ready, tokenizer = _ready_and_tokenizer(watch, from_core, tokenizer_for)
    except BaseException:
        _close(context, to_core, from_core)
        raise
    return CoreClient(watch, context, to_core, from_core, ready, tokenizer, max_queue_len, None, client_index).start()


def _ready_and_tokenizer(process: CoreProcess, from_core: zmq.Socket,
                         tokenizer_for: Callable[[], ServingTokenizer]) -> tuple[CoreReady, ServingTokenizer]:
    """The core's CoreReady, and the tokenizer loaded in a thread meanwhile: on the CPU the embedded
    model's tokenizer takes about 3 s (its GGUF's metadata), which /health waited for after the core
    was ready. A hub model's files may then be fetched by both processes at once; huggingface_hub's
    file locks let one download and the other wait. The core's failure is raised first."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fitserve-tokenizer") as pool:
        tokenizer = pool.submit(tokenizer_for)
        ready = _wait_for_ready(process, from_core)
        return ready, tokenizer.result()


def _wait_for_ready(process: CoreProcess, from_core: zmq.Socket) -> CoreReady:
    _, decoder = from_core_codec()
    while not from_core.poll(int(WATCH_INTERVAL_S * 1000)):
        if not process.is_alive():
            raise RuntimeError(f"The engine process exited with code {process.exitcode} before it was ready "
                               "(see the log above).")
    message = decoder.decode(from_core.recv())
    if isinstance(message, CoreFailed):
        join = getattr(process, "join", None)
        if join is not None:
            join()
        if message.config_error:
            raise ConfigError(message.message)
        raise RuntimeError(f"The engine process failed to start: {message.message}")
    if not isinstance(message, CoreReady):
        raise RuntimeError(f"The engine process sent {type(message).__name__} before it was ready.")
    return message
