"""Decode GEMV over packed GGUF blocks: y = x @ W.T, W read as the file stores it.

At decode a linear layer is a pure read of its weight, so reading 4.5 bits per weight (Q4_K)
instead of 16 is the whole gain. Each program owns BLOCK_N output rows of one input row and walks
K a few whole GGML blocks at a time. A tile is [BLOCK_N, blocks, sub-blocks, weights]: each
sub-block's scale and offset (from the block's d, dmin and packed scales: kernels/gguf.py's
layouts, a constexpr switch) are computed once, then every weight is its quant bits times the
scale plus the offset, in float32 in registers, multiplied and summed across the tile at the end. A decode
batch of a few rows more takes the small GEMM, which dequantizes each tile once and multiplies all rows
with tl.dot; from DEQUANT_MIN_ROWS rows (larger decode batches, prefill) `dequant_mm` dequantizes the whole
layer once into a scratch buffer of the activations' dtype and calls cuBLAS.

The specification is kernels/gguf.py `matmul_reference` (tests compare, also under the Triton
interpreter on the CPU). A Q4_K layer served in 16 bits does not come here: layers/formats/gguf.py holds
it in the integer kernels' K-quant form (kernels/int_quant.py, triton_int_words.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fitserve.kernels import gguf, pdl
from fitserve.kernels.pdl import begin
from fitserve.kernels.triton_int_quant import dequant_scratch
from fitserve.plan.estimates import GGUF_DEQUANT_MIN_ROWS

# Rows up to which a batch takes the GEMV (each program dequantizes its tile once per input row);
# up to GEMM_MAX_ROWS the small-batch GEMM (one dequantized tile, tl.dot over all rows); above,
# dequantizing the layer once into a scratch buffer for cuBLAS costs less than its share of the
# step. benchmarks/gguf_gemv_bench.py times them and may replace the configs.
GEMV_MAX_ROWS = 3
GEMM_MAX_ROWS = 64
# From this many rows (16-bit activations) `dequant_mm`: the whole weight dequantized once into the shared
# scratch of kernels/triton_int_quant.py, then cuBLAS; below it the small GEMM (plan/estimates.py counts the
# scratch). The small GEMM made Llama-3-8B Q4_K_M's W1 (20 rows) 3.5x slower than bf16 on an H100
# (docs/performance.md).
DEQUANT_MIN_ROWS = GGUF_DEQUANT_MIN_ROWS
# Weights dequantized at a time for a prefill in float32 (kernels/gguf.py's torch dequantizer, then the
# serving dtype): with its temporaries a few hundred MB of scratch, whatever K
PREFILL_CHUNK_ELEMENTS = 1 << 24
DEQUANT_TILE = (16, 256, 4)  # (BLOCK_N rows, weights along K, num_warps) of `_gguf_dequant_kernel`
# (BLOCK_N output rows, weights per tile along K, num_warps) of the GEMV and of the small-batch GEMM;
# a tile holds whole GGML blocks (at least one)
CONFIG = (2, 1024, 4)  # an H200's fastest for Q4_K at one row (results/int_quant_h200/gguf_gemv.json)
GEMM_CONFIG = (32, 256, 4)
TYPE_IDS = {"Q4_0": 0, "Q4_1": 1, "Q5_0": 2, "Q8_0": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6}  # the kernel's switch
# each type's block as sub-blocks of one scale: (sub-blocks, weights each)
SUB_BLOCKS = {"Q4_0": (1, 32), "Q4_1": (1, 32), "Q5_0": (1, 32), "Q8_0": (1, 32),
              "Q4_K": (8, 32), "Q5_K": (8, 32), "Q6_K": (16, 16)}


@triton.jit
def _f16_at(ptr):
    """float32 of the little-endian float16 at byte pointers `ptr`."""
    lo = tl.load(ptr).to(tl.uint16)
    hi = tl.load(ptr + 1).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nibble(ptr, shift):
    return ((tl.load(ptr) >> shift.to(tl.uint8)) & 0x0F).to(tl.int32)


@triton.jit
def _k_scale_min(scales_ptr, sub):
    """Q4_K / Q5_K: the 6-bit scale and min of sub-block `sub` (0..7) from the 12 scale bytes."""
    a = tl.load(scales_ptr + sub).to(tl.int32)  # scales[sub]
    b = tl.load(scales_ptr + sub + 4).to(tl.int32)  # scales[sub + 4]
    c = tl.load(scales_ptr + tl.where(sub >= 4, sub - 4, 0)).to(tl.int32)  # scales[sub - 4]
    sc = tl.where(sub < 4, a & 63, (b & 0x0F) | ((c >> 6) << 4))
    mn = tl.where(sub < 4, b & 63, (b >> 4) | ((a >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _dequant_blocks(w_ptr, rows, blocks, row_bytes, TYPE: tl.constexpr, BB: tl.constexpr,
                    S: tl.constexpr, L: tl.constexpr):
    """[BLOCK_N, BLOCKS, S, L] float32 weights of whole blocks `blocks` [BLOCKS] of the packed rows:
    sub-block s, element l is weight s * L + l of its block. Each sub-block's scale and offset are
    computed once ([BLOCK_N, BLOCKS, S, 1]); per weight: its quant bits, then q * scale + offset."""
    base = w_ptr + rows[:, None, None, None].to(tl.int64) * row_bytes + (blocks * BB)[None, :, None, None]
    s = tl.arange(0, S)[None, None, :, None]
    l = tl.arange(0, L)[None, None, None, :]
    if TYPE == 0 or TYPE == 1:  # Q4_0 / Q4_1: d, (m), 16 bytes of nibbles (low nibbles are weights 0..15)
        q = _nibble(base + 2 + 2 * TYPE + l % 16, (l // 16) * 4)
        scale = _f16_at(base)
        offset = _f16_at(base + 2) if TYPE == 1 else -8.0 * scale
    elif TYPE == 2:  # Q5_0: d, 32 high bits, nibbles
        high = ((tl.load(base + 2 + l // 8) >> (l % 8).to(tl.uint8)) & 1).to(tl.int32)
        q = _nibble(base + 6 + l % 16, (l // 16) * 4) | (high << 4)
        scale = _f16_at(base)
        offset = -16.0 * scale
    elif TYPE == 3:  # Q8_0: d, 32 int8
        q = tl.load(base + 2 + l).to(tl.int8, bitcast=True).to(tl.int32)
        scale = _f16_at(base)
        offset = 0.0 * scale
    elif TYPE == 4 or TYPE == 5:  # Q4_K / Q5_K: d, dmin, 12 scale bytes, (Q5_K: 32 high-bit bytes), nibbles
        sc, mn = _k_scale_min(base + 4, s)
        if TYPE == 4:
            q = _nibble(base + 16 + (s // 2) * 32 + l, (s % 2) * 4)
        else:
            high = ((tl.load(base + 16 + l) >> s.to(tl.uint8)) & 1).to(tl.int32)
            q = _nibble(base + 48 + (s // 2) * 32 + l, (s % 2) * 4) | (high << 4)
        scale = _f16_at(base) * sc
        offset = -_f16_at(base + 2) * mn
    else:  # Q6_K: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, d; sub-blocks of 16
        low = _nibble(base + (s // 8) * 64 + (s % 4) * 16 + l, ((s // 4) % 2) * 4)
        high = ((tl.load(base + 128 + (s // 8) * 32 + (s % 2) * 16 + l) >> (((s // 2) % 4) * 2).to(tl.uint8))
                & 3).to(tl.int32)
        q = low | (high << 4)
        scale = _f16_at(base + 208) * tl.load(base + 192 + s).to(tl.int8, bitcast=True).to(tl.float32)
        offset = -32.0 * scale
    return q.to(tl.float32) * scale + offset


@triton.jit
def _gguf_gemv_kernel(x_ptr, w_ptr, y_ptr, N, num_blocks, row_bytes, stride_x, stride_y,
                      TYPE: tl.constexpr, BB: tl.constexpr, S: tl.constexpr, L: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr, PDL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1)
    row_valid = rows < N
    rows = tl.where(row_valid, rows, 0)  # out-of-range rows read row 0 and are not stored
    within = (tl.arange(0, S)[:, None] * L + tl.arange(0, L)[None, :])[None, :, :]  # [1, S, L]
    begin(PDL)
    acc = tl.zeros([BLOCK_N, BLOCKS, S, L], dtype=tl.float32)
    for b0 in range(0, num_blocks, BLOCKS):
        blocks = b0 + tl.arange(0, BLOCKS)
        block_valid = blocks < num_blocks
        blocks = tl.where(block_valid, blocks, 0)
        w = _dequant_blocks(w_ptr, rows, blocks, row_bytes, TYPE, BB, S, L)
        cols = blocks[:, None, None] * (S * L) + within
        x = tl.load(x_ptr + m * stride_x + cols, mask=block_valid[:, None, None], other=0.0).to(tl.float32)
        acc += w * x[None, :, :, :]
    y = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)
    tl.store(y_ptr + m * stride_y + rows, y.to(y_ptr.dtype.element_ty), mask=row_valid)


@triton.jit
def _gguf_small_gemm_kernel(x_ptr, w_ptr, y_ptr, M, N, num_blocks, row_bytes, stride_x, stride_y,
                            TYPE: tl.constexpr, BB: tl.constexpr, S: tl.constexpr, L: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr, PDL: tl.constexpr):
    """y [M, N] = x [M, K] @ W.T for a few rows: each tile of W is dequantized once, rounded to
    x's dtype (as the dequantized-at-load model holds it) and multiplied on the tensor cores."""
    BLOCK_K: tl.constexpr = BLOCKS * S * L
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid, m_valid = rows < N, ms < M
    rows = tl.where(row_valid, rows, 0)
    begin(PDL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b0 in range(0, num_blocks, BLOCKS):
        blocks = b0 + tl.arange(0, BLOCKS)
        block_valid = blocks < num_blocks
        w = _dequant_blocks(w_ptr, rows, tl.where(block_valid, blocks, 0), row_bytes, TYPE, BB, S, L)
        w = tl.reshape(w, [BLOCK_N, BLOCK_K]).to(x_ptr.dtype.element_ty)
        cols = b0 * (S * L) + tl.arange(0, BLOCK_K)
        col_valid = cols < num_blocks * (S * L)
        x = tl.load(x_ptr + ms[:, None] * stride_x + cols[None, :], mask=m_valid[:, None] & col_valid[None, :],
                    other=0.0)
        acc += tl.dot(x, tl.trans(w))
    out = y_ptr + ms[:, None] * stride_y + rows[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_valid[:, None] & row_valid[None, :])


@triton.jit
def _gguf_dequant_kernel(w_ptr, out_ptr, N, num_blocks, row_bytes, stride_out,
                         TYPE: tl.constexpr, BB: tl.constexpr, S: tl.constexpr, L: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr):
    """out [N, K] = the packed rows dequantized (float32, rounded once to out's dtype), BLOCK_N rows and
    BLOCKS blocks a program."""
    BLOCK_K: tl.constexpr = BLOCKS * S * L
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    blocks = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    row_valid, block_valid = rows < N, blocks < num_blocks
    w = _dequant_blocks(w_ptr, tl.where(row_valid, rows, 0), tl.where(block_valid, blocks, 0), row_bytes, TYPE,
                        BB, S, L)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = row_valid[:, None] & (cols < num_blocks * (S * L))[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :],
             tl.reshape(w, [BLOCK_N, BLOCK_K]).to(out_ptr.dtype.element_ty), mask=ok)


def dequant_mm(x: torch.Tensor, packed: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """x [M, K] (bf16 or fp16, many rows) @ dequantize(packed).T: the weight dequantized once into the
    shared scratch (triton_int_quant.dequant_scratch) in x's dtype, as the dequantized-at-load model holds it,
    then torch's matmul (cuBLAS, float32 sums)."""
    block = gguf.BLOCK_TYPES[ggml_type]
    num_rows, row_bytes = packed.shape
    k = x.shape[1]
    assert packed.dtype == torch.uint8 and packed.is_contiguous() and row_bytes == block.row_bytes(k), packed.shape
    weight = dequant_scratch(num_rows * k, x.dtype, x.device).view(num_rows, k)
    block_n, weights_per_tile, num_warps = DEQUANT_TILE
    shape = _launch_shape(block, weights_per_tile)
    _gguf_dequant_kernel[(triton.cdiv(num_rows, block_n), triton.cdiv(k // block.block_elements, shape["BLOCKS"]))](
        packed, weight, num_rows, k // block.block_elements, row_bytes, weight.stride(0), BLOCK_N=block_n, **shape,
        num_warps=num_warps)
    return x @ weight.t()


def _launch_shape(block: gguf.GgmlBlock, weights_per_tile: int) -> dict:
    sub_blocks, per_sub = SUB_BLOCKS[block.name]
    return {"TYPE": TYPE_IDS[block.name], "BB": block.block_bytes, "S": sub_blocks, "L": per_sub,
            "BLOCKS": max(1, weights_per_tile // block.block_elements)}


def supports(x: torch.Tensor, ggml_type: int) -> bool:
    """Whether `matmul` takes this product: any rows in bf16 or fp16 (GEMV_MAX_ROWS in float32, which the
    tensor-core GEMM and cuBLAS on a 16-bit scratch do not take), contiguous, a packed type."""
    max_rows = x.shape[0] if x.dtype in (torch.bfloat16, torch.float16) else GEMV_MAX_ROWS
    return (x.dim() == 2 and 0 < x.shape[0] <= max_rows and x.is_floating_point() and x.stride(-1) == 1
            and ggml_type in gguf.BLOCK_TYPES)


def matmul(x: torch.Tensor, packed: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """x [M, K] @ dequantize(packed).T: the GEMV up to GEMV_MAX_ROWS, the small GEMM below DEQUANT_MIN_ROWS,
    dequant_mm from there."""
    if x.shape[0] <= GEMV_MAX_ROWS:
        return gemv(x, packed, ggml_type)
    if x.shape[0] >= DEQUANT_MIN_ROWS:
        return dequant_mm(x, packed, ggml_type)
    return small_gemm(x, packed, ggml_type)


def _check(x: torch.Tensor, packed: torch.Tensor, ggml_type: int) -> gguf.GgmlBlock:
    assert supports(x, ggml_type), "a few contiguous rows and a packed GGML type"
    block = gguf.BLOCK_TYPES[ggml_type]
    k = x.shape[1]
    assert packed.dtype == torch.uint8 and packed.is_contiguous(), "packed rows are contiguous uint8"
    assert packed.shape[1] == block.row_bytes(k) and k % block.block_elements == 0, (
        f"{block.name} rows of {packed.shape[1]} bytes do not hold K = {k}")
    return block


def small_gemm(x: torch.Tensor, packed: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """x [M, K] (bf16 or fp16, M <= GEMM_MAX_ROWS) @ dequantize(packed [N, row_bytes]).T -> [M, N]."""
    block = _check(x, packed, ggml_type)
    assert x.dtype in (torch.bfloat16, torch.float16) and x.shape[0] <= GEMM_MAX_ROWS, "a few 16-bit rows"
    num_rows, row_bytes = packed.shape
    block_m = max(16, triton.next_power_of_2(x.shape[0]))
    block_n, weights_per_tile, num_warps = GEMM_CONFIG
    out = torch.empty(x.shape[0], num_rows, dtype=x.dtype, device=x.device)
    _gguf_small_gemm_kernel[(triton.cdiv(num_rows, block_n), triton.cdiv(x.shape[0], block_m))](
        x, packed, out, x.shape[0], num_rows, x.shape[1] // block.block_elements, row_bytes, x.stride(0),
        out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, **_launch_shape(block, weights_per_tile),
        num_warps=num_warps, **pdl.options(x.device),
    )
    return out


def gemv(x: torch.Tensor, packed: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """x [M, K] @ dequantize(packed [N, row_bytes]).T -> [M, N] in x's dtype (float32 accumulation)."""
    block = _check(x, packed, ggml_type)
    num_rows, row_bytes = packed.shape
    block_n, weights_per_tile, num_warps = CONFIG
    out = torch.empty(x.shape[0], num_rows, dtype=x.dtype, device=x.device)
    _gguf_gemv_kernel[(triton.cdiv(num_rows, block_n), x.shape[0])](
        x, packed, out, num_rows, x.shape[1] // block.block_elements, row_bytes, x.stride(0), out.stride(0),
        BLOCK_N=block_n, **_launch_shape(block, weights_per_tile), num_warps=num_warps, **pdl.options(x.device),
    )
    return out
