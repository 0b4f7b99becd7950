"""fitserve:gpu_* series on /metrics, from the telemetry thread's latest readings.

One series per GPU in use (label `gpu`, NVML's index, beside `model_name` and `engine`); a
reading the card does not expose has no series. Energy is read at scrape time where the card
has a counter, so a client's before/after difference covers exactly its own window.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fitserve.telemetry import GpuSnapshot, Telemetry
from fitserve.telemetry.nvml import THROTTLE_REASON_BITS

LABELS = ["model_name", "engine", "gpu"]

# name, help, how to read it from a snapshot (None: no series for that GPU)
GAUGES: tuple[tuple[str, str, Callable[[GpuSnapshot], float | None]], ...] = (
    ("fitserve:gpu_power_watts", "Board power draw in watts (NVML's averaged reading).",
     lambda s: s.latest.power_w),
    ("fitserve:gpu_power_limit_watts", "Enforced power limit in watts.", lambda s: s.latest.power_limit_w),
    ("fitserve:gpu_temperature_celsius", "GPU temperature in degrees Celsius.", lambda s: s.latest.temperature_c),
    ("fitserve:gpu_slowdown_temperature_celsius", "Temperature at which the card starts slowing its clocks.",
     lambda s: s.slowdown_temperature_c),
    ("fitserve:gpu_sm_clock_mhz", "Current SM clock in MHz.", lambda s: s.latest.sm_clock_mhz),
    ("fitserve:gpu_sm_clock_max_mhz", "Maximum SM clock in MHz.", lambda s: s.max_sm_clock_mhz),
    ("fitserve:gpu_memory_clock_mhz", "Current memory clock in MHz.", lambda s: s.latest.memory_clock_mhz),
    ("fitserve:gpu_utilization_percent",
     "Percent of the last sample period in which a kernel ran (nvidia-smi's GPU-Util; not how hard it worked).",
     lambda s: s.latest.utilization_pct),
    ("fitserve:gpu_memory_busy_percent", "Percent of the last sample period in which device memory was read or written.",
     lambda s: s.latest.memory_busy_pct),
    ("fitserve:gpu_memory_used_bytes", "Device memory in use, every process included.",
     lambda s: s.latest.memory_used_bytes),
    ("fitserve:gpu_memory_total_bytes", "Device memory in all.", lambda s: s.latest.memory_total_bytes),
)


def gpu_families(snapshots: list[GpuSnapshot], base_labels: list[str]) -> Iterator[Metric]:
    """Every fitserve:gpu_* family for the GPUs sampled; `base_labels` = [model_name, engine]."""
    if not snapshots:
        return
    info = GaugeMetricFamily("fitserve:gpu_info", "The GPUs in use (always 1): name, UUID, where energy comes from.",
                             labels=[*LABELS, "name", "uuid", "energy_source"])
    for s in snapshots:
        info.add_metric([*base_labels, str(s.index), s.name, s.uuid, s.energy_source or "none"], 1)
    yield info
    for name, doc, read in GAUGES:
        family = GaugeMetricFamily(name, doc, labels=LABELS)
        for s in snapshots:
            value = read(s)
            if value is not None:
                family.add_metric([*base_labels, str(s.index)], value)
        if family.samples:
            yield family
    energy = CounterMetricFamily("fitserve:gpu_energy_joules",
                                 "Energy the GPU used since fitserve began sampling it, in joules.", labels=LABELS)
    for s in snapshots:
        if s.energy_j is not None:
            energy.add_metric([*base_labels, str(s.index)], s.energy_j)
    if energy.samples:
        yield energy
    yield from _throttle_families(snapshots, base_labels)


def _throttle_families(snapshots: list[GpuSnapshot], base_labels: list[str]) -> Iterator[Metric]:
    active = GaugeMetricFamily("fitserve:gpu_throttle_active",
                               "1 while NVML reports this clocks-event (throttle) reason, else 0.",
                               labels=[*LABELS, "reason"])
    seconds = CounterMetricFamily("fitserve:gpu_throttle_seconds",
                                  "Seconds (sampled) during which this throttle reason was active.",
                                  labels=[*LABELS, "reason"])
    for s in snapshots:
        if s.latest.throttle_reasons is None:
            continue  # the card does not report reasons
        for reason in THROTTLE_REASON_BITS:
            labels = [*base_labels, str(s.index), reason]
            active.add_metric(labels, 1 if reason in s.latest.throttle_reasons else 0)
            seconds.add_metric(labels, s.throttle_s.get(reason, 0.0))
    if active.samples:
        yield active
        yield seconds


class GpuCollector(Collector):
    """Reads the telemetry at scrape time; nothing before the engine (and its GPUs) are known."""

    def __init__(self, get_telemetry: Callable[[], Telemetry | None],
                 get_base_labels: Callable[[], list[str] | None]) -> None:
        self.get_telemetry = get_telemetry
        self.get_base_labels = get_base_labels

    def collect(self) -> Iterator[Metric]:
        telemetry, labels = self.get_telemetry(), self.get_base_labels()
        if telemetry is None or labels is None:
            return
        yield from gpu_families(telemetry.snapshot(), labels)
