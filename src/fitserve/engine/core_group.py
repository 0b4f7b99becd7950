"""One engine core for several API processes (--api-server-count): the starting process's handle.

The process that starts the API processes (server/api_servers.py) starts the core first with
`start_core_group`: every address lives in one private folder, API process i binds the i-th
request and output sockets (engine/core_client.connect_core_client) and the core connects to all
of them, so the core can start before, during or after the API processes. This process keeps a
socket of its own to the core, for the two messages only it sends: ClientGone (an API process
died: the core aborts its requests) and Shutdown (after every API process has drained).
It does not wait for the core to be ready; the API processes do, each answering /health 503
`loading` meanwhile.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import shutil
import tempfile
from typing import Any

import zmq

from fitserve.engine.core_client import SHUTDOWN_TIMEOUT_S, core_process, end_if_alive
from fitserve.engine.core_messages import ClientGone, Shutdown, to_core_codec
from fitserve.engine.core_process import CoreAddresses, CoreBuilder

logger = logging.getLogger(__name__)


class CoreGroup:
    """The core process, the addresses of its `num_clients` API processes, and this process's socket to it."""

    def __init__(self, process: multiprocessing.process.BaseProcess, addresses: CoreAddresses, context: zmq.Context,
                 control: zmq.Socket, socket_dir: str) -> None:
        self.process = process
        self.addresses = addresses  # to_core[i] / from_core[i]: API process i's; to_core[-1]: this process's
        self._context = context
        self._control = control
        self._encoder, _ = to_core_codec()
        self._socket_dir = socket_dir
        self._stopped = False

    @property
    def num_clients(self) -> int:
        return len(self.addresses.from_core)

    def client_gone(self, client_index: int) -> None:
        """API process `client_index` died: the core aborts its requests (the others' go on)."""
        if not self._stopped:
            self._send(ClientGone(client_index))

    def _send(self, message: ClientGone | Shutdown) -> None:
        try:  # a send without a peer (the core has gone) would block: then there is nobody to tell
            self._control.send(self._encoder.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Stop the core (Shutdown, then terminated if it is still loading or stuck); idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.process.is_alive():
            self._send(Shutdown())
            self.process.join(timeout_s)
        end_if_alive(self.process)
        self._control.close(linger=0)
        self._context.term()
        shutil.rmtree(self._socket_dir, ignore_errors=True)


def group_addresses(socket_dir: str, num_clients: int) -> CoreAddresses:
    """API process i's request and output sockets, then this process's control socket last in to_core."""
    return CoreAddresses(
        to_core=(*(f"ipc://{socket_dir}/to_core_{i}" for i in range(num_clients)), f"ipc://{socket_dir}/control"),
        from_core=tuple(f"ipc://{socket_dir}/from_core_{i}" for i in range(num_clients)))


def start_core_group(build: CoreBuilder, config: Any, num_clients: int, *, max_queue_len: int | None) -> CoreGroup:
    """Start the core for `num_clients` API processes; returns at once (the core loads meanwhile).
    `max_queue_len` bounds the requests of all API processes together (the core counts them)."""
    socket_dir = tempfile.mkdtemp(prefix="fitserve-core-")
    atexit.register(shutil.rmtree, socket_dir, ignore_errors=True)
    addresses = group_addresses(socket_dir, num_clients)
    context = zmq.Context()
    control = context.socket(zmq.PUSH)
    control.setsockopt(zmq.SNDHWM, 0)
    control.bind(addresses.to_core[-1])
    process = core_process(build, config, addresses, max_queue_len)
    process.start()
    atexit.register(end_if_alive, process)
    logger.info("The engine core runs in process %d, for %d API processes.", process.pid, num_clients)
    return CoreGroup(process, addresses, context, control, socket_dir)
