"""One Ray Serve replica: its own engine and the unchanged fitserve FastAPI app.

Ray Serve's HTTP proxy hands each request's ASGI scope to a replica, which runs the app that
`fitserve serve` runs (server/app.py), so chat, completions, SSE streaming, models, health,
metrics, the page and every error answer the same. The only addition is the `x-fitserve-replica`
header on every answer, which names the replica that served it.

Ray Serve calls `check_health` every few seconds; a replica whose engine loop died fails it and
is replaced. When a replica stops (scale-down, `serve delete`, shutdown), Ray stops routing to it
and waits up to `graceful_shutdown_timeout_s` for its requests before `__del__` stops the engine.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from fitserve.config import EngineConfig, ServerConfig
from fitserve.scaleout.options import REPLICA_HEADER

logger = logging.getLogger(__name__)


class ReplicaHeader:
    """ASGI middleware: adds `x-fitserve-replica: <name>` to every HTTP answer, streamed or not.

    The proxy's error middleware (proxy.py) also reads it: an answer without it came from Ray."""

    def __init__(self, app: Any, replica_name: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica_name.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                # Ray's proxy adds x-request-id itself, with the id it handed to the app: one copy is enough.
                headers = [(n, v) for n, v in message.get("headers", []) if n.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


def start_engine(engine_config: EngineConfig, server_config: ServerConfig,
                 telemetry_interval_s: float, log_stats: bool) -> tuple[Any, Any]:
    """Build and start this replica's engine on `fitserve serve`'s start-up path (startup.py);
    returns (engine, telemetry)."""
    from fitserve.startup import start_serving_engine
    from fitserve.telemetry import Telemetry
    from fitserve.telemetry.monitor import STATS_INTERVAL_S

    telemetry = Telemetry(interval_s=telemetry_interval_s, stats_interval_s=STATS_INTERVAL_S if log_stats else None)
    # server_config.max_queue_len is not applied here: Ray sends a replica at most max_ongoing_requests
    # (= max_num_seqs by default) and --max-queue-len bounds Ray's router queue instead (options.py); the
    # engine keeps its default bound (8 x max_num_seqs), which Ray's routing never reaches.
    engine = start_serving_engine(engine_config, telemetry, max_queue_len=None, progress=False)
    return engine, telemetry


@serve.ingress()
class FitserveReplica:
    """The deployment class; `launch.build_application` binds it with the configs."""

    async def __init__(self, engine_config: EngineConfig, server_config: ServerConfig,
                   telemetry_interval_s: float = 1.0, log_stats: bool = True) -> None:
        from fitserve.server.app import build_app

        self.replica_name = serve.get_replica_context().replica_id.unique_id
        # Loading takes seconds to minutes: off the replica's event loop, so Ray's calls are answered.
        self.engine, self.telemetry = await asyncio.to_thread(
            start_engine, engine_config, server_config, telemetry_interval_s, log_stats)
        app = build_app(self.engine, config=server_config)
        app.state.telemetry = self.telemetry
        self.asgi_app = ReplicaHeader(app, self.replica_name)
        logger.info("Replica %s ready: %s.", self.replica_name, self.engine.model_name)

    def __serve_build_asgi_app__(self) -> Any:
        return self.asgi_app

    def check_health(self) -> None:
        if not self.engine.is_healthy():
            raise RuntimeError(f"replica {self.replica_name}: the engine loop has stopped")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        telemetry = getattr(self, "telemetry", None)
        if telemetry is not None:
            telemetry.stop()
