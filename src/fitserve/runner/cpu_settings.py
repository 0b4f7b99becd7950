"""The CPU path's thread and dtype choices: torch's intra-op thread count (--cpu-threads) and the
one-token steps that run on one thread (StepThreads), and the log line that says how this CPU
multiplies the serving dtype.

`--dtype auto` is bfloat16 on every CPU, as on the GPU. A CPU without bf16 units (AVX512_BF16 or
AMX: an AVX2 CPU) multiplies one row in bf16 (a GEMV that reads half float32's bytes) and several
rows in float32 from the bf16 weights (kernels/cpu_matmul.py). On the project's 2-core AMD EPYC that
served one stream 1.3x as fast as float32 weights through HTTP, and 16 streams as fast
(docs/benchmarks.md, "bf16 on an AVX2 CPU"); `--dtype float32` gives the float32 reference's tokens.

Where OpenMP's threads sleep between ops (OMP_WAIT_POLICY=PASSIVE without a spin count, the setting for
a shared machine; fitserve's default lets them spin briefly, fitserve/__init__.py;
config.openmp_threads_sleep), a step that feeds one token (a single stream's decode) runs on one
thread. Its matmuls are GEMVs of one row, and waking the second thread for each of them cost more than it gave: one
stream through HTTP made 19.2 tok/s on one thread against 17.4 on two (2-core EPYC, bf16), and on a
machine where another process took a core, 20.8 against 18.6 in-process. Steps of several tokens use
every thread. Where the user lets the threads spin (GOMP_SPINCOUNT, or OMP_WAIT_POLICY other than
PASSIVE) there is no wake-up to save, and every step uses every thread: with GOMP_SPINCOUNT=30000 one
stream made 25.4 tok/s.
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


class StepThreads:
    """torch's intra-op threads per CPU step: one for a step of one token, `threads` otherwise. Set
    from the thread that runs the steps (OpenMP keeps the count per thread), first at its first step."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.current = 0

    def set_for(self, num_tokens: int) -> None:
        wanted = 1 if num_tokens == 1 else self.threads
        if wanted != self.current:
            torch.set_num_threads(wanted)
            self.current = wanted


def set_cpu_threads(num_threads: int) -> int:
    """Set torch's intra-op threads for the CPU path (0: leave torch's default, one per core); returns
    the count in use (steps of one token take one of them: StepThreads)."""
    if num_threads > 0 and torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
        logger.info("torch intra-op threads on the CPU: %d", num_threads)
    return torch.get_num_threads()
