"""Common cards and their memory, for `fitserve plan --gpu NAME` (torch-free).

Sizes are the totals `nvidia-smi` prints (MiB), which is also what CUDA reports as total
memory and what `--gpu-memory-utilization` is a fraction of. Rows marked `seen` were read
off a real card (the device machines of this project, or the deployment guide); the others
are the usual figures for that model and may differ by a few MiB between boards and drivers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fitserve.config import ConfigError

MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class GpuSpec:
    name: str  # as the driver names it
    total_mib: int  # nvidia-smi's "Total" memory
    aliases: tuple[str, ...] = ()
    seen: bool = False  # True: read off a real card, not from a datasheet

    @property
    def total_bytes(self) -> int:
        return self.total_mib * MIB


KNOWN_GPUS: tuple[GpuSpec, ...] = (
    GpuSpec("NVIDIA RTX 4000 Ada Generation", 20475, ("rtx 4000 ada", "rtx4000ada", "rtx 4000"), seen=True),
    GpuSpec("NVIDIA GeForce RTX 4090", 24564, ("rtx 4090", "4090")),
    GpuSpec("NVIDIA GeForce RTX 3090", 24576, ("rtx 3090", "3090")),
    GpuSpec("NVIDIA L4", 23034, ("l4",)),
    GpuSpec("NVIDIA A10G", 23028, ("a10g",)),
    GpuSpec("NVIDIA A10", 23028, ("a10",)),
    GpuSpec("Tesla T4", 15360, ("t4",)),
    GpuSpec("NVIDIA L40S", 46068, ("l40s",)),
    GpuSpec("NVIDIA RTX A6000", 49140, ("a6000", "rtx a6000")),
    GpuSpec("NVIDIA A100-SXM4-40GB", 40960, ("a100-40gb", "a100 40gb", "a100-40")),
    GpuSpec("NVIDIA A100-SXM4-80GB", 81920, ("a100", "a100-80gb", "a100 80gb", "a100-80")),
    GpuSpec("NVIDIA H100 80GB HBM3", 81559, ("h100", "h100 80gb", "h100-sxm"), seen=True),
    GpuSpec("NVIDIA H200", 143771, ("h200",), seen=True),
)


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def find_gpu(name: str) -> GpuSpec:
    """The card named `name` (case, spaces and dashes do not matter); ConfigError lists the known ones."""
    wanted = _key(name)
    for gpu in KNOWN_GPUS:
        if wanted in {_key(gpu.name), *(_key(alias) for alias in gpu.aliases)}:
            return gpu
    known = ", ".join(f"{gpu.aliases[0] if gpu.aliases else gpu.name} ({gpu.total_mib} MiB)" for gpu in KNOWN_GPUS)
    raise ConfigError(
        f"Unknown card {name!r}. Known cards: {known}. For another card pass its memory, "
        "e.g. --gpu-memory 20475MiB (the Total that nvidia-smi prints)."
    )
