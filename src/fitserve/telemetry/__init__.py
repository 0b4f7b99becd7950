"""GPU telemetry (torch-free): NVML sampled in a background thread, slowdown warnings and a
stats line in the log, and per-GPU readings for /metrics (docs/telemetry.md)."""

from fitserve.telemetry.nvml import GpuDevice, GpuSample, NvmlLike, load_nvml
from fitserve.telemetry.sampler import GpuSnapshot
from fitserve.telemetry.service import Telemetry

__all__ = ["GpuDevice", "GpuSample", "GpuSnapshot", "NvmlLike", "Telemetry", "load_nvml"]
