"""Per-GPU state built from successive samples: the latest reading, energy since sampling
began, and seconds spent under each throttle reason.

Energy comes from the card's own counter where it has one (read again at scrape time, so a
benchmark's before/after difference is exact); otherwise it is the integral of the power
samples (trapezoids between readings about a second apart: good to a second of power at
either end of a window). Counters start at zero when sampling starts, as every other
fitserve counter starts at zero when the server does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from fitserve.telemetry.nvml import GpuDevice, GpuSample, NvmlLike, read_energy_j, read_sample

ENERGY_FROM_COUNTER = "counter"        # NVML's total energy consumption (Volta and later)
ENERGY_FROM_POWER = "power_integral"   # power samples integrated over time
# Longest gap between samples that still counts as one interval: a longer one (the thread was
# starved, the machine suspended) would attribute minutes to one reading.
MAX_INTEGRATION_GAP_S = 5.0


@dataclass(frozen=True, slots=True)
class GpuSnapshot:
    """What /metrics shows of one GPU."""

    index: int
    name: str
    uuid: str
    latest: GpuSample
    energy_j: float | None                # since sampling began; None: neither counter nor power
    energy_source: str | None             # ENERGY_FROM_COUNTER or ENERGY_FROM_POWER
    throttle_s: dict[str, float]          # reason -> seconds it was active (sampled)
    max_sm_clock_mhz: float | None
    slowdown_temperature_c: float | None
    unsupported: tuple[str, ...]          # readings the card does not expose


@dataclass(slots=True)
class _GpuState:
    device: GpuDevice
    latest: GpuSample | None = None
    first_energy_counter_j: float | None = None
    power_energy_j: float = 0.0
    throttle_s: dict[str, float] = field(default_factory=dict)

    def add(self, sample: GpuSample) -> None:
        previous, self.latest = self.latest, sample
        if self.first_energy_counter_j is None:
            self.first_energy_counter_j = sample.energy_counter_j
        if previous is None:
            return
        gap_s = sample.time_s - previous.time_s
        if not 0.0 < gap_s <= MAX_INTEGRATION_GAP_S:
            return
        if previous.power_w is not None and sample.power_w is not None:
            self.power_energy_j += 0.5 * (previous.power_w + sample.power_w) * gap_s
        for reason in previous.throttle_reasons or ():  # the reasons held over the interval just ended
            self.throttle_s[reason] = self.throttle_s.get(reason, 0.0) + gap_s


class GpuSampler:
    """Samples the GPUs in use; `sample()` is called by the telemetry thread, `snapshot()` by
    /metrics (another thread): one lock guards the state."""

    def __init__(self, nvml: NvmlLike, devices: list[GpuDevice]) -> None:
        self.nvml = nvml
        self.devices = devices
        self._states = [_GpuState(d) for d in devices]
        self._lock = threading.Lock()

    def sample(self, now_s: float) -> list[tuple[GpuDevice, GpuSample]]:
        readings = [(state.device, read_sample(self.nvml, state.device, now_s)) for state in self._states]
        with self._lock:
            for state, (_, sample) in zip(self._states, readings):
                state.add(sample)
        return readings

    def _energy(self, state: _GpuState) -> tuple[float | None, str | None]:
        if state.first_energy_counter_j is not None:
            now_j = read_energy_j(self.nvml, state.device)
            if now_j is not None:
                return max(now_j - state.first_energy_counter_j, 0.0), ENERGY_FROM_COUNTER
        if state.latest is not None and state.latest.power_w is not None:
            return state.power_energy_j, ENERGY_FROM_POWER
        return None, None

    def snapshot(self) -> list[GpuSnapshot]:
        """The GPUs sampled at least once; energy read now where the card has a counter."""
        out = []
        with self._lock:
            for state in self._states:
                if state.latest is None:
                    continue
                energy_j, source = self._energy(state)
                d = state.device
                out.append(GpuSnapshot(d.index, d.name, d.uuid, state.latest, energy_j, source,
                                       dict(state.throttle_s), d.max_sm_clock_mhz, d.slowdown_temperature_c,
                                       tuple(sorted(d.unsupported))))
        return out
