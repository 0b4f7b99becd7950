"""uvicorn's HTTP protocols (httptools, h11) with deadlines for slow clients and a connection cap.

uvicorn (0.55) closes a kept-alive connection that stays idle (`timeout_keep_alive`), but a
connection that never sends a request, drips its headers a byte at a time, or stops halfway
through its body stays open for ever, each holding a file descriptor. Here:

- headers: from the connection (or the first byte of the next request on a kept-alive one)
  to the end of the headers, at most `timeout_header_s`;
- body: from the end of the headers to the end of the body, at most `timeout_body_s`;
- connections: past `max_connections` open ones, a new connection gets 503 and is closed.

A connection past a deadline is closed (the handler waiting for its body sees a
disconnect). Settings travel in `GuardedConfig`, the uvicorn config the protocol is built with.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

try:  # uvicorn's faster parser, used when installed (its "auto")
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - depends on the environment
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)
FD_RESERVE = 64  # descriptors kept for the engine, logs, model files and the listening socket
TOO_MANY_CONNECTIONS = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
                        b"retry-after: 1\r\nconnection: close\r\ncontent-length: 21\r\n\r\nToo many connections.")


def connection_cap(max_connections: int) -> int:
    """`max_connections`, lowered so that the open-file limit still leaves FD_RESERVE free."""
    soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_limit == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, soft_limit - FD_RESERVE))


class GuardedConfig(uvicorn.Config):
    """uvicorn's config plus the guard's settings (read by the guarded protocols); the protocol is
    httptools' when it is installed (uvicorn's own choice), else h11's."""

    def __init__(self, app: Any, *, timeout_header_s: float, timeout_body_s: float, max_connections: int,
                 protocol: type[asyncio.Protocol] | None = None, **kwargs: Any) -> None:
        super().__init__(app, http=protocol or default_protocol(), **kwargs)
        self.timeout_header_s = timeout_header_s
        self.timeout_body_s = timeout_body_s
        self.max_connections = max_connections


class _Deadlines:
    """The guard's part of a protocol: the connection cap and one deadline at a time."""

    guard_config: GuardedConfig
    deadline: asyncio.TimerHandle | None = None
    deadline_for: str | None = None  # "headers" or "body"
    connections: set[Any]
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    client: tuple[str, int] | None

    def __init__(self, config: GuardedConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]  (the uvicorn protocol's)
        self.guard_config = config

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if not self._over_cap(transport):
            self._on_connected()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _on_connected(self) -> None:
        """The first deadline of a connection under the cap (each protocol knows its parser's state)."""
        raise NotImplementedError

    def _over_cap(self, transport: asyncio.Transport) -> bool:
        """Past max_connections (this one counted): answer 503, close, True."""
        if len(self.connections) <= self.guard_config.max_connections:
            return False
        logger.warning("Refused a connection from %s: %d open (--max-connections).",
                       self.client[0] if self.client else "-", len(self.connections) - 1)
        transport.write(TOO_MANY_CONNECTIONS)
        transport.close()
        return True

    def _arm(self, what: str) -> None:
        if self.deadline is not None and self.deadline_for == what:
            return  # the deadline runs from the first byte, not the last: a drip does not extend it
        self._disarm()
        seconds = self.guard_config.timeout_header_s if what == "headers" else self.guard_config.timeout_body_s
        self.deadline_for = what
        self.deadline = self.loop.call_later(seconds, self._expire, what, seconds)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        self.deadline, self.deadline_for = None, None

    def _expire(self, what: str, seconds: float) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        logger.info("Closed a connection from %s: its request %s did not arrive within %g s.",
                    self.client[0] if self.client else "-", what, seconds)
        self.transport.close()


class GuardedH11Protocol(_Deadlines, H11Protocol):
    def _on_connected(self) -> None:
        self._arm_for_state()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._arm_for_state()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # arms uvicorn's keep-alive timer, may start the next cycle
        self._arm_for_state()

    def _arm_for_state(self) -> None:
        """What the peer owes now: headers (IDLE on a fresh connection or with bytes buffered) or
        the rest of a body (SEND_BODY). Nothing while we answer or wait idle (keep-alive's job)."""
        state = self.conn.their_state
        if state is h11.IDLE and (self.cycle is None or self.conn.trailing_data[0]):
            self._arm("headers")
        elif state is h11.SEND_BODY:
            self._arm("body")
        else:
            self._disarm()


if HttpToolsProtocol is not None:  # without httptools (plain `uvicorn`) only the h11 protocol exists
    class GuardedHttpToolsProtocol(_Deadlines, HttpToolsProtocol):
        """httptools calls back at each step of a request: begin (first byte), headers done, body done."""

        def _on_connected(self) -> None:
            self._arm("headers")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm("headers")

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._arm("body")

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._disarm()


def default_protocol() -> type[asyncio.Protocol]:
    """httptools' protocol when it is installed (uvicorn's own choice), else h11's."""
    return GuardedHttpToolsProtocol if HttpToolsProtocol is not None else GuardedH11Protocol
