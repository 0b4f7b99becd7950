"""Where the server is in its life: starting, loading, ready, draining or failed.

`fitserve serve` brings the HTTP server up before the engine, so that load balancers and
orchestrators see a live process that answers /health 503 naming its phase while weights
load, and 200 once it can serve. The phase is written by the start-up thread and the
signal handler and read by request handlers: one attribute, replaced whole.
"""

from __future__ import annotations

import enum

from fitserve.engine.client import EngineClient


class Phase(str, enum.Enum):
    STARTING = "starting"  # the HTTP server is up; the engine is not being built yet
    LOADING = "loading"  # reading the weights
    PROFILING = "profiling"  # measuring the peak memory that sizes the KV cache
    CAPTURING_GRAPHS = "capturing_graphs"  # recording CUDA graphs of decode steps
    READY = "ready"
    DRAINING = "draining"  # after SIGTERM: finishing requests in flight, accepting none
    FAILED = "failed"  # the engine failed to start, or its loop died


STARTUP_PHASES = (Phase.STARTING, Phase.LOADING, Phase.PROFILING, Phase.CAPTURING_GRAPHS)

PHASE_MESSAGES = {
    Phase.STARTING: "The server is starting.",
    Phase.LOADING: "The server is starting: it is loading the model weights.",
    Phase.PROFILING: "The server is starting: it is measuring memory to size the KV cache.",
    Phase.CAPTURING_GRAPHS: "The server is starting: it is capturing CUDA graphs.",
    Phase.READY: "The server is ready.",
    Phase.DRAINING: "The server is shutting down: it finishes the requests in flight and accepts no new ones.",
    Phase.FAILED: "The engine has failed; the server cannot serve requests (see the server log).",
}


class ServerLifecycle:
    def __init__(self) -> None:
        self._phase = Phase.STARTING
        self._engine: EngineClient | None = None

    @property
    def engine(self) -> EngineClient | None:
        return self._engine

    @property
    def phase(self) -> Phase:
        phase = self._phase
        if phase in (Phase.READY, Phase.DRAINING) and self._engine is not None and not _healthy(self._engine):
            return Phase.FAILED
        return phase

    @property
    def message(self) -> str:
        return PHASE_MESSAGES[self.phase]

    def set_phase(self, phase: Phase | str) -> None:
        """Report start-up progress (from any thread); ignored once the server is draining or failed."""
        if self._phase not in (Phase.DRAINING, Phase.FAILED):
            self._phase = Phase(phase)

    def attach(self, engine: EngineClient) -> None:
        self._engine = engine
        self.set_phase(Phase.READY)

    def fail(self) -> None:
        self._phase = Phase.FAILED

    def begin_draining(self) -> None:
        if self._phase != Phase.FAILED:
            self._phase = Phase.DRAINING


def _healthy(engine: EngineClient) -> bool:
    try:
        return bool(engine.is_healthy())
    except Exception:  # noqa: BLE001 - a health check that cannot answer means unhealthy
        return False
