"""The CPU path's start-up choices: torch's intra-op thread count (--cpu-threads), and the log line
that says how this CPU multiplies the serving dtype.

`--dtype auto` is bfloat16 on every CPU, as on the GPU. A CPU without bf16 units (AVX512_BF16 or
AMX: an AVX2 CPU) multiplies one row in bf16 (a GEMV that reads half float32's bytes) and several
rows in float32 from the bf16 weights (kernels/cpu_matmul.py). On the project's 2-core AMD EPYC that
served one stream 1.5x as fast as float32 weights through HTTP, and 16 streams as fast
(docs/benchmarks.md, "bf16 on an AVX2 CPU"); `--dtype float32` gives the float32 reference's tokens.
"""

from __future__ import annotations

import logging

import torch

from fitserve.kernels.cpu_matmul import cpu_has_bf16_units

logger = logging.getLogger(__name__)


def log_cpu_matmul(dtype: str) -> None:
    """Say how this CPU multiplies bfloat16 weights when it has no bf16 units."""
    if dtype == "bfloat16" and not cpu_has_bf16_units():
        logger.info("bfloat16 on a CPU without bf16 units (AVX512_BF16 or AMX): one row is multiplied in bf16, "
                    "several rows in float32 from the bf16 weights (kernels/cpu_matmul.py)")


def set_cpu_threads(num_threads: int) -> int:
    """Set torch's intra-op threads for the CPU path (0: leave torch's default, one per core); returns
    the count in use. With OpenMP's threads spinning briefly and then sleeping (fitserve/__init__.py),
    one per core measured faster than one thread at 16 streams on a quiet 2-core machine."""
    if num_threads > 0 and torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
        logger.info("torch intra-op threads on the CPU: %d", num_threads)
    return torch.get_num_threads()
