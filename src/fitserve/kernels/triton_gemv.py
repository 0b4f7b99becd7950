"""A matrix-vector product for one-row linear layers: single-stream decode.

At one row a linear layer is a pure read of its weight: y[n] = sum_k x[k] * W[n, k]. Each
program owns BLOCK_N output rows and walks K in BLOCK_K-wide tiles, multiplying in float32 and
summing across the tile, so every weight byte is read once, in long contiguous runs, by many
programs at once. On an H200 the 128 linear layers of a Llama-3-8B decode step, replayed in a
CUDA graph, took 3.39 ms this way against 3.76 ms through cuBLAS (4.12 against 3.71 TB/s;
`benchmarks/decode_gemm_bench.py`); with two rows or more cuBLAS is used.

The CPU path and the specification is `torch.nn.functional.linear`; the result differs from it
only by float32 summation order (tests compare).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fitserve.kernels import pdl
from fitserve.kernels.pdl import begin

# (BLOCK_N, BLOCK_K, num_warps), chosen by `benchmarks/decode_gemm_bench.py` on an H200: the
# fastest over the 8B model's four shapes (results/decode_gemm_h200_e62ba6a.json); BLOCK_K shrinks
# to K for small layers. Benchmarks may replace it to compare tiles.
CONFIG = (4, 2048, 8)


@triton.jit
def row_dot(x_ptr, w_ptr, rows, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """[BLOCK_N] float32: sum over k of x[k] * W[rows, k], multiplied in float32 tile by tile and
    summed across the tile once at the end."""
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :])
            x = tl.load(x_ptr + cols)
        else:
            w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=(cols < K)[None, :], other=0.0)
            x = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid = rows < N
    rows = tl.where(row_valid, rows, 0)  # out-of-range rows read row 0 and are not stored
    begin(PDL)
    y = row_dot(x_ptr, w_ptr, rows, K, stride_w, BLOCK_N, BLOCK_K, EVEN_K)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_valid)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether gemv takes this product: one row, 16-bit floats, both contiguous, on CUDA."""
    return (x.dim() == 2 and x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and x.is_contiguous() and weight.is_contiguous() and x.is_cuda)


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [1, K] @ weight[N, K].T -> [1, N] in x's dtype (float32 accumulation)."""
    assert supports(x, weight), "gemv takes one contiguous 16-bit row and a contiguous weight of its dtype"
    num_rows, k = weight.shape
    assert x.shape[1] == k, f"x has {x.shape[1]} columns, the weight {k}"
    block_n, block_k, num_warps = CONFIG
    block_k = min(block_k, triton.next_power_of_2(k))
    out = torch.empty(1, num_rows, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(num_rows, block_n),)](
        x, weight, out, num_rows, k, weight.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        num_warps=num_warps, **pdl.options(x.device),
    )
    return out
