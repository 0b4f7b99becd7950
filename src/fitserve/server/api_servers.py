"""Several HTTP API processes on one port and one engine core (--api-server-count N, as vLLM's).

With one engine core, one API process frames every SSE chunk of every stream in one interpreter;
at hundreds of streams that process, not the GPU, sets the pace (docs/engine_process.md). This
process (`fitserve serve`) then becomes a supervisor:

  1. it binds and listens on --host:--port itself, once;
  2. it starts the engine core (engine/core_group.py), which loads while the API processes answer;
  3. it spawns N API processes, each handed the one listening socket (inherited, as vLLM and
     uvicorn's --workers do), each running the whole FastAPI server of server/launcher.py
     (/health 503 `loading` until its CoreClient has the core's CoreReady) with its own
     sockets to the core; the kernel gives each new connection to whichever process accepts
     first, and a process that dies leaves the socket open in the others;
  4. then it closes its own copy of the socket (so that after the API processes stop accepting,
     connections are refused, not queued) and watches the children:
     - SIGTERM or SIGINT: forwarded as SIGTERM to every API process, which drains as one process
       does; when all have exited, the core gets Shutdown;
     - an API process dies: the core aborts that process's requests (ClientGone); the others'
       go on, and the others keep serving the port;
     - the core dies: every API process sees it (its pid) and answers 503 `failed`, as in one process;
     - this process dies: each API process drains and exits (it watches this one), the core exits.

Exit code: 2 when the core could not start for a setting (the API process 0 prints the message),
1 when a drain cut requests or an API process died, else 0.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from functools import partial
from types import FrameType
from typing import Any

from fitserve.config import ConfigError, EngineConfig, ServerConfig
from fitserve.engine.client import EngineClient
from fitserve.engine.core_client import connect_core_client
from fitserve.engine.core_group import CoreGroup, start_core_group
from fitserve.engine.core_process import CoreAddresses, CoreBuilder
from fitserve.engine.tokenizer import Tokenizer
from fitserve.server import launcher
from fitserve.server.lifecycle import Phase
from fitserve.telemetry import Telemetry
from fitserve.weights.source import resolve_model_source

logger = logging.getLogger(__name__)
LISTEN_BACKLOG = 2048  # uvicorn's default backlog
WATCH_INTERVAL_S = 0.5  # how often the supervisor looks at its signals while no child exits
EXIT_CONFIG_ERROR = 2  # as `fitserve serve` exits for a setting that cannot work
EXIT_FAILED = 1


@dataclass(frozen=True, slots=True)
class ApiServerOptions:
    """The `fitserve serve` flags an API process needs besides ServerConfig."""

    host: str
    port: int
    log_level: str = "info"
    telemetry_interval_s: float = 1.0  # --gpu-telemetry-interval (0: off)
    stats_interval_s: float | None = None  # the stats line every so often (API process 0 only); None: off


def model_tokenizer(config: EngineConfig) -> Tokenizer:
    """In each API process, while it waits for the core: the model's tokenizer."""
    return Tokenizer.from_source(resolve_model_source(config))


def listening_socket(host: str, port: int) -> socket.socket:
    """Bound and listening, inheritable by the API processes; port 0 takes a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ConfigError(f"Cannot listen on {host}:{port}: {error.strerror}.") from None
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def serve_api_servers(count: int, build: CoreBuilder, engine_config: Any, server_config: ServerConfig,
                      options: ApiServerOptions, tokenizer_for: Any = model_tokenizer,
                      sock: socket.socket | None = None) -> int:
    """Start the core and `count` API processes on one socket, supervise them until they exit (blocks).
    `build(config, progress)` runs in the core, `tokenizer_for(config)` in each API process
    (both pickled by name); `sock` a socket already listening (tests), else --host:--port is bound."""
    sock = sock or listening_socket(options.host, options.port)
    host, port = sock.getsockname()[:2]
    group = start_core_group(build, engine_config, count, max_queue_len=server_config.max_queue_len)
    context = multiprocessing.get_context("spawn")
    processes = []
    try:
        for index in range(count):
            process = context.Process(
                target=run_api_server, name=f"fitserve-api-{index}",
                args=(index, sock, group.addresses, group.process.pid, engine_config, server_config, options,
                      tokenizer_for))
            process.start()
            processes.append(process)
    except BaseException:
        for process in processes:
            process.kill()
        group.shutdown()
        raise
    finally:
        sock.close()  # the API processes hold it now; ours would keep queueing connections after they stop
    logger.info("%d API processes (pids %s) serve http://%s:%d; the engine core is process %d.", count,
                ", ".join(str(p.pid) for p in processes), host, port, group.process.pid)
    return Supervisor(processes, group).run()


class Supervisor:
    """Forwards shutdown signals to the API processes and reports a dead one to the core."""

    def __init__(self, processes: list[multiprocessing.process.BaseProcess], group: CoreGroup) -> None:
        self.processes = processes
        self.group = group
        self._signals: list[int] = []  # received, not yet forwarded
        self._stopping = False

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in launcher.SHUTDOWN_SIGNALS}
        try:
            exit_codes = self._watch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.group.shutdown()
        return _exit_code(exit_codes)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self._signals.append(sig)

    def _watch(self) -> dict[int, int]:
        live = {process.sentinel: index for index, process in enumerate(self.processes)}
        exit_codes: dict[int, int] = {}
        while live:
            ended = multiprocessing.connection.wait(list(live), timeout=WATCH_INTERVAL_S)
            self._forward_signals()
            for sentinel in ended:
                index = live.pop(sentinel)  # type: ignore[call-overload]
                process = self.processes[index]
                process.join()
                exit_codes[index] = process.exitcode if process.exitcode is not None else EXIT_FAILED
                if not self._stopping:
                    self._lost(index, exit_codes[index], len(live))
        return exit_codes

    def _forward_signals(self) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            # The first signal starts every API process's drain; a second SIGINT forces their exit, as
            # it does in one process.
            forwarded = signal.SIGINT if self._stopping and sig == signal.SIGINT else signal.SIGTERM
            if not self._stopping:
                logger.info("Received %s: the %d API processes drain, then the engine core stops.",
                            signal.Signals(sig).name, len(self.processes))
            self._stopping = True
            for process in self.processes:
                if process.is_alive() and process.pid is not None:
                    os.kill(process.pid, forwarded)

    def _lost(self, index: int, exit_code: int, num_left: int) -> None:
        """An API process ended on its own: the core aborts its requests; the others serve on."""
        self.group.client_gone(index)
        if exit_code != EXIT_CONFIG_ERROR:
            logger.error("API process %d exited with code %d; its requests were aborted, %d API process(es) "
                         "serve on.", index, exit_code, num_left)


def _exit_code(exit_codes: dict[int, int]) -> int:
    codes = set(exit_codes.values())
    if EXIT_CONFIG_ERROR in codes:
        return EXIT_CONFIG_ERROR
    return 0 if codes <= {0} else EXIT_FAILED


def _drain_when_the_supervisor_dies() -> None:
    """A killed supervisor must not leave API processes holding the port: each drains and exits."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        logger.warning("The supervisor process has gone; this API process drains and exits.")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="fitserve-supervisor-watch", daemon=True).start()


def run_api_server(index: int, sock: socket.socket, addresses: CoreAddresses, core_pid: int, engine_config: Any,
                   server_config: ServerConfig, options: ApiServerOptions, tokenizer_for: Any) -> None:
    """API process `index`'s main: the FastAPI server of one process on the shared socket, its engine a
    CoreClient of the shared core. Exits with the launcher's code (2 for a ConfigError of the core)."""
    logging.basicConfig(level=getattr(logging, options.log_level.upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)s %(name)s [api {index}]: %(message)s")
    _drain_when_the_supervisor_dies()
    telemetry = Telemetry(interval_s=options.telemetry_interval_s,
                          stats_interval_s=options.stats_interval_s if index == 0 else None)

    def load_engine(report_phase: Any) -> EngineClient:
        report_phase(Phase.LOADING)
        client = connect_core_client(addresses, index, core_pid, partial(tokenizer_for, engine_config),
                                     max_queue_len=server_config.max_queue_len)
        telemetry.start(client.stats, client.gpu_ids)
        return client

    try:
        code = launcher.serve(server_config, options.host, options.port, load_engine, log_level=options.log_level,
                              telemetry=telemetry, sockets=[sock])
    except ConfigError as error:
        if index == 0:  # every API process hears it from the core; one says it
            print(f"fitserve: {error}", file=sys.stderr)
        code = EXIT_CONFIG_ERROR
    except Exception:  # noqa: BLE001 - the core failed to start: logged once, the supervisor exits 1
        if index == 0:
            logger.exception("The server could not start.")
        code = EXIT_FAILED
    finally:
        telemetry.stop()
    sys.exit(code)
