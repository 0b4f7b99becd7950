"""A GEMM for skinny inputs: decode batches of 2 to 32 rows against a 16-bit weight.

At these sizes a linear layer still costs what reading its weight costs, but cuBLAS reads it
more slowly than at one row's GEMV (kernels/triton_gemv.py). Each program here owns BLOCK_N
output columns for every row (the rows padded to BLOCK_M for the tensor cores) and one slice
of K (SPLIT_K slices, so that narrow layers such as o_proj and down_proj still spread over
every SM); partial sums are float32, written per slice and summed in a fixed order, so results
do not depend on timing. Tiles and slices come from TILES, measured by
`benchmarks/decode_gemm_bench.py`.

The CPU path and the specification is `torch.nn.functional.linear`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 32
# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps) for narrow (N <= NARROW_COLS) and wide layers.
# Benchmarks may replace them to compare tiles.
TILES = {"narrow": (32, 256, 4, 4), "wide": (64, 256, 1, 4)}
NARROW_COLS = 8192


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, out_ptr, M, N, k_per_split, stride_x, stride_w, stride_split, stride_out,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    col_ok = cols < N
    w_rows = tl.where(col_ok, cols, 0)  # out-of-range columns read row 0 and are not stored
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_begin = split * k_per_split
    for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None], other=0.0)
        w = tl.load(w_ptr + w_rows[:, None] * stride_w + ks[None, :])  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(x, tl.trans(w), acc)
    out = out_ptr + split * stride_split + rows[:, None] * stride_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def tiles_for(num_cols: int, inner: int) -> tuple[int, int, int, int] | None:
    """The tile for a weight [num_cols, inner], or None when K does not split into its tiles."""
    block_n, block_k, split_k, num_warps = TILES["narrow" if num_cols <= NARROW_COLS else "wide"]
    if inner % block_k:
        return None
    while split_k > 1 and inner % (block_k * split_k):
        split_k //= 2
    return block_n, block_k, split_k, num_warps


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether skinny_mm takes this product: 2 to MAX_ROWS rows, 16-bit, contiguous, CUDA, K tiled."""
    return (x.dim() == 2 and 2 <= x.shape[0] <= MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and x.is_contiguous() and weight.is_contiguous() and x.is_cuda
            and tiles_for(weight.shape[0], weight.shape[1]) is not None)


def skinny_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T -> [M, N] in x's dtype, 2 <= M <= MAX_ROWS (float32 accumulation)."""
    assert supports(x, weight), "skinny_mm takes 2-32 contiguous 16-bit rows and a contiguous weight whose K tiles"
    num_rows, inner = x.shape
    num_cols = weight.shape[0]
    assert weight.shape[1] == inner, f"x has {inner} columns, the weight {weight.shape[1]}"
    tiles = tiles_for(num_cols, inner)
    assert tiles is not None
    block_n, block_k, split_k, num_warps = tiles
    block_m = 16 if num_rows <= 16 else 32
    if split_k == 1:
        partial = torch.empty(num_rows, num_cols, dtype=x.dtype, device=x.device)
    else:
        partial = torch.empty(split_k, num_rows, num_cols, dtype=torch.float32, device=x.device)
    _skinny_kernel[(triton.cdiv(num_cols, block_n), split_k)](
        x, weight, partial, num_rows, num_cols, inner // split_k, x.stride(0), weight.stride(0),
        partial.stride(0) if split_k > 1 else 0, num_cols,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )
    if split_k == 1:
        return partial
    return partial.sum(dim=0).to(x.dtype)  # a fixed reduction order: the same bytes every run
