"""Triton kernels for FP8 linear layers: dynamic per-token activation quantization (and with a
static scale), and a scaled e4m3 GEMM for the batch sizes where it beats torch._scaled_mm.

The quantization holds a row of x in registers (up to ONE_PASS_MAX_COLS elements; wider rows
are read twice, the second time from L2), takes its absolute maximum, and stores x / scale.
It computes the scale and divides as kernels/fp8.py does (float32 product with FP8_MAX_INV,
then `div_rn`), so both produce the same bytes.

The GEMM computes y = (qx @ qw.T) * sx * sw with qx [M, K] and qw [N, K] both K-contiguous
(the layout the Hopper fp8 tensor-core instructions read), float32 accumulation and one
rounding to the output dtype. Out-of-range rows and columns are clamped to valid ones for the
loads (no masks in the inner loop) and masked at the store; K must be a multiple of BLOCK_K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fitserve.kernels import fp8, pdl
from fitserve.kernels.pdl import begin

ONE_PASS_MAX_COLS = 16384  # rows up to this width stay in registers (Llama-3-8B's widest input: 14336)
TWO_PASS_BLOCK = 4096  # elements per step for wider rows


@triton.jit
def _quant_per_token_kernel(
    x_ptr, q_ptr, scale_ptr, num_cols, stride_x, stride_q,
    BLOCK: tl.constexpr, ONE_PASS: tl.constexpr, FP8_MAX: tl.constexpr, FP8_MAX_INV: tl.constexpr,
    MIN_SCALE: tl.constexpr,
    PDL: tl.constexpr,
):
    begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    if ONE_PASS:  # the whole row in registers: one read
        offs = tl.arange(0, BLOCK)
        mask = offs < num_cols
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0) * FP8_MAX_INV, MIN_SCALE)
        tl.store(scale_ptr + row, scale)
        q = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX)
        tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        return
    running = tl.zeros([BLOCK], tl.float32)
    for start in range(0, num_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < num_cols, other=0.0).to(tl.float32)
        running = tl.maximum(running, tl.abs(x))
    scale = tl.maximum(tl.max(running, axis=0) * FP8_MAX_INV, MIN_SCALE)
    tl.store(scale_ptr + row, scale)
    for start in range(0, num_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < num_cols
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        q = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX)
        tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=mask)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] (bf16/fp16/fp32, rows contiguous) -> (q [T, K] fp8, scale [T, 1] float32), as fp8.quantize_per_row."""
    assert x.dim() == 2 and x.stride(1) == 1
    num_rows, num_cols = x.shape
    q = torch.empty(num_rows, num_cols, dtype=fp8.FP8_DTYPE, device=x.device)
    scale = torch.empty(num_rows, 1, dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return q, scale
    one_pass = num_cols <= ONE_PASS_MAX_COLS
    block = triton.next_power_of_2(num_cols) if one_pass else TWO_PASS_BLOCK
    _quant_per_token_kernel[(num_rows,)](
        x, q, scale, num_cols, x.stride(0), q.stride(0),
        BLOCK=block, ONE_PASS=one_pass, FP8_MAX=fp8.FP8_MAX, FP8_MAX_INV=fp8.FP8_MAX_INV, MIN_SCALE=fp8.MIN_SCALE,
        num_warps=max(1, min(16, block // 1024)), **pdl.options(x.device),  # about 8 elements per thread
    )
    return q, scale


@triton.jit
def _quant_static_kernel(x_ptr, q_ptr, scale_ptr, num_elements, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr,
                         PDL: tl.constexpr):
    begin(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_elements
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q = tl.clamp(tl.math.div_rn(x, tl.load(scale_ptr)), -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty), mask=mask)


STATIC_QUANT_BLOCK = 2048


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (contiguous, any float dtype) / scale ([] or [1] float32, on x's device) -> e4m3, saturating:
    fp8.quantize's bytes in one kernel (a calibrated static input scale of `fp8_per_tensor`)."""
    assert x.is_contiguous() and scale.numel() == 1 and scale.dtype == torch.float32
    q = torch.empty(x.shape, dtype=fp8.FP8_DTYPE, device=x.device)
    if x.numel():
        _quant_static_kernel[(triton.cdiv(x.numel(), STATIC_QUANT_BLOCK),)](
            x, q, scale, x.numel(), BLOCK=STATIC_QUANT_BLOCK, FP8_MAX=fp8.FP8_MAX, num_warps=4,
            **pdl.options(x.device))
    return q


@triton.jit
def apply_scales(acc, a_scale_ptr, b_scale_ptr, rows, cols, A_PER_ROW: tl.constexpr, B_PER_COL: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] float32 times the rows' and columns' scales (or the per-tensor ones)."""
    if A_PER_ROW:
        a_scale = tl.load(a_scale_ptr + rows)[:, None]
    else:
        a_scale = tl.load(a_scale_ptr)
    if B_PER_COL:
        b_scale = tl.load(b_scale_ptr + cols)[None, :]
    else:
        b_scale = tl.load(b_scale_ptr)
    return acc * a_scale * b_scale


@triton.jit
def _scaled_mm_kernel(
    a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, M, N, K,
    stride_am, stride_bn, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    A_PER_ROW: tl.constexpr, B_PER_COL: tl.constexpr,
    PDL: tl.constexpr,
):
    begin(PDL)
    # Grouped order: GROUP_M row blocks walk the same column blocks, so weight tiles hit L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_m % M).to(tl.int64)  # clamped: loads stay in bounds without masks
    cols = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + cols[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N], K-contiguous
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for _ in range(0, K, BLOCK_K):
        acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    c = apply_scales(acc, a_scale_ptr, b_scale_ptr, rows, cols, A_PER_ROW, B_PER_COL)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :], c.to(c_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True, slots=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


WIDE_OUTPUT_COLS = 16384  # gate_up-like: wide tiles have enough programs


def default_config(num_rows: int, num_cols: int, inner: int) -> GemmConfig:
    """Tiles by batch rows: thin tiles stream the weight for decode, square ones for prefill.

    The fastest of benchmarks/fp8_gemm_bench.py's candidates on the H200 for the Llama-3-8B
    shapes (docs/quantization.md); BLOCK_M 16 keeps decode on the exact-accumulating mma path.
    """
    block_k = next(b for b in (256, 128, 64, 32, 16) if inner % b == 0)
    if num_rows <= 16:
        if num_cols >= WIDE_OUTPUT_COLS:
            return GemmConfig(16, 128, min(block_k, 128), 4, 4)
        return GemmConfig(16, 32, block_k, 4, 5)
    if num_rows <= 64:
        return GemmConfig(64, 128, min(block_k, 128), 4, 4)
    return GemmConfig(128, 128, min(block_k, 128), 8, 3)


def scaled_mm(qx: torch.Tensor, x_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
              out_dtype: torch.dtype, config: GemmConfig | None = None) -> torch.Tensor:
    """qx [M, K] fp8, x_scale [M, 1] or [] float32; qw [N, K] fp8, w_scale [1, N] or [] float32
    -> [M, N] out_dtype; the function of fp8.scaled_mm_reference."""
    num_rows, inner = qx.shape
    num_cols = qw.shape[0]
    assert qw.shape[1] == inner and inner % 16 == 0 and qx.stride(1) == 1 and qw.stride(1) == 1
    assert x_scale.dtype == torch.float32 and w_scale.dtype == torch.float32
    a_per_row = x_scale.numel() != 1
    b_per_col = w_scale.numel() != 1
    assert not a_per_row or x_scale.numel() == num_rows
    assert not b_per_col or w_scale.numel() == num_cols
    out = torch.empty(num_rows, num_cols, dtype=out_dtype, device=qx.device)
    if num_rows == 0:
        return out
    cfg = config or default_config(num_rows, num_cols, inner)
    assert inner % cfg.block_k == 0, "K must be a multiple of BLOCK_K"
    grid = (triton.cdiv(num_rows, cfg.block_m) * triton.cdiv(num_cols, cfg.block_n),)
    _scaled_mm_kernel[grid](
        qx, qw, out, x_scale, w_scale, num_rows, num_cols, inner,
        qx.stride(0), qw.stride(0), out.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        A_PER_ROW=a_per_row, B_PER_COL=b_per_col, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **pdl.options(qx.device),
    )
    return out
