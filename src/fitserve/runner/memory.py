"""Start-up sizing on the device: readings of GPU memory, and the measured side of the plan.

The plan (fitserve.plan) says, before any weight is read, what the budget holds; here the
same quantities are measured as start-up goes (weights after loading, the activation peak
and the memory outside torch after the profiling run, the CUDA-graph pool after capture)
and handed back to the planner's sizing rule, so the KV cache is sized by the plan's code
with real figures. vLLM's meaning of --gpu-memory-utilization: total memory x utilization
holds everything this server allocates; the CUDA context that exists before (and other
processes) stays outside it, which is why at start the free memory must cover the budget.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field

import torch

from fitserve.plan.planner import MemoryBreakdown, MemoryPlan, plan_memory
from fitserve.plan.units import GIB

logger = logging.getLogger(__name__)
TORCH_KV_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                   "fp8": torch.float8_e4m3fn}


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    """One reading of a CUDA device's memory."""

    total_bytes: int
    free_bytes: int
    reserved_bytes: int  # held by torch's caching allocator
    allocated_bytes: int  # in live torch tensors

    @property
    def used_bytes(self) -> int:
        return self.total_bytes - self.free_bytes

    @property
    def non_torch_bytes(self) -> int:
        """In use on the device but not through torch: CUDA context, kernel images, other processes."""
        return self.used_bytes - self.reserved_bytes


def read_device_memory(device: torch.device, settle: bool = True) -> DeviceMemory:
    """With `settle`, first free what torch caches, so `free` counts only memory in use."""
    if settle:
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    free_bytes, total_bytes = torch.cuda.mem_get_info(device)
    return DeviceMemory(total_bytes, free_bytes, torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device))


def start_reading(device: torch.device) -> DeviceMemory:
    """The device before fitserve allocates anything (creates the CUDA context first)."""
    torch.cuda.init()
    if device.index is not None:
        torch.cuda.set_device(device)
    torch.zeros(1, device=device)  # the context exists once a first allocation has run
    return read_device_memory(device)


def gpu_processes(device: torch.device) -> str:
    """The processes on the GPU and their memory in one line, when NVML can tell ('' when it cannot)."""
    try:
        listing = torch.cuda.list_gpu_processes(device)
    except Exception:  # noqa: BLE001 - NVML unavailable: the message goes without the list
        return ""
    lines = [line.strip() for line in listing.splitlines()[1:] if line.strip()]  # the first line names the GPU
    if not lines or any("not found" in line or "no processes" in line for line in lines):
        return ""
    return "; ".join(lines)


@dataclass(slots=True)
class StartupMemory:
    """Planned and measured memory of one start-up, for the log and for benchmarks/."""

    planned: MemoryPlan  # from estimates, before any weight was read
    start: DeviceMemory | None = None  # the device before fitserve allocated anything
    weights_bytes: int | None = None  # measured after loading
    activation_peak_bytes: int | None = None  # measured by the profiling run
    runtime_non_torch_bytes: int | None = None  # non-torch growth from start to after profiling
    sized: MemoryPlan | None = None  # the plan with the measured figures: what was allocated
    cuda_graph_bytes: int | None = None  # measured after capture
    end: DeviceMemory | None = None  # after start-up
    profile: dict[str, float] = field(default_factory=dict)  # phase peaks and seconds

    def measured_breakdown(self, planned_graph_bytes: int) -> MemoryBreakdown:
        assert self.weights_bytes is not None and self.activation_peak_bytes is not None
        return MemoryBreakdown(
            weights_bytes=self.weights_bytes,
            activation_peak_bytes=self.activation_peak_bytes,
            runtime_non_torch_bytes=max(self.runtime_non_torch_bytes or 0, 0),
            cuda_graph_bytes=planned_graph_bytes,  # captured after the KV cache: the plan reserves it
        )

    def size_kv_cache(self) -> MemoryPlan:
        """The planner's sizing rule with the measured figures; raises ConfigError when it cannot fit."""
        self.sized = plan_memory(self.planned.inputs, self.measured_breakdown(self.planned.breakdown.cuda_graph_bytes))
        self.sized.raise_if_fatal()
        return self.sized

    def table(self) -> str:
        """Planned and measured figures side by side, in GiB."""
        planned, sized = self.planned, self.sized or self.planned
        rows = [
            ("weights", planned.breakdown.weights_bytes, self.weights_bytes),
            ("activation peak", planned.breakdown.activation_peak_bytes, self.activation_peak_bytes),
            ("runtime outside torch", planned.breakdown.runtime_non_torch_bytes, self.runtime_non_torch_bytes),
            ("CUDA-graph pool", planned.breakdown.cuda_graph_bytes, self.cuda_graph_bytes),
            ("KV cache", planned.kv_cache_bytes, sized.kv_cache_bytes),
        ]
        lines = [f"{'GPU memory (GiB)':<24}{'planned':>10}{'measured':>10}"]
        for label, plan_bytes, measured_bytes in rows:
            measured = "-" if measured_bytes is None else f"{measured_bytes / GIB:.2f}"
            lines.append(f"  {label:<22}{plan_bytes / GIB:>10.2f}{measured:>10}")
        lines.append(f"  {'KV blocks':<22}{planned.num_kv_blocks:>10}{sized.num_kv_blocks:>10}")
        budget = planned.budget_bytes / GIB
        if self.end is not None and self.start is not None:
            used = (self.end.used_bytes - self.start.used_bytes) / GIB
            lines.append(f"  in use after start-up {used:.2f} GiB of a {budget:.2f} GiB budget; "
                         f"{self.end.free_bytes / GIB:.2f} GiB of the card free")
        return "\n".join(lines)

    def to_json(self) -> dict[str, object]:
        def reading(memory: DeviceMemory | None) -> dict[str, int] | None:
            if memory is None:
                return None
            return {"total_bytes": memory.total_bytes, "free_bytes": memory.free_bytes,
                    "reserved_bytes": memory.reserved_bytes, "allocated_bytes": memory.allocated_bytes}

        planned, sized = self.planned, self.sized or self.planned
        return {
            "planned": {
                "weights_bytes": planned.breakdown.weights_bytes,
                "activation_peak_bytes": planned.breakdown.activation_peak_bytes,
                "runtime_non_torch_bytes": planned.breakdown.runtime_non_torch_bytes,
                "cuda_graph_bytes": planned.breakdown.cuda_graph_bytes,
                "outside_budget_bytes": planned.outside_budget_bytes,
                "kv_cache_bytes": planned.kv_cache_bytes,
                "num_kv_blocks": planned.num_kv_blocks,
            },
            "measured": {
                "weights_bytes": self.weights_bytes,
                "activation_peak_bytes": self.activation_peak_bytes,
                "runtime_non_torch_bytes": self.runtime_non_torch_bytes,
                "cuda_graph_bytes": self.cuda_graph_bytes,
                "kv_cache_bytes": sized.kv_cache_bytes,
                "num_kv_blocks": sized.num_kv_blocks,
            },
            "budget_bytes": planned.budget_bytes,
            "start": reading(self.start),
            "end": reading(self.end),
            "profile": dict(self.profile),
        }
