"""NVML, the library behind nvidia-smi, read through a facade that tests replace with a fake.

The facade is the subset of `pynvml` (the `nvidia-ml-py` package) that fitserve calls, under
pynvml's own names, so the real one is the module itself and a fake is a small class. Every
reading goes through `read_sample`, which turns NVML's units (mW, mJ, a bit mask) into
fitserve's (W, J, reason names) and a field the card does not expose into None, once: a
field that answered "not supported" is not asked again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# NVML's enum values (nvml.h), fixed by its ABI; pynvml exports the same numbers.
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_TEMPERATURE_GPU = 0
NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_FUNCTION_NOT_FOUND = 13  # an older driver than the function
MILLI = 1e-3

# nvmlClocksEventReason* bits (formerly "throttle reasons"), named as nvidia-smi's
# clocks_event_reasons.* fields name them.
THROTTLE_REASON_BITS: dict[str, int] = {
    "gpu_idle": 0x1,
    "applications_clocks_setting": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal_slowdown": 0x20,
    "hw_thermal_slowdown": 0x40,
    "hw_power_brake_slowdown": 0x80,
    "display_clock_setting": 0x100,
}
IDLE_REASON = "gpu_idle"  # clocks are low because nothing runs: never a problem


class NvmlLike(Protocol):
    """The pynvml functions fitserve calls; `pynvml` itself satisfies it."""

    NVMLError: type[Exception]

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetName(self, handle: Any) -> str: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str: ...
    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int: ...            # mW
    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int: ...    # mW
    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int: ...  # mJ since the driver loaded
    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int: ...  # degrees C
    def nvmlDeviceGetTemperatureThreshold(self, handle: Any, threshold: int) -> int: ...
    def nvmlDeviceGetClockInfo(self, handle: Any, clock: int) -> int: ...     # MHz
    def nvmlDeviceGetMaxClockInfo(self, handle: Any, clock: int) -> int: ...  # MHz
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any: ...      # .gpu, .memory: percent
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...            # .used, .total: bytes
    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int: ...  # bit mask


def load_nvml() -> NvmlLike | None:
    """pynvml, initialized; None (and nothing else happens) without the package or a driver."""
    try:
        import pynvml
    except ImportError:
        logger.info("GPU telemetry is off: the nvidia-ml-py package (pynvml) is not installed.")
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        logger.info("GPU telemetry is off: NVML did not start (%s).", error)
        return None
    return pynvml  # type: ignore[return-value]


@dataclass(slots=True)
class GpuDevice:
    """One GPU in use: what never changes, and the fields its card does not expose."""

    index: int                      # NVML's index (all GPUs of the machine, CUDA_VISIBLE_DEVICES aside)
    handle: Any
    name: str
    uuid: str
    max_sm_clock_mhz: float | None = None
    slowdown_temperature_c: float | None = None  # where the card starts slowing its clocks for heat
    unsupported: set[str] = field(default_factory=set)  # reading names that answered "not supported"


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One reading of one GPU; None: the card does not expose it (or the read failed)."""

    time_s: float                         # time.monotonic() of the reading
    power_w: float | None = None          # board power draw (NVML's averaged reading)
    power_limit_w: float | None = None    # the enforced power limit
    energy_counter_j: float | None = None  # NVML's total since the driver loaded (not since fitserve started)
    temperature_c: float | None = None
    sm_clock_mhz: float | None = None
    memory_clock_mhz: float | None = None
    utilization_pct: float | None = None  # nvidia-smi's GPU-Util: time a kernel ran, not how hard
    memory_busy_pct: float | None = None  # time device memory was read or written
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    throttle_reasons: tuple[str, ...] | None = None  # active reasons, names of THROTTLE_REASON_BITS

    @property
    def active_slowdowns(self) -> tuple[str, ...]:
        """Throttle reasons other than idle: the card holds its clocks down although work waits."""
        return tuple(r for r in self.throttle_reasons or () if r != IDLE_REASON)


def reason_names(mask: int) -> tuple[str, ...]:
    return tuple(name for name, bit in THROTTLE_REASON_BITS.items() if mask & bit)


def _is_unsupported(error: Exception) -> bool:
    return isinstance(error, AttributeError) or getattr(error, "value", None) in (
        NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_FUNCTION_NOT_FOUND)


def _read(nvml: NvmlLike, device: GpuDevice, name: str, call) -> Any:
    """call() or None; a field the card does not support is remembered and never read again."""
    if name in device.unsupported:
        return None
    try:
        return call()
    except (nvml.NVMLError, AttributeError) as error:
        if _is_unsupported(error):
            device.unsupported.add(name)
        else:
            logger.debug("NVML read %s of GPU %d failed: %s", name, device.index, error)
        return None


def _scaled(value: Any, scale: float) -> float | None:
    return None if value is None else float(value) * scale


def read_energy_j(nvml: NvmlLike, device: GpuDevice) -> float | None:
    return _scaled(_read(nvml, device, "energy", lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(device.handle)),
                   MILLI)


def _throttle_mask(nvml: NvmlLike, handle: Any) -> int:
    read = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
    if read is None:  # nvidia-ml-py before 12.535 only has the old name
        read = nvml.nvmlDeviceGetCurrentClocksThrottleReasons  # type: ignore[attr-defined]
    return int(read(handle))


def read_sample(nvml: NvmlLike, device: GpuDevice, now_s: float) -> GpuSample:
    h = device.handle
    utilization = _read(nvml, device, "utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(h))
    memory = _read(nvml, device, "memory", lambda: nvml.nvmlDeviceGetMemoryInfo(h))
    mask = _read(nvml, device, "throttle_reasons", lambda: _throttle_mask(nvml, h))
    return GpuSample(
        time_s=now_s,
        power_w=_scaled(_read(nvml, device, "power", lambda: nvml.nvmlDeviceGetPowerUsage(h)), MILLI),
        power_limit_w=_scaled(_read(nvml, device, "power_limit", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(h)),
                              MILLI),
        energy_counter_j=read_energy_j(nvml, device),
        temperature_c=_scaled(_read(nvml, device, "temperature",
                                    lambda: nvml.nvmlDeviceGetTemperature(h, NVML_TEMPERATURE_GPU)), 1.0),
        sm_clock_mhz=_scaled(_read(nvml, device, "sm_clock", lambda: nvml.nvmlDeviceGetClockInfo(h, NVML_CLOCK_SM)),
                             1.0),
        memory_clock_mhz=_scaled(_read(nvml, device, "memory_clock",
                                       lambda: nvml.nvmlDeviceGetClockInfo(h, NVML_CLOCK_MEM)), 1.0),
        utilization_pct=None if utilization is None else float(utilization.gpu),
        memory_busy_pct=None if utilization is None else float(utilization.memory),
        memory_used_bytes=None if memory is None else int(memory.used),
        memory_total_bytes=None if memory is None else int(memory.total),
        throttle_reasons=None if mask is None else reason_names(mask),
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _normalized_uuid(text: str) -> str:
    return text.strip().lower().removeprefix("gpu-")


def open_device(nvml: NvmlLike, index: int) -> GpuDevice:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    device = GpuDevice(index, handle, _text(nvml.nvmlDeviceGetName(handle)), _text(nvml.nvmlDeviceGetUUID(handle)))
    device.max_sm_clock_mhz = _scaled(_read(nvml, device, "max_sm_clock",
                                            lambda: nvml.nvmlDeviceGetMaxClockInfo(handle, NVML_CLOCK_SM)), 1.0)
    device.slowdown_temperature_c = _scaled(_read(
        nvml, device, "slowdown_temperature",
        lambda: nvml.nvmlDeviceGetTemperatureThreshold(handle, NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)), 1.0)
    return device


def select_devices(nvml: NvmlLike, gpu_ids: Sequence[int | str]) -> list[GpuDevice]:
    """The NVML devices named by `gpu_ids`: an NVML index, or a UUID ("GPU-..." or bare).

    CUDA's device numbers follow CUDA_VISIBLE_DEVICES and NVML's do not, so the server names
    its GPU by UUID; an id that matches nothing is logged and skipped.
    """
    wanted = list(dict.fromkeys(gpu_ids))
    if not wanted:
        return []
    devices = [open_device(nvml, i) for i in range(int(nvml.nvmlDeviceGetCount()))]
    by_uuid = {_normalized_uuid(d.uuid): d for d in devices}
    chosen: list[GpuDevice] = []
    for gpu_id in wanted:
        device = devices[gpu_id] if isinstance(gpu_id, int) and 0 <= gpu_id < len(devices) else (
            by_uuid.get(_normalized_uuid(gpu_id)) if isinstance(gpu_id, str) else None)
        if device is None:
            logger.warning("GPU telemetry: no NVML device matches %r; it is not sampled.", gpu_id)
        elif device not in chosen:
            chosen.append(device)
    return chosen
