"""The GEMM of integer group-quantized weights (GPTQ, AWQ, compressed-tensors W4A16/W8A16) on CUDA.

y = x @ W.T with W in kernels/int_quant.py's layout (qweight [N, K * bits / 8] uint8, scales
float32 [N, G], zeros uint8 [N, G], g_idx for an act-order checkpoint). Three paths by rows:
- up to GEMV_MAX_ROWS (single-stream and small decode): a GEMV. Each program owns BLOCK_N
  output columns of one input row and walks K a few whole groups at a time, reading each packed
  byte once (both nibbles) and each group's scale and zero once, computing q * scale + offset
  in float32 in registers and summing across the tile once at the end. (Act-order and groups
  whose bytes are not a power of two take the tile GEMM.)
- up to GEMM_MAX_ROWS (decode batches): a tensor-core GEMM that dequantizes each tile once for
  all its rows. Without act-order and with a group a multiple of BLOCK_K, a tile of a row lies
  in one group, so its scale and zero are loaded once per row, not per weight.
- above (prefill, large decode batches): the layer is dequantized into a scratch buffer in
  slices of rows and multiplied by cuBLAS; the dequantization is a small share of that GEMM.
The GEMMs dequantize (q - zero) * scale in float32 and round it to x's dtype before the product
with float32 sums (the GEMV keeps the float32 weight): int_quant.int_quant_mm_reference is the specification (tests compare).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fitserve.kernels import pdl
from fitserve.kernels.pdl import begin

# Rows up to which the GEMV runs, and up to which the tile GEMM does; above, dequantize + cuBLAS.
# Benchmarks (benchmarks/int_quant_bench.py) may replace these and the configs to compare.
GEMV_MAX_ROWS = 1  # the GEMV dequantizes once per row: at 2 rows the tile GEMM is as fast (H200)
GEMM_MAX_ROWS = 256
GEMV_CONFIG = (8, 8, 4)  # (BLOCK_N output columns, GROUPS_PER_TILE, num_warps)
GEMM_CONFIG = (64, 64, 4, 2)  # (BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_M from the rows
SWAP_MAX_ROWS = 64  # up to here the tile GEMM takes W @ x.T (SWAP_CONFIG)
SWAP_CONFIG = (64, 64, 4, 2)
SCRATCH_ELEMENTS = 1 << 25  # weights dequantized at a time for cuBLAS: 64 MiB of bf16


@triton.jit
def _groups_of(g_ptr, k, k_ok, group_size, HAS_G_IDX: tl.constexpr):
    if HAS_G_IDX:
        return tl.load(g_ptr + k, mask=k_ok, other=0)
    return k // group_size


@triton.jit
def _dequant(q, s_ptr, z_ptr, rows_off, groups, ok, stride_s, dtype):
    """(q - zero) * scale for q [BLOCK_N, T] and its groups [T], rounded to dtype, as float32."""
    scale = tl.load(s_ptr + rows_off * stride_s + groups[None, :], mask=ok, other=0.0)
    zero = tl.load(z_ptr + rows_off * stride_s + groups[None, :], mask=ok, other=0)
    return ((q.to(tl.float32) - zero.to(tl.float32)) * scale).to(dtype).to(tl.float32)


@triton.jit
def _int_quant_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, N, num_groups, stride_x, stride_q, stride_s, stride_y,
                           BITS: tl.constexpr, GROUP_BYTES: tl.constexpr, GROUPS_PER_TILE: tl.constexpr,
                           BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """One input row m against BLOCK_N output columns; a tile is GROUPS_PER_TILE whole groups of each
    column's packed bytes, so a column's scale and zero are loaded once per group."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1)
    col_ok = cols < N
    cols = tl.where(col_ok, cols, 0)  # out-of-range columns read column 0 and are not stored
    byte_in_group = tl.arange(0, GROUP_BYTES)
    begin(PDL)
    acc = tl.zeros([BLOCK_N, GROUPS_PER_TILE, GROUP_BYTES], dtype=tl.float32)
    for g0 in range(0, num_groups, GROUPS_PER_TILE):
        groups = g0 + tl.arange(0, GROUPS_PER_TILE)
        g_ok = groups < num_groups
        groups = tl.where(g_ok, groups, 0)
        byte = groups[:, None] * GROUP_BYTES + byte_in_group[None, :]  # [G, B] byte of each column's row
        packed = tl.load(q_ptr + cols[:, None, None].to(tl.int64) * stride_q + byte[None, :, :])
        at_group = cols[:, None] * stride_s + groups[None, :]
        scale = tl.where(g_ok[None, :], tl.load(s_ptr + at_group), 0.0)[:, :, None]  # [N, G, 1]
        offset = -tl.load(z_ptr + at_group).to(tl.float32)[:, :, None] * scale  # W = q * scale + offset
        if BITS == 4:  # byte b holds inputs 2b (low nibble) and 2b + 1
            x_lo = tl.load(x_ptr + m * stride_x + 2 * byte).to(tl.float32)[None, :, :]
            x_hi = tl.load(x_ptr + m * stride_x + 2 * byte + 1).to(tl.float32)[None, :, :]
            acc += ((packed & 0xF).to(tl.float32) * scale + offset) * x_lo
            acc += ((packed >> 4).to(tl.float32) * scale + offset) * x_hi
        else:
            x = tl.load(x_ptr + m * stride_x + byte).to(tl.float32)[None, :, :]
            acc += (packed.to(tl.float32) * scale + offset) * x
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(y_ptr + m * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _tile_weights(q, start, k, k_ok, s_ptr, z_ptr, g_ptr, cols, col_off, group_size, stride_s, dtype,
                  HAS_G_IDX: tl.constexpr, TILE_IN_GROUP: tl.constexpr):
    """Values q [BLOCK_N, T] of inputs k [T] -> weights in dtype."""
    if TILE_IN_GROUP:  # the tile's inputs share one group: one scale and zero per column
        group = start // group_size
        scale = tl.load(s_ptr + cols * stride_s + group)
        zero = tl.load(z_ptr + cols * stride_s + group).to(tl.float32)
        return ((q.to(tl.float32) - zero[:, None]) * scale[:, None]).to(dtype)
    return _dequant(q, s_ptr, z_ptr, col_off, _groups_of(g_ptr, k, k_ok, group_size, HAS_G_IDX),
                    k_ok[None, :], stride_s, dtype).to(dtype)


@triton.jit
def _mma(x, w, acc, SWAP: tl.constexpr):
    """acc + x @ w.T ([M, N]), or with SWAP acc + w @ x.T ([N, M]: the weight fills the MMA's tall side)."""
    if SWAP:
        return tl.dot(w, tl.trans(x), acc)
    return tl.dot(x, tl.trans(w), acc)


@triton.jit
def _int_quant_kernel(x_ptr, q_ptr, s_ptr, z_ptr, g_ptr, y_ptr, M, N, K, group_size,
                      stride_x, stride_q, stride_s, stride_y,
                      BITS: tl.constexpr, HAS_G_IDX: tl.constexpr, TILE_IN_GROUP: tl.constexpr, SWAP: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    cols = tl.where(col_ok, cols, 0)
    col_off = cols[:, None].to(tl.int64)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_x
    begin(PDL)
    dtype = x_ptr.dtype.element_ty
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        if BITS == 4:  # byte b holds inputs 2b and 2b + 1: two products, of the even and of the odd inputs
            b = start // 2 + tl.arange(0, BLOCK_K // 2)
            b_ok = b < K // 2
            packed = tl.load(q_ptr + col_off * stride_q + b[None, :], mask=b_ok[None, :], other=0)
            x_ok = row_ok[:, None] & b_ok[None, :]
            w = _tile_weights(packed & 0xF, start, 2 * b, b_ok, s_ptr, z_ptr, g_ptr, cols, col_off, group_size,
                              stride_s, dtype, HAS_G_IDX, TILE_IN_GROUP)
            acc = _mma(tl.load(x_rows + 2 * b[None, :], mask=x_ok, other=0.0), w, acc, SWAP)
            w = _tile_weights(packed >> 4, start, 2 * b + 1, b_ok, s_ptr, z_ptr, g_ptr, cols, col_off, group_size,
                              stride_s, dtype, HAS_G_IDX, TILE_IN_GROUP)
            acc = _mma(tl.load(x_rows + 2 * b[None, :] + 1, mask=x_ok, other=0.0), w, acc, SWAP)
        else:
            k = start + tl.arange(0, BLOCK_K)
            k_ok = k < K
            q = tl.load(q_ptr + col_off * stride_q + k[None, :], mask=k_ok[None, :], other=0)
            w = _tile_weights(q, start, k, k_ok, s_ptr, z_ptr, g_ptr, cols, col_off, group_size, stride_s, dtype,
                              HAS_G_IDX, TILE_IN_GROUP)
            acc = _mma(tl.load(x_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0), w, acc, SWAP)
    if SWAP:
        tl.store(y_ptr + rows[None, :].to(tl.int64) * stride_y + cols[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[None, :] & col_ok[:, None])
    else:
        tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, z_ptr, g_ptr, w_ptr, N, K, group_size, stride_q, stride_s, stride_w,
                    BITS: tl.constexpr, HAS_G_IDX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W [N, K] in w's dtype from the layout, a [BLOCK_N, BLOCK_K] tile a program."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    cols = tl.where(col_ok, cols, 0)
    col_off = cols[:, None].to(tl.int64)
    dtype = w_ptr.dtype.element_ty
    start = tl.program_id(1) * BLOCK_K
    if BITS == 4:
        b = start // 2 + tl.arange(0, BLOCK_K // 2)
        b_ok = b < K // 2
        ok = col_ok[:, None] & b_ok[None, :]
        packed = tl.load(q_ptr + col_off * stride_q + b[None, :], mask=b_ok[None, :], other=0)
        for half in tl.static_range(2):
            k = 2 * b + half
            w = _tile_weights((packed >> (4 * half)) & 0xF, start, k, b_ok, s_ptr, z_ptr, g_ptr, cols, col_off,
                              group_size, stride_s, dtype, HAS_G_IDX, False)
            tl.store(w_ptr + col_off * stride_w + k[None, :], w, mask=ok)
    else:
        k = start + tl.arange(0, BLOCK_K)
        k_ok = k < K
        q = tl.load(q_ptr + col_off * stride_q + k[None, :], mask=k_ok[None, :], other=0)
        w = _tile_weights(q, start, k, k_ok, s_ptr, z_ptr, g_ptr, cols, col_off, group_size, stride_s, dtype,
                          HAS_G_IDX, False)
        tl.store(w_ptr + col_off * stride_w + k[None, :], w, mask=col_ok[:, None] & k_ok[None, :])


def _common_args(x, qweight, scales, zeros, g_idx, bits):
    num_inner = x.shape[1]
    assert qweight.shape[1] * 8 // bits == num_inner, (qweight.shape, x.shape)
    assert qweight.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous()
    return (x, qweight, scales, zeros, g_idx if g_idx is not None else scales)


def gemv_takes(qweight: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None) -> bool:
    """Whether the GEMV takes this layer: groups in order whose packed bytes are a power of two."""
    group_bytes = qweight.shape[1] // scales.shape[1]
    return (g_idx is None and qweight.shape[1] % scales.shape[1] == 0
            and group_bytes & (group_bytes - 1) == 0 and group_bytes <= 256)


def gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
         g_idx: torch.Tensor | None, bits: int) -> torch.Tensor:
    """x [M, K] (a few rows) @ W.T -> [M, N] in x's dtype; W multiplied as float32 (not rounded to x's
    dtype: within the rounding of the reference). Layers gemv_takes refuses go to tile_gemm."""
    if not gemv_takes(qweight, scales, g_idx):
        return tile_gemm(x, qweight, scales, zeros, g_idx, bits)
    _common_args(x, qweight, scales, zeros, g_idx, bits)
    num_cols, num_groups = scales.shape
    block_n, groups_per_tile, num_warps = GEMV_CONFIG
    y = torch.empty(x.shape[0], num_cols, dtype=x.dtype, device=x.device)
    _int_quant_gemv_kernel[(triton.cdiv(num_cols, block_n), x.shape[0])](
        x, qweight, scales, zeros, y, num_cols, num_groups, x.stride(0), qweight.stride(0), scales.stride(0),
        y.stride(0), BITS=bits, GROUP_BYTES=qweight.shape[1] // num_groups,
        GROUPS_PER_TILE=min(groups_per_tile, triton.next_power_of_2(num_groups)), BLOCK_N=block_n,
        num_warps=num_warps, **pdl.options(x.device))
    return y


def tile_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              g_idx: torch.Tensor | None, bits: int) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N]: each weight tile dequantized once for BLOCK_M rows, tl.dot. Up to
    SWAP_MAX_ROWS rows the product is taken as W @ x.T, the weight tile on the MMA's tall side."""
    num_rows, num_inner = x.shape
    num_cols = qweight.shape[0]
    group_size = num_inner // scales.shape[1]
    swap = num_rows <= SWAP_MAX_ROWS
    block_n, block_k, num_warps, num_stages = GEMM_CONFIG if not swap else SWAP_CONFIG
    block_m = max(16, min(64, triton.next_power_of_2(num_rows)))
    y = torch.empty(num_rows, num_cols, dtype=x.dtype, device=x.device)
    _int_quant_kernel[(triton.cdiv(num_rows, block_m), triton.cdiv(num_cols, block_n))](
        *_common_args(x, qweight, scales, zeros, g_idx, bits), y, num_rows, num_cols, num_inner, group_size,
        x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        BITS=bits, HAS_G_IDX=g_idx is not None,
        TILE_IN_GROUP=g_idx is None and group_size % block_k == 0 and num_inner % block_k == 0, SWAP=swap,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
        **pdl.options(x.device))
    return y


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor | None,
               bits: int, dtype: torch.dtype) -> torch.Tensor:
    """int_quant.dequantize on CUDA: W [N, K] in dtype."""
    num_cols, num_inner = qweight.shape[0], qweight.shape[1] * 8 // bits
    weight = torch.empty(num_cols, num_inner, dtype=dtype, device=qweight.device)
    _dequant_kernel[(triton.cdiv(num_cols, 32), triton.cdiv(num_inner, 128))](
        qweight, scales, zeros, g_idx if g_idx is not None else scales, weight, num_cols, num_inner,
        num_inner // scales.shape[1], qweight.stride(0), scales.stride(0), weight.stride(0),
        BITS=bits, HAS_G_IDX=g_idx is not None, BLOCK_N=32, BLOCK_K=128, num_warps=4)
    return weight


def dequantized_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     g_idx: torch.Tensor | None, bits: int) -> torch.Tensor:
    """x [M, K] @ W.T for many rows: W dequantized a slice of output columns at a time, then cuBLAS."""
    num_cols, num_inner = qweight.shape[0], x.shape[1]
    y = torch.empty(x.shape[0], num_cols, dtype=x.dtype, device=x.device)
    step = max(1, SCRATCH_ELEMENTS // num_inner)
    for start in range(0, num_cols, step):
        end = min(num_cols, start + step)
        weight = dequantize(qweight[start:end], scales[start:end], zeros[start:end], g_idx, bits, x.dtype)
        torch.matmul(x, weight.t(), out=y[:, start:end])
    return y


def int_quant_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 g_idx: torch.Tensor | None, bits: int) -> torch.Tensor:
    """x [M, K] bf16/fp16 -> [M, N] in x's dtype, W in int_quant's layout, by the path for M rows."""
    x = x.contiguous()
    if x.shape[0] <= GEMV_MAX_ROWS:
        return gemv(x, qweight, scales, zeros, g_idx, bits)
    if x.shape[0] <= GEMM_MAX_ROWS:
        return tile_gemm(x, qweight, scales, zeros, g_idx, bits)
    return dequantized_gemm(x, qweight, scales, zeros, g_idx, bits)
