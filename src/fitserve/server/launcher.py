"""Run the HTTP server around an engine that loads while the server already answers.

Order of events in `serve`:
  1. the HTTP server binds and answers: /health 503 `{"phase": "starting" | "loading" ...}`;
  2. a daemon thread builds the engine (`load_engine`), reporting phases as it goes;
  3. the engine is attached: /health 200, /v1/* serves;
  4. on SIGTERM or SIGINT: stop accepting connections, let the requests in flight finish for
     up to `shutdown_timeout_s`, then cut what is left (a stream ends with an OpenAI error event
     and `[DONE]`, one log line per request, server/middleware.py's ShutdownCutMiddleware), stop
     the engine; return 0, or EXIT_REQUESTS_CUT when requests were cut. A second SIGINT forces
     the exit at once.
Connections are guarded against slow and idle clients (server/connection_guard.py).
A failed load stops the server and re-raises the error (the CLI turns a ConfigError into
exit code 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn

from fitserve.config import ServerConfig
from fitserve.engine.client import EngineClient
from fitserve.server.app import attach_engine, build_app
from fitserve.server.connection_guard import GuardedConfig, connection_cap
from fitserve.server.lifecycle import Phase, ServerLifecycle
from fitserve.telemetry import Telemetry

logger = logging.getLogger(__name__)
SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# `load_engine(report_phase)` builds and starts the engine; it calls report_phase(Phase...) as it goes.
EngineLoader = Callable[[Callable[[Phase], None]], EngineClient]
EXIT_REQUESTS_CUT = 1  # the shutdown cut requests that were still running: a supervisor should know
CUT_FLUSH_TIMEOUT_S = 2.0  # after uvicorn cancels them, how long cut requests get to send their ending


class DrainingServer(uvicorn.Server):
    """uvicorn's server with fitserve's signal handling.

    uvicorn already stops accepting and waits for open connections (up to
    `timeout_graceful_shutdown`, then cancels their tasks, which aborts their engine
    requests). Two changes: the lifecycle turns to `draining` first, and the signal is not
    re-raised after the drain (uvicorn does, which would end the process with 128 + signal
    instead of 0).
    """

    def __init__(self, config: uvicorn.Config, lifecycle: ServerLifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach only the main thread; whoever runs us there handles them
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in SHUTDOWN_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            self.lifecycle.begin_draining()
            engine = self.lifecycle.engine
            in_flight = engine.num_requests_in_flight if engine is not None else 0
            logger.info("Received %s: accepting no new requests; draining %s in flight (up to %g s).",
                        signal.Signals(sig).name, in_flight, self.config.timeout_graceful_shutdown or 0)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: Any = None) -> None:
        await super().shutdown(sockets)  # past the timeout it cancels the request tasks left
        pending = set(self.server_state.tasks)
        if pending:  # let the cancelled ones write their error event and [DONE] before the loop stops
            await asyncio.wait(pending, timeout=CUT_FLUSH_TIMEOUT_S)


def build_server(app: Any, host: str, port: int, lifecycle: ServerLifecycle, config: ServerConfig,
                 log_level: str = "info") -> DrainingServer:
    # access_log off: fitserve's own access line (fitserve.access) carries the request id.
    max_connections = connection_cap(config.max_connections)
    if max_connections < config.max_connections:
        logger.info("Accepting at most %d connections (--max-connections %d, lowered under the open-file limit).",
                    max_connections, config.max_connections)
    uvicorn_config = GuardedConfig(
        app, host=host, port=port, log_level=log_level, access_log=False, lifespan="off",
        timeout_graceful_shutdown=config.shutdown_timeout_s, timeout_keep_alive=config.timeout_keep_alive_s,
        timeout_header_s=config.timeout_header_s, timeout_body_s=config.timeout_body_s,
        max_connections=max_connections)
    return DrainingServer(uvicorn_config, lifecycle)


def serve(config: ServerConfig, host: str, port: int, load_engine: EngineLoader, log_level: str = "info",
          telemetry: Telemetry | None = None, sockets: list[socket.socket] | None = None) -> int:
    """Serve until SIGTERM/SIGINT (blocks); returns the exit code. See the module docstring.

    `telemetry` (started by `load_engine` once the GPUs are known) is shown on /metrics. `sockets`:
    listening sockets already bound (one shared by several API processes, server/api_servers.py)
    instead of binding `host`:`port`."""
    lifecycle = ServerLifecycle()
    app = build_app(config=config, lifecycle=lifecycle)
    app.state.telemetry = telemetry  # fitserve:gpu_* on /metrics (server/metrics.py)
    server = build_server(app, host, port, lifecycle, config, log_level)
    if not config.api_keys and host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("Listening on %s without --api-key: anyone who can reach this port can use it.", host)
    return asyncio.run(_serve(server, app, lifecycle, load_engine, sockets))


async def _serve(server: DrainingServer, app: Any, lifecycle: ServerLifecycle, load_engine: EngineLoader,
                 sockets: list[socket.socket] | None = None) -> int:
    server_task = asyncio.create_task(server.serve(sockets=sockets))
    loading = _run_in_daemon_thread(load_engine, lambda phase: lifecycle.set_phase(phase))
    engine: EngineClient | None = None
    try:
        await asyncio.wait({server_task, loading}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            if loading.exception() is not None:
                lifecycle.fail()
                server.should_exit = True
                await server_task
                raise loading.exception()  # type: ignore[misc]
            engine = loading.result()
            attach_engine(app, engine)
            logger.info("Ready: /health answers 200.")
        await server_task
    finally:
        if engine is not None:
            engine.shutdown()
    num_cut = len(app.state.shutdown_cuts.request_ids)
    if num_cut:
        logger.error("Shutdown cut %d request(s) still running after --shutdown-timeout; exiting with %d.",
                     num_cut, EXIT_REQUESTS_CUT)
        return EXIT_REQUESTS_CUT
    return 0


def _run_in_daemon_thread(fn: EngineLoader, report_phase: Callable[[Phase], None]) -> asyncio.Future[EngineClient]:
    """Run fn in a daemon thread (a SIGTERM during loading must not wait for it to finish)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[EngineClient] = loop.create_future()

    def settle(result: EngineClient | None, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result, error = None, None
        try:
            result = fn(report_phase)
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop, which re-raises it
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the server stopped (SIGTERM while loading) and its loop closed
            pass

    threading.Thread(target=run, name="fitserve-load", daemon=True).start()
    return future
