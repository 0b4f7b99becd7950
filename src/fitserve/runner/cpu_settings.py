"""The CPU path's start-up choices: the serving dtype that `--dtype auto` means on this CPU, and
torch's intra-op thread count (--cpu-threads).

bfloat16 is fast on a CPU only with bf16 units (AVX512_BF16 or AMX): elsewhere torch widens every
bf16 matrix to float32 before multiplying, and on a 2-core AMD EPYC (AVX2) a bf16 decode step was
measured 2.2x slower than the same step in float32 at 16 streams (docs/benchmarks.md, "Where a CPU
step goes"). float32 weights take twice the memory (0.54 GB for the embedded SmolLM2-135M), and
give the float32 reference's exact tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CpuFeatures:
    fast_bf16: bool  # AVX512_BF16 or AMX tiles: torch multiplies bf16 natively


def cpu_features() -> CpuFeatures:
    return CpuFeatures(fast_bf16=bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))


def cpu_auto_dtype(features: CpuFeatures) -> str:
    """What `--dtype auto` means on this CPU: bfloat16 with bf16 units, else float32."""
    return "bfloat16" if features.fast_bf16 else "float32"


def resolve_cpu_dtype(dtype: str, features: CpuFeatures) -> str:
    """The config's dtype on the CPU: `auto` becomes cpu_auto_dtype (logged); any other is kept."""
    if dtype != "auto":
        return dtype
    chosen = cpu_auto_dtype(features)
    if chosen == "float32":
        logger.info("--dtype auto on this CPU is float32: it has no bf16 units (AVX512_BF16 or AMX), so "
                    "bfloat16 would be widened to float32 at every matrix multiply")
    return chosen


def set_cpu_threads(num_threads: int) -> int:
    """Set torch's intra-op threads for the CPU path (0: leave torch's default, one per core); returns
    the count in use. With OMP_WAIT_POLICY=PASSIVE (fitserve/__init__.py) one per core measured as
    fast as or faster than fewer, busy machine or idle; without it, on a busy 2-core machine, one
    thread was 5x faster than two (docs/benchmarks.md)."""
    if num_threads > 0 and torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
        logger.info("torch intra-op threads on the CPU: %d", num_threads)
    return torch.get_num_threads()
