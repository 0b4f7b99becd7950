"""A fake of the pynvml functions fitserve calls (fitserve.telemetry.nvml.NvmlLike), in NVML's
own units (mW, mJ, MHz, a reason bit mask), with readings a test sets and fields it can mark
unsupported, as a card without them answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from fitserve.telemetry.nvml import NVML_ERROR_NOT_SUPPORTED, THROTTLE_REASON_BITS


class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


@dataclass
class FakeGpu:
    name: str = "NVIDIA Fake 80GB"
    uuid: str = "GPU-00000000-1111-2222-3333-444444444444"
    power_mw: int = 60_000
    power_limit_mw: int = 700_000
    energy_mj: int = 1_000_000_000  # since the "driver loaded": not zero when fitserve starts
    temperature_c: int = 35
    slowdown_c: int = 87
    sm_mhz: int = 345
    max_sm_mhz: int = 1980
    mem_mhz: int = 2619
    util_gpu: int = 0
    util_mem: int = 0
    mem_used: int = 70 * 2**30
    mem_total: int = 80 * 2**30
    reasons: tuple[str, ...] = ("gpu_idle",)
    unsupported: set[str] = field(default_factory=set)  # method names that answer NOT_SUPPORTED
    energy_step_mj: int = 0  # added to the energy counter at every read (a card drawing power)


class FakeNvml:
    NVMLError = FakeNVMLError

    def __init__(self, gpus: list[FakeGpu] | None = None) -> None:
        self.gpus = gpus if gpus is not None else [FakeGpu()]
        self.calls: dict[str, int] = {}
        self.initialized = True
        self.shutdowns = 0

    def _gpu(self, method: str, handle: int) -> FakeGpu:
        self.calls[method] = self.calls.get(method, 0) + 1
        gpu = self.gpus[handle]
        if method in gpu.unsupported:
            raise FakeNVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu

    def nvmlInit(self) -> None:
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self._gpu("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self._gpu("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return self._gpu("nvmlDeviceGetPowerUsage", handle).power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: int) -> int:
        return self._gpu("nvmlDeviceGetEnforcedPowerLimit", handle).power_limit_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        gpu = self._gpu("nvmlDeviceGetTotalEnergyConsumption", handle)
        gpu.energy_mj += gpu.energy_step_mj
        return gpu.energy_mj

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return self._gpu("nvmlDeviceGetTemperature", handle).temperature_c

    def nvmlDeviceGetTemperatureThreshold(self, handle: int, threshold: int) -> int:
        return self._gpu("nvmlDeviceGetTemperatureThreshold", handle).slowdown_c

    def nvmlDeviceGetClockInfo(self, handle: int, clock: int) -> int:
        gpu = self._gpu("nvmlDeviceGetClockInfo", handle)
        return gpu.sm_mhz if clock == 1 else gpu.mem_mhz

    def nvmlDeviceGetMaxClockInfo(self, handle: int, clock: int) -> int:
        return self._gpu("nvmlDeviceGetMaxClockInfo", handle).max_sm_mhz

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        gpu = self._gpu("nvmlDeviceGetUtilizationRates", handle)
        return SimpleNamespace(gpu=gpu.util_gpu, memory=gpu.util_mem)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        gpu = self._gpu("nvmlDeviceGetMemoryInfo", handle)
        return SimpleNamespace(used=gpu.mem_used, total=gpu.mem_total, free=gpu.mem_total - gpu.mem_used)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: int) -> int:
        gpu = self._gpu("nvmlDeviceGetCurrentClocksEventReasons", handle)
        mask = 0
        for reason in gpu.reasons:
            mask |= THROTTLE_REASON_BITS[reason]
        return mask


class ManualClock:
    """time.monotonic stand-in that tests move by hand."""

    def __init__(self, now_s: float = 1000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds
