"""FP8 weights on GPUs without FP8 tensor cores (compute capability below 8.9: A100, A10, RTX 3090).

y = (x @ W.T) * s for x [M, K] in bf16/fp16, W [N, K] stored as e4m3 bytes and s its float32
scale per output channel [1, N] (or one scale []). The weight is read as uint8 and widened in
registers by bit operations, never with the fp8 conversion instructions those cards lack: the
e4m3 bits (sign, 4 exponent bits of bias 7, 3 mantissa bits) moved into an fp16's places give
the value times 2^-8 (fp16's bias is 15), for subnormals too, so one multiplication by 256
restores it exactly. Every e4m3 value is exact in fp16 and in bf16, so the tensor cores then
multiply x by exactly the stored weight; sums in float32, the scale after the sum, one rounding
(kernels/fp8.py weight_only_mm_reference is the specification).

What it buys is memory: a weight takes one byte a value, as on an FP8 card, while the
arithmetic stays 16-bit. Up to GEMV_MAX_ROWS rows (single-stream decode) a GEMV reads each weight
byte once, multiplying in float32 (the exact weight times x, so only the summation order differs
from the tensor cores'); more rows take one tile GEMM, a decode batch padded to 16 rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fitserve.kernels import pdl
from fitserve.kernels.pdl import begin

BLOCK_K = 64
GEMV_MAX_ROWS = 4
GEMV_CONFIG = (4, 1024, 4)  # (BLOCK_N, BLOCK_K, num_warps): an H200's fastest of four; benchmarks may replace it


@triton.jit
def _e4m3_bits_to_fp16(bits):
    """uint8 e4m3 bits -> the same values in fp16 (exact)."""
    wide = bits.to(tl.uint16)
    moved = ((wide & 0x80) << 8) | ((wide & 0x7F) << 7)
    return moved.to(tl.float16, bitcast=True) * 256.0


@triton.jit
def _w8a16_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y,
                  PER_TENSOR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + offs_k
        k_ok = k < K
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        bits = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_w + k[None, :],
                       mask=col_ok[:, None] & k_ok[None, :], other=0)
        w = _e4m3_bits_to_fp16(bits).to(x.dtype)  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(x, tl.trans(w), acc)
    if PER_TENSOR:
        acc = acc * tl.load(s_ptr)
    else:
        acc = acc * tl.load(s_ptr + cols, mask=col_ok, other=0.0)[None, :]
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _w8a16_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_x, stride_w, stride_y, PER_TENSOR: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1)
    col_ok = cols < N
    cols = tl.where(col_ok, cols, 0)  # out-of-range columns read column 0 and are not stored
    begin(PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        k_ok = k < K
        bits = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_w + k[None, :], mask=k_ok[None, :], other=0)
        x = tl.load(x_ptr + m * stride_x + k, mask=k_ok, other=0.0).to(tl.float32)
        acc += _e4m3_bits_to_fp16(bits).to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if PER_TENSOR:
        y = y * tl.load(s_ptr)
    else:
        y = y * tl.load(s_ptr + cols)
    tl.store(y_ptr + m * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=col_ok)


def gemv(x: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """weight_only_mm for a few rows: each weight byte read once per row."""
    num_cols, num_inner = qw.shape
    block_n, block_k, num_warps = GEMV_CONFIG
    y = torch.empty(x.shape[0], num_cols, dtype=x.dtype, device=x.device)
    w_bits = qw.view(torch.uint8)
    _w8a16_gemv_kernel[(triton.cdiv(num_cols, block_n), x.shape[0])](
        x, w_bits, w_scale, y, num_cols, num_inner, x.stride(0), w_bits.stride(0), y.stride(0),
        PER_TENSOR=w_scale.numel() == 1, BLOCK_N=block_n, BLOCK_K=min(block_k, triton.next_power_of_2(num_inner)),
        num_warps=num_warps, **pdl.options(x.device))
    return y


def weight_only_mm(x: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16/fp16, qw [N, K] float8_e4m3fn, w_scale [1, N] or [] float32 -> [M, N] in x's dtype."""
    assert x.dim() == 2 and qw.dim() == 2 and x.shape[1] == qw.shape[1], (x.shape, qw.shape)
    x = x.contiguous()
    if x.shape[0] <= GEMV_MAX_ROWS:
        return gemv(x, qw, w_scale)
    num_rows, num_cols = x.shape[0], qw.shape[0]
    y = torch.empty(num_rows, num_cols, dtype=x.dtype, device=x.device)
    block_m = 16 if num_rows <= 16 else 64
    block_n = 64
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(num_cols, block_n))
    w_bits = qw.view(torch.uint8)
    _w8a16_kernel[grid](x, w_bits, w_scale, y, num_rows, num_cols, x.shape[1], x.stride(0), w_bits.stride(0),
                        y.stride(0), PER_TENSOR=w_scale.numel() == 1, BLOCK_M=block_m, BLOCK_N=block_n,
                        BLOCK_K=BLOCK_K)
    return y
