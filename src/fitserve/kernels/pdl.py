"""Programmatic dependent launch (PDL, Hopper and later) for the forward pass's Triton kernels.

In a decode step every kernel is short (2-10 us) and the next one cannot start its programs
until the last program of the previous one has exited: the chip idles through each launch.
With PDL a kernel is launched while its predecessor still runs. Its programs become resident
as soon as the predecessor's programs have all started, and wait at `griddepcontrol.wait`
until the predecessor has finished and its writes are visible; the wait is the first thing
each program does, so no load or store (including a write over a buffer that the predecessor
still reads) can race. Waiting on the predecessor also waits on everything before it, because
the predecessor itself waited before finishing.

A kernel opts in with a `PDL: tl.constexpr` argument, `begin(PDL)` as its first statement, and
the launch options of `options(device)`: {"PDL": True, "launch_pdl": True} on Hopper, both off
elsewhere. Kernels of other libraries (cuBLAS, torch) are launched as before and are waited on
in full. CUDA graphs capture the programmatic edges.

Measured on an H200 (docs/performance.md): a decode step's graph 6.6% faster at one row in fp8
(4.7% in bf16), 1% at 20 rows, nothing at 128.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MIN_CAPABILITY = 9  # griddepcontrol: sm_90 and later


@functools.cache
def supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= MIN_CAPABILITY


def options(device: torch.device) -> dict[str, bool]:
    """The launch keywords of a PDL kernel on this device: the kernel's PDL constexpr and Triton's launch_pdl."""
    on = device.type == "cuda" and supported(device.index if device.index is not None else torch.cuda.current_device())
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def begin(PDL: tl.constexpr):
    """The first statement of a PDL kernel: wait for the predecessor, then let the successor launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

