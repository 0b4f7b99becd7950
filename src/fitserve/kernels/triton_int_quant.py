"""The GEMM of integer group-quantized weights (GPTQ, AWQ, compressed-tensors W4A16/W8A16) on CUDA.

y = x @ W.T with W in kernels/int_quant.py's layout (qweight [N, K * bits / 8] uint8, scales
float32 [N, G], zeros uint8 [N, G], g_idx for an act-order checkpoint). Two paths by rows:
- one row (single-stream decode): a GEMV. Each program owns BLOCK_N output columns and walks K
  a few whole groups at a time, reading each packed byte once (both nibbles) and each group's
  scale and zero once, computing q * scale + offset in float32 in registers and summing across
  the tile once at the end. (Act-order and groups whose bytes are not a power of two take the
  tile GEMM.) On an H200 a Llama-3-8B step's linear layers take 3.3 ms in int4, as long as bf16's
  GEMV: the GEMV is bound by its instructions per weight, not by the bytes it reads.
- more rows: a tensor-core GEMM that loads each tile of packed values, takes each value's group,
  dequantizes (q - zero) * scale in float32, rounds it to x's dtype and multiplies with tl.dot
  in float32 sums, BLOCK_M 16 up to 16 rows and 64 above. It reads a quarter (4 bits)
  or half (8 bits) of bf16's bytes but is bound by the dequantization: slower than bf16's cuBLAS
  at every batch size measured (benchmarks/results/int_quant_h200/).
- many rows (a KernelTable's dequant_min_rows; 256 in DEFAULT_TABLE, plan/estimates.DEQUANT_MATMUL_MIN_ROWS):
  `dequant_mm` writes the whole weight, dequantized once, into one scratch of x's dtype and multiplies
  with cuBLAS, one pass over W for a product that is compute-bound at prefill sizes.
These are the "bytes" kernels. kernels/triton_int_words.py has the "words" kernels (int32 loads,
values without int-to-float conversions, BLOCK_M by rows); a KernelTable says which kernel and tile
serve which rows, and VARIANTS names the tables benchmarks/int_quant_bench.py times side by side.
DEFAULT_TABLE (the layers' choice) is the fastest table measured; rows that are not whole words still
take the bytes kernels (act-order layers arrive sorted by group: layers/formats/int_quant.py).
int_quant.int_quant_mm_reference is the specification (tests compare; the GEMVs multiply the
float32 weight, the GEMMs the weight rounded to x's dtype).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from fitserve.kernels import pdl, triton_int_words
from fitserve.kernels.pdl import begin
from fitserve.plan.estimates import DEQUANT_MATMUL_MIN_ROWS

BYTES, WORDS = "bytes", "words"  # the kernel families: this module's, kernels/triton_int_words.py's
ALL_ROWS = 1 << 62  # a TileChoice's max_rows that takes every larger row count


@dataclass(frozen=True, slots=True)
class GemvChoice:
    kernel: str  # BYTES or WORDS
    block_n: int  # output columns a program
    tile: int  # per column and loop step: whole groups (BYTES) or int32 words, a power of two (WORDS)
    num_warps: int
    min_programs: int = 0  # WORDS: K split until a launch has this many programs (0: never split)


@dataclass(frozen=True, slots=True)
class TileChoice:
    max_rows: int  # serves row counts up to this one (after the previous entry's)
    kernel: str  # BYTES or WORDS
    block_m: int
    block_n: int
    block_k: int  # inputs a loop step
    num_warps: int
    num_stages: int
    swap: bool = False  # WORDS: the product computed transposed (W x^T), for few rows
    split_k: int = 1  # WORDS: K cut into this many ranges, for layers with few column tiles


@dataclass(frozen=True, slots=True)
class KernelTable:
    """Which kernel serves a product of M rows: the GEMV up to gemv_max_rows, then the tiles by rows.
    Layers the words kernels do not take (act-order, rows not whole words) take the bytes kernels."""

    gemv_max_rows: int
    gemv: GemvChoice
    tiles: tuple[TileChoice, ...]  # ascending max_rows, the last ALL_ROWS
    # From this many rows: dequantize the whole weight into a bf16/fp16 scratch, then cuBLAS (`dequant_mm`)
    dequant_min_rows: int = ALL_ROWS

    def tile_for(self, num_rows: int) -> TileChoice:
        return next(choice for choice in self.tiles if num_rows <= choice.max_rows)


# The bytes kernels as measured on an H200 (benchmarks/results/int_quant_h200/): the GEMV's (8, 8, 4)
# the fastest of eight tiles; the GEMM's (32, 128, 4) the fastest of five at 1 to 256 rows (5.3 ms at
# 16 rows against 9.8 ms with (64, 64, 4)); at 2 rows the GEMV is no faster than the GEMM.
BASELINE = KernelTable(gemv_max_rows=1, gemv=GemvChoice(BYTES, 8, 8, 4), tiles=(
    TileChoice(16, BYTES, 16, 32, 128, 4, 3), TileChoice(ALL_ROWS, BYTES, 64, 32, 128, 4, 3)))
# Words GEMV tiles of 512 words (4096 4-bit inputs) a column: one word vector a thread
# per column with 4 warps, all BLOCK_N columns in each thread (offline SASS of triton 3.6, sm_90: about
# 4.7 instructions a weight in the loop against the bytes GEMV's 7.8 and its int-to-float conversions;
# the words tile GEMM about 7-8 against 75).
WORDS_TILES = (TileChoice(16, WORDS, 16, 64, 128, 4, 3), TileChoice(32, WORDS, 32, 64, 128, 4, 3),
               TileChoice(64, WORDS, 64, 64, 128, 4, 3), TileChoice(ALL_ROWS, WORDS, 128, 128, 64, 8, 3))
WORDS_TILES_NARROW = (TileChoice(16, WORDS, 16, 32, 128, 4, 3), TileChoice(32, WORDS, 32, 32, 128, 4, 3),
                      TileChoice(64, WORDS, 64, 32, 128, 4, 3), TileChoice(ALL_ROWS, WORDS, 128, 64, 128, 8, 3))


def few_row_tiles(block_n: int, split_k: int, swap: bool = True, block_k: int = 128, num_warps: int = 4,
                  num_stages: int = 3) -> tuple[TileChoice, ...]:
    """Tiles of BLOCK_M 16, 32 and 64 by rows with one (BLOCK_N, BLOCK_K) and K split, then the narrow
    words tile above 64 rows: for decode steps of a few to 64 rows, where the narrow tiles' 32-column
    programs are too few for the SMs on 4096-column layers (128 programs, each walking all of K)."""
    return tuple(TileChoice(rows, WORDS, rows, block_n, block_k, num_warps, num_stages, swap, split_k)
                 for rows in (16, 32, 64)) + WORDS_TILES_NARROW[-1:]


WORDS_GEMV_N16 = GemvChoice(WORDS, 16, 256, 8)
VARIANTS = {
    "baseline": BASELINE,
    "words": KernelTable(1, GemvChoice(WORDS, 8, 512, 4), WORDS_TILES),
    "words_gemv_n4": KernelTable(1, GemvChoice(WORDS, 4, 512, 4), WORDS_TILES),
    "words_gemv_n16": KernelTable(1, GemvChoice(WORDS, 16, 256, 8), WORDS_TILES),
    "words_gemv_w256": KernelTable(1, GemvChoice(WORDS, 8, 256, 4), WORDS_TILES),
    # 64-thread programs: every program of a 4096-column layer resident at once (6 a SM at 168 registers)
    "words_gemv_2warps": KernelTable(1, GemvChoice(WORDS, 8, 256, 2), WORDS_TILES),
    "words_narrow_tiles": KernelTable(1, GemvChoice(WORDS, 8, 512, 4), WORDS_TILES_NARROW),
    "words_n16_narrow": KernelTable(1, GemvChoice(WORDS, 16, 256, 8), WORDS_TILES_NARROW),
    "words_n16_narrow_dequant64": KernelTable(1, GemvChoice(WORDS, 16, 256, 8), WORDS_TILES_NARROW, 64),
    "words_n16_narrow_dequant256": KernelTable(1, GemvChoice(WORDS, 16, 256, 8), WORDS_TILES_NARROW, 256),
    # few rows: the transposed product (weights the MMA's register operand) and K split across programs
    "swap_n64": KernelTable(1, WORDS_GEMV_N16, few_row_tiles(64, 1)),
    "swap_n64_k2": KernelTable(1, WORDS_GEMV_N16, few_row_tiles(64, 2)),
    "swap_n64_k4": KernelTable(1, WORDS_GEMV_N16, few_row_tiles(64, 4)),
    "swap_n128_k4": KernelTable(1, WORDS_GEMV_N16, few_row_tiles(128, 4, num_warps=8)),
    "swap_n64_k4_bk256": KernelTable(1, WORDS_GEMV_N16, few_row_tiles(64, 4, block_k=256)),
    "narrow_k4": KernelTable(1, WORDS_GEMV_N16, few_row_tiles(32, 4, swap=False)),
    "narrow_k8": KernelTable(1, WORDS_GEMV_N16, few_row_tiles(32, 8, swap=False)),
    "swap_n64_k4_dequant128": KernelTable(1, WORDS_GEMV_N16, few_row_tiles(64, 4), 128),
    "swap_n64_k4_dequant256": KernelTable(1, WORDS_GEMV_N16, few_row_tiles(64, 4), 256),
    # 65 to 128 rows: 128-row tiles with K split in two, transposed or not
    "swap_n64_k4_m128s_k2": KernelTable(1, WORDS_GEMV_N16, few_row_tiles(64, 4)[:-1] + (
        TileChoice(128, WORDS, 128, 64, 128, 4, 3, True, 2), WORDS_TILES_NARROW[-1]), 256),
    "swap_n64_k4_m128_k2": KernelTable(1, WORDS_GEMV_N16, few_row_tiles(64, 4)[:-1] + (
        TileChoice(128, WORDS, 128, 64, 128, 8, 3, False, 2), WORDS_TILES_NARROW[-1]), 256),
}
# The one-row GEMV with K split (gemv_words' min_programs): short programs, many resident a SM, so that
# more of the weight's bytes are in flight at once (the unsplit GEMV reads at about a third of the copy
# bandwidth). Named gemv_n{BLOCK_N}_t{words}_w{warps}_p{min programs}; the tiles are the default table's.
for _n, _t, _w, _p in ((16, 256, 8, 512), (16, 128, 4, 1024), (16, 128, 4, 2048), (8, 128, 4, 2048),
                       (8, 64, 2, 4096), (32, 128, 8, 1024), (16, 64, 2, 4096), (4, 128, 2, 4096),
                       # around the fastest of those, (16, 128, 4, 1024)
                       (16, 128, 4, 768), (16, 128, 4, 1536), (16, 64, 4, 2048), (32, 64, 4, 1024),
                       (8, 256, 4, 1024), (16, 128, 2, 1024), (16, 256, 4, 1024), (16, 128, 8, 1024)):
    VARIANTS[f"gemv_n{_n}_t{_t}_w{_w}_p{_p}"] = replace(VARIANTS["swap_n64_k4_m128s_k2"],
                                                       gemv=GemvChoice(WORDS, _n, _t, _w, _p))
# The fastest of VARIANTS measured: the words GEMV (16, 256, 8) at one row, 2.59 ms a Llama-3-8B step's 128
# layers on an H200 (bf16 3.31; results/int_quant_h200/words_first.jsonl). On an H100
# (results/int_quant_h100_153f0e7, int_quant_h100_f9cb148; int4 g128): the transposed tiles with K split in
# four 3.8-4.1 ms at 2-32 rows and 6.0 at 64 (the narrow words tiles 6.5-7.2 and 6.8; bf16's cuBLAS
# 5.2-5.4); the transposed 128-row tile with K split in two 8.2 ms at 128 rows (narrow 11.1, bf16 5.7); from
# 256 rows dequant_mm, 14.0 ms at 256 and 49.1 at 2048 (narrow 15.3 and 110; bf16 6.7 and 42.6). int8 takes
# the same table, timed only with the narrow tiles (H200: 2.90 / 5.85-7.37 / 16.4 ms at 1 / 2-64 / 256 rows).
# At one row (H100, results/int_quant_h100_gemv_split): the GEMV (16, 128, 4) with K split to 1024 programs
# 2.42 ms against the unsplit (16, 256, 8)'s 2.70 (bf16's GEMV 4.62); the other splits 2.52-5.27; int8 3.09
# against 3.22.
DEFAULT_TABLE = replace(VARIANTS["gemv_n16_t128_w4_p1024"], dequant_min_rows=DEQUANT_MATMUL_MIN_ROWS or ALL_ROWS)


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


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, z_ptr, w_ptr, N, K, group_size, stride_q, stride_s, stride_w,
                    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[n, k] = (q - zero) * scale of group k // group_size, in float32, stored in w's dtype, for a
    [BLOCK_N, BLOCK_K] tile (in-order groups only)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < N, cols < K
    row_off = rows[:, None].to(tl.int64)
    ok = row_ok[:, None] & col_ok[None, :]
    if BITS == 4:  # byte j holds columns 2j (low nibble) and 2j + 1: load each byte once, interleave
        byte = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(q_ptr + row_off * stride_q + byte[None, :],
                         mask=row_ok[:, None] & (byte < K // 2)[None, :], other=0)
        q = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, BLOCK_K))
    else:
        q = tl.load(q_ptr + row_off * stride_q + cols[None, :], mask=ok, other=0)
    group = (cols // group_size)[None, :]
    scale = tl.load(s_ptr + row_off * stride_s + group, mask=ok, other=0.0)
    zero = tl.load(z_ptr + row_off * stride_s + group, mask=ok, other=0)
    w = (q.to(tl.float32) - zero.to(tl.float32)) * scale
    tl.store(w_ptr + row_off * stride_w + cols[None, :], w.to(w_ptr.dtype.element_ty), mask=ok)


DEQUANT_TILE = (32, 256, 4)  # (BLOCK_N, BLOCK_K, num_warps)
_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def dequant_scratch(num_elements: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One buffer per device and dtype that every layer dequantizes into in turn (a step runs its layers
    one after another on one stream), grown to the largest layer; the first forward of a budget's worth
    of tokens (start-up's profiling run) allocates it, so it is part of the measured activation peak."""
    buffer = _scratch.get((device, dtype))
    if buffer is None or buffer.numel() < num_elements:
        buffer = _scratch[device, dtype] = torch.empty(num_elements, dtype=dtype, device=device)
    return buffer[:num_elements]


def dequant_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               bits: int, supers: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W.T for many rows: W dequantized once into the scratch in x's dtype, then torch's matmul
    (cuBLAS, float32 sums): the specification's numerics, at cuBLAS's speed plus one pass over W."""
    _common_args(x, qweight, scales, zeros, None, bits)
    num_cols, num_inner = qweight.shape[0], x.shape[1]
    weight = dequant_scratch(num_cols * num_inner, x.dtype, x.device).view(num_cols, num_inner)
    if _words(qweight, scales, None, bits, supers):
        return x @ triton_int_words.dequantize_words(qweight, scales, zeros, bits, weight, supers).t()
    block_n, block_k, num_warps = DEQUANT_TILE
    _dequant_kernel[(triton.cdiv(num_cols, block_n), triton.cdiv(num_inner, block_k))](
        qweight, scales, zeros, weight, num_cols, num_inner, num_inner // scales.shape[1], qweight.stride(0),
        scales.stride(0), weight.stride(0), BITS=bits, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    return x @ weight.t()


def _words(qweight: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None, bits: int,
           supers: torch.Tensor | None, words_chosen: bool = True) -> bool:
    """Whether the words kernels serve this layer: chosen and taking it. The K-quant form (supers) has only
    them: AssertionError where they do not take it (its loader made it so that they do)."""
    takes = words_chosen and triton_int_words.words_take(qweight, scales, g_idx, bits)
    assert takes or supers is None, "the K-quant form is multiplied by the words kernels only"
    return takes


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
         g_idx: torch.Tensor | None, bits: int, table: KernelTable | None = None,
         supers: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (a few rows) @ W.T -> [M, N] in x's dtype; W multiplied as float32 (not rounded to x's
    dtype: within the rounding of the reference). Layers neither GEMV takes go to tile_gemm."""
    table = table or DEFAULT_TABLE
    choice = table.gemv
    if _words(qweight, scales, g_idx, bits, supers, choice.kernel == WORDS or supers is not None):
        choice = choice if choice.kernel == WORDS else DEFAULT_TABLE.gemv
        return triton_int_words.gemv_words(x, qweight, scales, zeros, bits, choice.block_n, choice.tile,
                                           choice.num_warps, choice.min_programs, supers)
    if not gemv_takes(qweight, scales, g_idx):
        return tile_gemm(x, qweight, scales, zeros, g_idx, bits, table)
    _common_args(x, qweight, scales, zeros, g_idx, bits)
    num_cols, num_groups = scales.shape
    if choice.kernel != BYTES:
        choice = BASELINE.gemv
    y = torch.empty(x.shape[0], num_cols, dtype=x.dtype, device=x.device)
    _int_quant_gemv_kernel[(triton.cdiv(num_cols, choice.block_n), x.shape[0])](
        x, qweight, scales, zeros, y, num_cols, num_groups, x.stride(0), qweight.stride(0), scales.stride(0),
        y.stride(0), BITS=bits, GROUP_BYTES=qweight.shape[1] // num_groups,
        GROUPS_PER_TILE=min(choice.tile, triton.next_power_of_2(num_groups)), BLOCK_N=choice.block_n,
        num_warps=choice.num_warps, **pdl.options(x.device))
    return y


def tile_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              g_idx: torch.Tensor | None, bits: int, table: KernelTable | None = None,
              supers: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N]: each weight tile dequantized once for BLOCK_M rows, tl.dot."""
    table = table or DEFAULT_TABLE
    num_rows, num_inner = x.shape
    choice = table.tile_for(num_rows)
    if _words(qweight, scales, g_idx, bits, supers, choice.kernel == WORDS or supers is not None):
        choice = choice if choice.kernel == WORDS else DEFAULT_TABLE.tile_for(num_rows)
        return triton_int_words.tile_words(x, qweight, scales, zeros, bits, choice.block_m, choice.block_n,
                                           choice.block_k, choice.num_warps, choice.num_stages, choice.swap,
                                           choice.split_k, supers)
    if choice.kernel != BYTES:
        choice = BASELINE.tile_for(num_rows)
    num_cols = qweight.shape[0]
    y = torch.empty(num_rows, num_cols, dtype=x.dtype, device=x.device)
    _int_quant_kernel[(triton.cdiv(num_rows, choice.block_m), triton.cdiv(num_cols, choice.block_n))](
        *_common_args(x, qweight, scales, zeros, g_idx, bits), y, num_rows, num_cols, num_inner,
        num_inner // scales.shape[1], x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        BITS=bits, HAS_G_IDX=g_idx is not None, BLOCK_M=choice.block_m, BLOCK_N=choice.block_n,
        BLOCK_K=choice.block_k, num_warps=choice.num_warps, num_stages=choice.num_stages)
    return y


def int_quant_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 g_idx: torch.Tensor | None, bits: int, table: KernelTable | None = None,
                 supers: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] bf16/fp16 -> [M, N] in x's dtype, W in int_quant's layout, by the table's path for M rows
    (table None: DEFAULT_TABLE as it is at the call, which benchmarks/gpu_bench.py --int-kernels replaces).
    supers: the K-quant form (int_quant.py; zeros hold the mins), which only the words kernels take (a
    table's bytes choice gives way to DEFAULT_TABLE's)."""
    table = table or DEFAULT_TABLE
    x = x.contiguous()
    if x.shape[0] <= table.gemv_max_rows:
        return gemv(x, qweight, scales, zeros, g_idx, bits, table, supers)
    if x.shape[0] >= table.dequant_min_rows and g_idx is None:
        return dequant_mm(x, qweight, scales, zeros, bits, supers)
    return tile_gemm(x, qweight, scales, zeros, g_idx, bits, table, supers)
