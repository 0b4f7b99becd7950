"""The GEMM of integer group-quantized weights (GPTQ, AWQ, compressed-tensors W4A16/W8A16) on CUDA.

y = x @ W.T with W in kernels/int_quant.py's layout: each program loads its tile of packed
values, takes each value's group (k // group_size, or g_idx[k] for an act-order checkpoint),
dequantizes (q - zero) * scale in float32 in registers, rounds to x's dtype and multiplies on
the tensor cores with float32 sums: int_quant.int_quant_mm_reference is the specification.
A 4-bit byte holds two neighbouring columns; the tile loads it once for each (the second read
hits the cache). One tile shape; a decode batch pads to 16 rows. Written for correctness and
bytes first: the weights take a quarter (4 bits) or half (8 bits) of bf16's memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K = 64


@triton.jit
def _int_quant_kernel(x_ptr, q_ptr, s_ptr, z_ptr, g_ptr, y_ptr, M, N, K, group_size,
                      stride_x, stride_q, stride_s, stride_y,
                      BITS: tl.constexpr, HAS_G_IDX: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    col_off = cols[:, None].to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        k_ok = k < K
        tile_ok = col_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if BITS == 4:
            packed = tl.load(q_ptr + col_off * stride_q + (k // 2)[None, :], mask=tile_ok, other=0)
            q = (packed >> ((k % 2) * 4).to(tl.uint8)[None, :]) & 0xF
        else:
            q = tl.load(q_ptr + col_off * stride_q + k[None, :], mask=tile_ok, other=0)
        if HAS_G_IDX:
            group = tl.load(g_ptr + k, mask=k_ok, other=0)
        else:
            group = k // group_size
        scale = tl.load(s_ptr + col_off * stride_s + group[None, :], mask=tile_ok, other=0.0)
        zero = tl.load(z_ptr + col_off * stride_s + group[None, :], mask=tile_ok, other=0)
        w = ((q.to(tl.float32) - zero.to(tl.float32)) * scale).to(x.dtype)  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def int_quant_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 g_idx: torch.Tensor | None, bits: int) -> torch.Tensor:
    """x [M, K] bf16/fp16 -> [M, N] in x's dtype, W in int_quant's layout (qweight [N, K * bits / 8])."""
    x = x.contiguous()
    num_rows, num_inner = x.shape
    num_cols = qweight.shape[0]
    assert qweight.shape[1] * 8 // bits == num_inner, (qweight.shape, x.shape)
    y = torch.empty(num_rows, num_cols, dtype=x.dtype, device=x.device)
    block_m = 16 if num_rows <= 16 else 64
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(num_cols, 64))
    _int_quant_kernel[grid](
        x, qweight, scales, zeros, g_idx if g_idx is not None else scales, y, num_rows, num_cols, num_inner,
        num_inner // scales.shape[1], x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        BITS=bits, HAS_G_IDX=g_idx is not None, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=BLOCK_K)
    return y
