"""bf16 matmuls on a CPU without bf16 units (no AVX512_BF16 or AMX: an AVX2 CPU).

torch multiplies bf16 there by widening to float32 inside oneDNN, and at more than one row that path
is several times slower than float32's MKL GEMM: 30 layers of the embedded SmolLM2's projections at
16 rows took 178 ms in bf16 against 56 ms in float32 on the project's 2-core AMD EPYC, while at one
row bf16 was the faster (14.5 ms against 32 ms: it reads half the bytes). So at more than one row
`linear_bf16_widened` widens the weight to float32 itself, a slice of output features at a time (a
slice stays in the cache), lets MKL multiply in float32, and rounds the result to bf16: the same
arithmetic as torch's bf16 path (bf16 inputs, float32 products and sums, one rounding at the end),
in another summation order. docs/benchmarks.md, "bf16 on an AVX2 CPU", has the measurements.
A call holds float32 scratch beside its output: the input rows, one weight slice (at most
WIDEN_SLICE_BYTES) and that slice's products; the planner's activation estimates (plan/estimates.py)
model the GPU and leave it out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# float32 bytes of weight widened at a time: a slice (plus its bf16 source) fits the 32 MiB L3 of
# the machines measured, and the lm_head (49152 x 576) splits into a few slices
WIDEN_SLICE_BYTES = 8 << 20


# Read once at import: a compiled decode step (runner/cpu_compile.py) traces cpu_has_bf16_units, and
# dynamo refuses to trace torch.cpu's feature queries
_BF16_UNITS = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_has_bf16_units() -> bool:
    """AVX512_BF16 or AMX tiles: torch multiplies bf16 natively on this CPU."""
    return _BF16_UNITS


def takes_widened_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A bf16 matmul of more than one row on a CPU without bf16 units."""
    return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and x.dim() == 2 and x.shape[0] > 1
            and not cpu_has_bf16_units())


def linear_bf16_widened(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [N, K] @ weight [M, K].T in float32 from bf16 operands, rounded to x's dtype."""
    x32 = x.float()
    rows = max(1, WIDEN_SLICE_BYTES // (4 * weight.shape[1]))
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    for start in range(0, weight.shape[0], rows):
        out[:, start:start + rows] = F.linear(x32, weight[start:start + rows].float())
    return out
