"""FP8 GEMMs for decode batches (1 to 32 rows): a split-K scaled GEMM and a one-row GEMV.

Both compute fp8.scaled_mm_reference: y = (qx @ qw.T) * sx * sw with qx [M, K] and qw [N, K]
e4m3, K-contiguous, exact float32 accumulation and one rounding to the output dtype.

- Split-K: at few rows the narrow layers (N 4096-6144) have fewer output tiles than the card
  has SMs, so each program of triton_fp8's GEMM streams a long K alone. Here the grid is
  (output tiles, SPLIT_K): each program sums its run of K blocks with tl.dot (BLOCK_M <= 32
  keeps it on the exact mma.sync path) into partials [SPLIT_K, M, N] float32, and a reduce
  kernel adds them in split order, applies both scales and casts. Fixed order: the bytes are
  the same run to run (no atomics). With SPLIT_K 1 the GEMM kernel stores the output itself.
- GEMV (one row): CUDA cores, no tensor cores; each program owns BLOCK_N weight rows and walks
  K in BLOCK_K-wide contiguous runs, as kernels/triton_gemv.py does for bf16.
- Swap-AB (2 to 32 rows, what the table picks): C^T = W X^T, so the weight's rows fill the MMA's
  M side (64, Hopper's wgmma) and the few batch rows its N side; split over K in the same way
  where the output tiles leave SMs idle. wgmma accumulates fp8 products in fewer bits than
  float32, so the kernel moves its sums into the float32 accumulator every 32 products of K
  (tl.dot's max_num_imprecise_acc): 4e-5 relative error over K = 14336 against the exact
  reference, where torch's row-wise _scaled_mm with fast accumulation (past 32 rows) gives 1e-3.

Both allocate their workspace with torch inside the call and never sync: CUDA-graph safe.
`plan` picks a kernel by rows from SMALL_M_TABLE (see there); the split-K kernel (exact sums
on mma.sync) stays for the benchmarks' sweeps and as a table choice.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from fitserve.kernels import pdl
from fitserve.kernels.pdl import begin
from fitserve.kernels.triton_fp8 import apply_scales
from fitserve.kernels.triton_gemv import row_dot

MMA_SYNC_MAX_BLOCK_M = 32  # 64-row tiles go to Hopper's wgmma, whose fp8 sums Triton keeps imprecise
MAX_SPLIT_K = 16
MIN_BLOCK_K = 32  # fp8 mma.sync takes K in steps of 32


# The batch rows and K-block counts vary from call to call: no recompile per value.
@triton.jit(do_not_specialize=["M", "num_k_blocks", "blocks_per_split"])
def _splitk_kernel(
    a_ptr, b_ptr, c_ptr, part_ptr, a_scale_ptr, b_scale_ptr, M, N, num_k_blocks, blocks_per_split,
    stride_am, stride_bn, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    A_PER_ROW: tl.constexpr, B_PER_COL: tl.constexpr,
    PDL: tl.constexpr,
):
    begin(PDL)
    # Axis 0 walks M tiles fastest: the few M tiles of one weight tile run together (L2 reuse).
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    pid_n = tl.program_id(0) // num_m
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_m % M).to(tl.int64)  # clamped: loads stay in bounds without masks
    cols = (offs_n % N).to(tl.int64)
    first_block = split * blocks_per_split
    last_block = tl.minimum(first_block + blocks_per_split, num_k_blocks)
    offs_k = first_block.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + cols[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N], K-contiguous
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for _ in range(first_block, last_block):  # empty for a trailing split past K: stores zeros
        acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    _store_tile(acc, offs_m, offs_n, rows, cols, split, M, N, c_ptr, part_ptr, a_scale_ptr, b_scale_ptr, stride_cm,
                SPLIT_K, A_PER_ROW, B_PER_COL)


@triton.jit
def _store_tile(acc, offs_m, offs_n, rows, cols, split, M, N, c_ptr, part_ptr, a_scale_ptr, b_scale_ptr, stride_cm,
                SPLIT_K: tl.constexpr, A_PER_ROW: tl.constexpr, B_PER_COL: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] float32 of output rows offs_m and columns offs_n (rows, cols: the same,
    clamped in bounds): scaled and cast into C with one split, else into this split's partials."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        c = apply_scales(acc, a_scale_ptr, b_scale_ptr, rows, cols, A_PER_ROW, B_PER_COL)
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, c.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        part = part_ptr + (split.to(tl.int64) * M + offs_m.to(tl.int64)[:, None]) * N + offs_n[None, :]
        tl.store(part, acc, mask=mask)


# The batch rows and K-block counts vary from call to call: no recompile per value.
@triton.jit(do_not_specialize=["M", "num_k_blocks", "blocks_per_split"])
def _swap_ab_kernel(
    a_ptr, b_ptr, c_ptr, part_ptr, a_scale_ptr, b_scale_ptr, M, N, num_k_blocks, blocks_per_split,
    stride_am, stride_bn, stride_cm,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    A_PER_ROW: tl.constexpr, B_PER_COL: tl.constexpr, PROMOTE_EVERY: tl.constexpr,
    PDL: tl.constexpr,
):
    """C^T = W X^T: the weight's BLOCK_N rows are the MMA's M side (64 or 128: Hopper's wgmma),
    the batch's <= BLOCK_T rows its N side, so a few rows waste no tensor-core rows. The fp8
    sums are moved into the float32 accumulator every PROMOTE_EVERY products of K (wgmma's own
    fp8 accumulation keeps fewer bits)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    cols = (offs_n % N).to(tl.int64)
    rows = (offs_t % M).to(tl.int64)  # clamped: loads stay in bounds without masks
    first_block = split * blocks_per_split
    last_block = tl.minimum(first_block + blocks_per_split, num_k_blocks)
    begin(PDL)
    offs_k = first_block.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    w_ptrs = b_ptr + cols[:, None] * stride_bn + offs_k[None, :]  # [BLOCK_N, BLOCK_K], K-contiguous
    x_ptrs = a_ptr + rows[None, :] * stride_am + offs_k[:, None]  # [BLOCK_K, BLOCK_T], K-contiguous
    acc = tl.zeros([BLOCK_N, BLOCK_T], tl.float32)
    for _ in range(first_block, last_block):
        acc = tl.dot(tl.load(w_ptrs), tl.load(x_ptrs), acc, max_num_imprecise_acc=PROMOTE_EVERY)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    _store_tile(tl.trans(acc), offs_t, offs_n, rows, cols, split, M, N, c_ptr, part_ptr, a_scale_ptr, b_scale_ptr,
                stride_cm, SPLIT_K, A_PER_ROW, B_PER_COL)


@triton.jit(do_not_specialize=["M"])
def _splitk_reduce_kernel(
    part_ptr, c_ptr, a_scale_ptr, b_scale_ptr, M, N, stride_cm,
    BLOCK: tl.constexpr, SPLIT_K: tl.constexpr, A_PER_ROW: tl.constexpr, B_PER_COL: tl.constexpr,
    PDL: tl.constexpr,
):
    begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs_n < N
    acc = tl.zeros([BLOCK], tl.float32)
    for split in tl.static_range(SPLIT_K):  # fixed order: deterministic sums
        acc += tl.load(part_ptr + (split * M + row) * N + offs_n, mask=mask, other=0.0)
    if A_PER_ROW:
        acc = acc * tl.load(a_scale_ptr + row)
    else:
        acc = acc * tl.load(a_scale_ptr)
    if B_PER_COL:
        acc = acc * tl.load(b_scale_ptr + offs_n, mask=mask, other=0.0)
    else:
        acc = acc * tl.load(b_scale_ptr)
    tl.store(c_ptr + row * stride_cm + offs_n, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, y_ptr, x_scale_ptr, w_scale_ptr, N, K, stride_w,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, B_PER_COL: tl.constexpr,
    PDL: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid = rows < N
    rows = tl.where(row_valid, rows, 0).to(tl.int64)  # out-of-range rows read row 0 and are not stored
    begin(PDL)
    y = row_dot(x_ptr, w_ptr, rows, K, stride_w, BLOCK_N, BLOCK_K, EVEN_K)  # fp8 products are exact in float32
    y = y * tl.load(x_scale_ptr)
    if B_PER_COL:
        y = y * tl.load(w_scale_ptr + rows)
    else:
        y = y * tl.load(w_scale_ptr)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_valid)


@dataclass(frozen=True, slots=True)
class SplitKConfig:
    block_m: int  # 16 or 32: the mma.sync path (MMA_SYNC_MAX_BLOCK_M)
    block_n: int
    block_k: int
    split_k: int  # 0: enough splits to give every SM a program (auto_split_k)
    num_warps: int = 4
    num_stages: int = 4


@dataclass(frozen=True, slots=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int


@dataclass(frozen=True, slots=True)
class SwapABConfig:
    block_n: int  # weight rows per program: 64 or 128 (wgmma's M)
    block_t: int  # batch rows per program (>= the batch): 16 or 32
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 4
    promote_every: int = 32  # K products between moves into the float32 accumulator


@dataclass(frozen=True, slots=True)
class SmallMChoice:
    """One row of SMALL_M_TABLE: `kernel` ("gemv", "split_k" or "swap_ab") for batches of up to max_rows."""

    max_rows: int
    kernel: str
    config: SplitKConfig | GemvConfig | SwapABConfig
    # split_k: only where the output tiles alone leave SMs idle (else the general GEMMs);
    # swap_ab: its split_k only there, one split elsewhere
    only_if_underfilled: bool


# From benchmarks/fp8_decode_bench.py, which times each shape's 32 layers in one CUDA graph
# (results/fp8_decode_h200_89e7e1c.json): at 1 row the GEMV with 4 rows x 1024 per program took
# 2.16 ms for the 128 layers against 2.62 ms for the first, unmeasured choice (8 x 2048, 8 warps).
# At 24 rows (--swap-ab, results/fp8_decode_swap_ab_h200_1b894a4.json) swap-AB 64 x 32 x 128, 4
# stages, 4 splits where the tiles underfill the chip (qkv, o, down) and one elsewhere (gate_up):
# 0.34 + 0.28 + 1.04 + 0.64 = 2.30 ms, against 2.50 ms for mma.sync split-K 32 x 64 x 128 in 4
# slices with gate_up on torch's row-wise _scaled_mm, and 4.11 ms for bf16 cuBLAS.
# Rows past the table go to triton_fp8 / torch._scaled_mm.
SMALL_M_TABLE: tuple[SmallMChoice, ...] = (
    SmallMChoice(1, "gemv", GemvConfig(4, 1024, 4), only_if_underfilled=False),
    SmallMChoice(32, "swap_ab", SwapABConfig(64, 32, 128, 4), only_if_underfilled=True),
)


@functools.cache
def num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def output_tiles(num_rows: int, num_cols: int, cfg: SplitKConfig) -> int:
    return triton.cdiv(num_rows, cfg.block_m) * triton.cdiv(num_cols, cfg.block_n)


def auto_split_k(num_rows: int, num_cols: int, inner: int, cfg: SplitKConfig, sms: int) -> int:
    """The smallest power of two giving at least one program per SM, within MAX_SPLIT_K and
    at least one K block per split."""
    wanted = triton.cdiv(sms, output_tiles(num_rows, num_cols, cfg))
    split = min(triton.next_power_of_2(wanted), MAX_SPLIT_K)
    return max(1, min(split, inner // cfg.block_k))


def plan(num_rows: int, num_cols: int, inner: int, sms: int) -> SmallMChoice | None:
    """The table row for this product, with split_k resolved; None: use the general GEMMs.
    Fp8Linear asks on every call: the answer is kept per table and shape."""
    return _plan(SMALL_M_TABLE, num_rows, num_cols, inner, sms)


@functools.lru_cache(maxsize=4096)
def _plan(table: tuple[SmallMChoice, ...], num_rows: int, num_cols: int, inner: int, sms: int) -> SmallMChoice | None:
    for choice in table:
        if num_rows > choice.max_rows:
            continue
        cfg = choice.config
        if isinstance(cfg, GemvConfig):
            return choice if num_rows == 1 else None
        block_k = cfg.block_k
        while inner % block_k:  # halve for a K the table's tile does not divide (K is a multiple of 16)
            block_k //= 2
        if block_k < MIN_BLOCK_K:
            return None
        if isinstance(cfg, SwapABConfig):
            filled = triton.cdiv(num_cols, cfg.block_n) >= sms
            split = 1 if filled and choice.only_if_underfilled else cfg.split_k
            return replace(choice, config=replace(cfg, block_k=block_k, split_k=split))
        if choice.only_if_underfilled and output_tiles(num_rows, num_cols, cfg) >= sms:
            return None
        cfg = replace(cfg, block_k=block_k)
        return replace(choice, config=replace(cfg, split_k=cfg.split_k or auto_split_k(num_rows, num_cols, inner, cfg, sms)))
    return None


def _check(qx: torch.Tensor, x_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor) -> tuple[bool, bool]:
    """Shapes, strides and scale forms, as triton_fp8.scaled_mm takes them -> (a_per_row, b_per_col)."""
    num_rows, inner = qx.shape
    num_cols = qw.shape[0]
    assert qw.shape[1] == inner and qx.stride(1) == 1 and qw.stride(1) == 1, "K-contiguous [M, K] and [N, K]"
    assert x_scale.dtype == torch.float32 and w_scale.dtype == torch.float32
    assert x_scale.is_contiguous() and w_scale.is_contiguous()
    # [M, 1] and [1, N] scales take the per-row / per-column form even at one row or column, so
    # that one compiled kernel serves every batch size; [] or [1] is per tensor.
    a_per_row = x_scale.dim() == 2 or x_scale.numel() != 1
    b_per_col = w_scale.dim() == 2 or w_scale.numel() != 1
    assert not a_per_row or x_scale.numel() == num_rows, "x_scale: [M, 1] or one value"
    assert not b_per_col or w_scale.numel() == num_cols, "w_scale: [1, N] or one value"
    return a_per_row, b_per_col


def scaled_mm_split_k(qx: torch.Tensor, x_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
                      out_dtype: torch.dtype, config: SplitKConfig) -> torch.Tensor:
    """qx [M, K] fp8, x_scale [M, 1] or [] float32; qw [N, K] fp8, w_scale [1, N] or [] float32
    -> [M, N] out_dtype; fp8.scaled_mm_reference. K must be a multiple of BLOCK_K (splits may be
    uneven: a split takes cdiv(K / BLOCK_K, SPLIT_K) blocks, the last fewer)."""
    cfg = config
    assert cfg.block_m <= MMA_SYNC_MAX_BLOCK_M and cfg.split_k >= 1
    grid = (output_tiles(qx.shape[0], qw.shape[0], cfg), cfg.split_k)
    return _split_k_gemm(_splitk_kernel, grid, qx, x_scale, qw, w_scale, out_dtype, cfg.block_k, cfg.split_k,
                         BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _split_k_gemm(kernel, grid: tuple[int, int], qx: torch.Tensor, x_scale: torch.Tensor, qw: torch.Tensor,
                  w_scale: torch.Tensor, out_dtype: torch.dtype, block_k: int, split_k: int, **meta) -> torch.Tensor:
    """Launch a split-over-K GEMM kernel (_splitk_kernel or _swap_ab_kernel: the same arguments but
    for `meta`'s tile) and, with several splits, the reduce kernel after it."""
    a_per_row, b_per_col = _check(qx, x_scale, qw, w_scale)
    num_rows, inner = qx.shape
    num_cols = qw.shape[0]
    assert inner % block_k == 0, f"K ({inner}) must be a multiple of BLOCK_K ({block_k})"
    out = torch.empty(num_rows, num_cols, dtype=out_dtype, device=qx.device)
    if num_rows == 0:
        return out
    num_k_blocks = inner // block_k
    per_split = triton.cdiv(num_k_blocks, split_k)
    # [SPLIT_K, M, N] float32 partial sums (unused with one split: the GEMM kernel stores `out`)
    part = torch.empty((split_k, num_rows, num_cols) if split_k > 1 else (1,), dtype=torch.float32, device=qx.device)
    kernel[grid](qx, qw, out, part, x_scale, w_scale, num_rows, num_cols, num_k_blocks, per_split,
                 qx.stride(0), qw.stride(0), out.stride(0), BLOCK_K=block_k, SPLIT_K=split_k,
                 A_PER_ROW=a_per_row, B_PER_COL=b_per_col, **meta, **pdl.options(qx.device))
    if split_k > 1:
        block = min(1024, triton.next_power_of_2(num_cols))
        _splitk_reduce_kernel[(num_rows, triton.cdiv(num_cols, block))](
            part, out, x_scale, w_scale, num_rows, num_cols, out.stride(0),
            BLOCK=block, SPLIT_K=split_k, A_PER_ROW=a_per_row, B_PER_COL=b_per_col, num_warps=4,
            **pdl.options(qx.device),
        )
    return out


def scaled_mm_swap_ab(qx: torch.Tensor, x_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
                      out_dtype: torch.dtype, config: SwapABConfig) -> torch.Tensor:
    """scaled_mm_split_k's contract for at most config.block_t rows, with the weight on wgmma's M side."""
    cfg = config
    assert qx.shape[0] <= cfg.block_t and cfg.split_k >= 1
    grid = (triton.cdiv(qw.shape[0], cfg.block_n), cfg.split_k)
    return _split_k_gemm(_swap_ab_kernel, grid, qx, x_scale, qw, w_scale, out_dtype, cfg.block_k, cfg.split_k,
                         BLOCK_N=cfg.block_n, BLOCK_T=cfg.block_t, PROMOTE_EVERY=cfg.promote_every,
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def gemv(qx: torch.Tensor, x_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
         out_dtype: torch.dtype, config: GemvConfig) -> torch.Tensor:
    """qx [1, K] fp8 with x_scale [1, 1] or [] float32; qw [N, K] fp8 with w_scale [1, N] or []
    -> [1, N] out_dtype; fp8.scaled_mm_reference at one row (any K)."""
    _, b_per_col = _check(qx, x_scale, qw, w_scale)
    assert qx.shape[0] == 1 and qw.is_contiguous(), "gemv takes one row and a contiguous weight"
    num_cols, inner = qw.shape
    block_k = min(config.block_k, triton.next_power_of_2(inner))
    out = torch.empty(1, num_cols, dtype=out_dtype, device=qx.device)
    _gemv_kernel[(triton.cdiv(num_cols, config.block_n),)](
        qx, qw, out, x_scale, w_scale, num_cols, inner, qw.stride(0),
        BLOCK_N=config.block_n, BLOCK_K=block_k, EVEN_K=inner % block_k == 0, B_PER_COL=b_per_col,
        num_warps=config.num_warps, **pdl.options(qx.device),
    )
    return out


def run(choice: SmallMChoice, qx: torch.Tensor, x_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
        out_dtype: torch.dtype) -> torch.Tensor:
    """The product by a `plan` result."""
    if isinstance(choice.config, GemvConfig):
        return gemv(qx, x_scale, qw, w_scale, out_dtype, choice.config)
    if isinstance(choice.config, SwapABConfig):
        return scaled_mm_swap_ab(qx, x_scale, qw, w_scale, out_dtype, choice.config)
    return scaled_mm_split_k(qx, x_scale, qw, w_scale, out_dtype, choice.config)
