"""The telemetry thread: once a tick, sample the GPUs in use and let the monitor judge them.

`Telemetry(...).start(get_stats, gpu_ids)` after the engine has loaded (its GPUs are known
then); `snapshot()` from /metrics; `stop()` at shutdown. Without GPUs in use, without the
nvidia-ml-py package or without a driver, nothing is sampled and the thread only writes the
stats line. A failing tick is logged once and the thread goes on: telemetry never stops
serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from fitserve.core.engine_stats import EngineStats
from fitserve.telemetry.monitor import STATS_INTERVAL_S, LoadMonitor
from fitserve.telemetry.nvml import GpuDevice, NvmlLike, load_nvml, select_devices
from fitserve.telemetry.sampler import GpuSampler, GpuSnapshot

logger = logging.getLogger("fitserve.telemetry")

DEFAULT_INTERVAL_S = 1.0   # the "about once a second"; NVML's power reading is itself a ~1 s average
STOP_TIMEOUT_S = 5.0
READINGS = ("power", "power_limit", "energy", "temperature", "sm_clock", "memory_clock", "utilization",
            "memory", "throttle_reasons", "max_sm_clock", "slowdown_temperature")

StatsGetter = Callable[[], EngineStats]


class Telemetry:
    def __init__(self, nvml_loader: Callable[[], NvmlLike | None] = load_nvml,
                 interval_s: float = DEFAULT_INTERVAL_S, stats_interval_s: float | None = STATS_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`interval_s` 0 samples no GPU; `stats_interval_s` None writes no stats line."""
        self.nvml_loader = nvml_loader
        self.interval_s = interval_s
        self.clock = clock
        self.monitor = LoadMonitor(stats_interval_s) if stats_interval_s else None
        self.sampler: GpuSampler | None = None
        self._nvml: NvmlLike | None = None
        self._get_stats: StatsGetter | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed_once = False
        self._described = False

    @property
    def devices(self) -> list[GpuDevice]:
        return self.sampler.devices if self.sampler is not None else []

    def start(self, get_stats: StatsGetter | None, gpu_ids: Sequence[int | str]) -> Telemetry:
        """Open NVML for `gpu_ids` (NVML indices or UUIDs; empty: no GPU) and start the thread."""
        if self.interval_s > 0 and gpu_ids:
            self._open(gpu_ids)
        elif self.interval_s > 0:
            logger.info("GPU telemetry: the engine uses no GPU; nothing is sampled.")
        self._get_stats = get_stats
        if self.sampler is None and self.monitor is None:
            return self
        self.tick()  # the first reading at once: /metrics has GPU series as soon as the engine serves
        period_s = self.interval_s if self.interval_s > 0 else 1.0
        self._thread = threading.Thread(target=self._run, args=(period_s,), name="fitserve-telemetry", daemon=True)
        self._thread.start()
        return self

    def _open(self, gpu_ids: Sequence[int | str]) -> None:
        nvml = self.nvml_loader()
        if nvml is None:
            return
        try:
            devices = select_devices(nvml, gpu_ids)
        except nvml.NVMLError as error:
            logger.warning("GPU telemetry is off: NVML could not list the GPUs (%s).", error)
            devices = []
        if not devices:
            _shutdown(nvml)
            return
        self._nvml, self.sampler = nvml, GpuSampler(nvml, devices)
        for device in devices:
            logger.info("GPU telemetry: GPU %d (%s, %s) sampled every %g s.", device.index, device.name,
                        device.uuid, self.interval_s)

    def tick(self) -> None:
        """One sample of every GPU, then the monitor; called by the thread (and tests)."""
        now_s = self.clock()
        readings = self.sampler.sample(now_s) if self.sampler is not None else []
        if self.sampler is not None and not self._described:
            self._describe()
        if self.monitor is not None:
            stats = self._get_stats() if self._get_stats is not None else None
            self.monitor.tick(now_s, stats, readings)

    def _describe(self) -> None:
        """Once: which readings each card exposes (after the first sample found out)."""
        self._described = True
        for snap in self.snapshot():
            missing = [r for r in READINGS if r in snap.unsupported]
            energy = {"counter": "its energy counter", "power_integral": "power samples (no energy counter)"}
            logger.info("GPU %d exposes %s; energy from %s.", snap.index,
                        "every reading" if not missing else "all but " + ", ".join(missing),
                        energy.get(snap.energy_source or "", "nothing (no power reading either)"))

    def _run(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            try:
                self.tick()
            except Exception as error:  # noqa: BLE001 - telemetry must never take the server down
                if not self._failed_once:
                    logger.warning("GPU telemetry tick failed (%s: %s); it keeps trying and says no more.",
                                   type(error).__name__, error)
                    self._failed_once = True

    def snapshot(self) -> list[GpuSnapshot]:
        sampler = self.sampler  # stop() may clear it meanwhile
        return sampler.snapshot() if sampler is not None else []

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=STOP_TIMEOUT_S)
            self._thread = None
        if self._nvml is not None:
            _shutdown(self._nvml)
            self._nvml, self.sampler = None, None


def _shutdown(nvml: NvmlLike) -> None:
    try:
        nvml.nvmlShutdown()
    except nvml.NVMLError:
        pass
