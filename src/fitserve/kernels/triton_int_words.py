"""Integer group-quantized GEMV and tile GEMM that read the packed weight as 32-bit words.

The same product and layout as kernels/triton_int_quant.py (y = x @ W.T, W in kernels/int_quant.py's
layout), with fewer instructions per weight than its byte kernels:
- qweight is read as int32 words (`qweight.view(torch.int32)`): value i of the little-endian word w
  of a row is column w * (32 / bits) + i, its bits i * bits .. i * bits + bits - 1;
- a value becomes a float32 without an int-to-float conversion (a quarter-rate instruction): a word
  is split into its two 16-bit halves (one shift a word), and value j of a half, masked in place and
  OR-ed into the mantissa of 2^23 (0x4B000000), is the float 2^23 + q * 2^(bits * j), exactly (below
  2^24); subtracting 2^23 + zero * 2^(bits * j) leaves (q - zero) * 2^(bits * j), exactly;
- the GEMV multiplies that by x * 2^-(bits * j) (x's powers of two taken once per program, shared
  by its BLOCK_N columns) and applies the group's scale once per word after the products: about
  three full-rate instructions a weight (and-or, subtract, fused multiply-add) against six and a
  conversion; float32 sums;
- the tile GEMM multiplies by scale * 2^-(bits * j): (q - zero) * scale in float32, rounded to x's
  dtype, the reference's weight bit for bit, then tl.dot with float32 sums; BLOCK_M grows with the
  rows (int_quant_mm's table), so a weight tile is dequantized once per BLOCK_M rows.
A tile of either kernel is SEGS_PER_TILE segments of SEG_WORDS words of each column, a segment
inside one group (words_geometry), so groups of 32 values to whole rows take the same code.
Act-order (g_idx) layers and rows whose packed bytes are not whole words take the byte kernels.

The K-quant form (kernels/int_quant.py: GGUF's Q4_K, `supers` given, constexpr KQ = its groups a
super-block) has no zero: a group's scale is d * sc and its offset -dmin * mn (the two loads of
_group_affine). The GEMV then sums q * x and x per word and applies scale and offset after the products;
the tile GEMM's weight is q * scale - dmin * mn, the reference's weight bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fitserve.kernels import pdl
from fitserve.kernels.int_quant import SUPER_GROUPS
from fitserve.kernels.pdl import begin

# float32 2^23: a value OR-ed into its mantissa (below 2^23) reads 2^23 + value; MAGIC is that float
MAGIC_BITS = 0x4B000000
MAGIC = tl.constexpr(8388608.0)
HALF_BITS = 16  # values come from 16-bit halves, so bit j * bits + bits stays below bit 23 (kernels: 16 // BITS)
WORD_BITS = 32
MIN_INNER = 16  # tl.dot's smallest K: a tile holds at least min(block_k, K) inputs


def _supers_args(scales: torch.Tensor, supers: torch.Tensor | None) -> tuple[torch.Tensor, int, int]:
    """(pointer, row stride, KQ) of the K-quant form's super-block scales; scales and 0s without them."""
    if supers is None:
        return scales, 0, 0
    assert supers.is_contiguous() and supers.shape == (scales.shape[0], scales.shape[1] // SUPER_GROUPS, 2)
    return supers, supers.stride(0), SUPER_GROUPS


@dataclass(frozen=True, slots=True)
class WordsGeometry:
    """How a layer's packed rows split into word tiles (all counts per output column)."""

    words_per_row: int  # K * bits / 32
    seg_words: int  # words per segment: a power of two dividing the group's words, <= the tile
    segs_per_group: int  # segments of one group
    segs_per_tile: int  # segments a tile (one loop step) holds

    @property
    def num_segments(self) -> int:
        return self.words_per_row // self.seg_words


def words_take(qweight: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None, bits: int) -> bool:
    """Whether these kernels take the layer: groups in order, each a whole number of words, int32-viewable."""
    row_bytes = qweight.shape[1]
    num_groups = scales.shape[1]
    group_bytes = row_bytes // num_groups if row_bytes % num_groups == 0 else 0
    return (g_idx is None and bits in (4, 8) and group_bytes > 0 and group_bytes % 4 == 0
            and row_bytes * 8 // bits >= MIN_INNER and qweight.is_contiguous() and qweight.storage_offset() % 4 == 0)


def words_geometry(row_bytes: int, num_groups: int, tile_words: int) -> WordsGeometry:
    """Segments for a tile of about tile_words words (a power of two) a column."""
    group_words = row_bytes // num_groups // 4
    seg_words = group_words & -group_words  # the largest power of two dividing the group's words
    seg_words = min(seg_words, tile_words)
    return WordsGeometry(words_per_row=row_bytes // 4, seg_words=seg_words,
                         segs_per_group=group_words // seg_words,
                         segs_per_tile=min(tile_words // seg_words,
                                           triton.next_power_of_2(row_bytes // 4 // seg_words)))


@triton.constexpr_function
def _place_bits(v, bits):
    """The shift of value v of a word inside its 16-bit half."""
    return bits * (v % (HALF_BITS // bits))


@triton.jit
def mantissa_value(words, high, magic_bits, V: tl.constexpr, BITS: tl.constexpr):
    """float32 in words' layout: 2^23 + q * 2^(BITS * j) for value V of each word (q unsigned; j = V's place
    in its 16-bit half; exact, below 2^24). high = words >> 16 (its upper bits are masked off here).
    magic_bits is MAGIC_BITS passed at run time: as a constant the compiler splits and-or into two
    instructions (a LOP3 takes one immediate); from a register it is one."""
    MASK: tl.constexpr = ((1 << BITS) - 1) << _place_bits(V, BITS)
    if V < 16 // BITS:
        bits = (words & MASK) | magic_bits
    else:
        bits = (high & MASK) | magic_bits
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _segment_words(q_ptr, cols, stride_q, s0, num_segments, SEG_WORDS: tl.constexpr, SEGS_PER_TILE: tl.constexpr,
                   SEGS_PER_GROUP: tl.constexpr):
    """The tile of segments s0 .. s0 + SEGS_PER_TILE: (words [BLOCK_N, S, SEG_WORDS] int32, its word index
    [S, SEG_WORDS], its groups [S], segment in range [S]); out-of-range segments load zeros and index
    segment 0 (their scale is made 0)."""
    segs = s0 + tl.arange(0, SEGS_PER_TILE)
    seg_ok = segs < num_segments
    segs = tl.where(seg_ok, segs, 0)
    word = segs[:, None] * SEG_WORDS + tl.arange(0, SEG_WORDS)[None, :]
    words = tl.load(q_ptr + cols[:, None, None].to(tl.int64) * stride_q + word[None, :, :],
                    mask=seg_ok[None, :, None], other=0)  # a partial last step reads no memory for its tail
    return words, word, segs // SEGS_PER_GROUP, seg_ok


@triton.jit
def _group_affine(s_ptr, z_ptr, sup_ptr, cols, groups, ok, stride_s, stride_sup, KQ: tl.constexpr):
    """(scale, second) of the groups at cols * stride_s + groups (broadcast shapes), scale 0 where not ok.
    Plain (KQ 0): the stored scale and the zero. K-quant form: d * sc and dmin * mn (0 where not ok),
    d and dmin from the super-block's pair at cols * stride_sup + 2 * (groups // KQ)."""
    at_group = cols * stride_s + groups
    if KQ > 0:
        at_super = cols * stride_sup + (groups // KQ) * 2
        scale = tl.load(sup_ptr + at_super).to(tl.float32) * tl.load(s_ptr + at_group).to(tl.float32)
        second = tl.load(sup_ptr + at_super + 1).to(tl.float32) * tl.load(z_ptr + at_group).to(tl.float32)
        return tl.where(ok, scale, 0.0), tl.where(ok, second, 0.0)
    else:
        return tl.where(ok, tl.load(s_ptr + at_group), 0.0), tl.load(z_ptr + at_group).to(tl.float32)


@triton.jit
def _store_sums(acc, y_at, part_at, part_stride, count_ptr, tile, pid_k, ok, SPLIT_K: tl.constexpr):
    """Store a product's float32 sums `acc` at y_at (y's dtype). With K split (SPLIT_K > 1) each program
    stores its range's sums at part_at + pid_k * part_stride, and the last of the tile's SPLIT_K programs to
    finish (the per-tile counter count_ptr + tile, which that program resets) adds them in order and stores
    y: one launch, the same bits every time."""
    if SPLIT_K == 1:
        tl.store(y_at, acc.to(y_at.dtype.element_ty), mask=ok)
    else:
        tl.store(part_at + pid_k * part_stride, acc, mask=ok)
        tl.debug_barrier()  # every thread's sums stored before the counter says so (release is cumulative)
        if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1:
            total = tl.zeros_like(acc)
            for part in tl.static_range(SPLIT_K):
                total += tl.load(part_at + part * part_stride, mask=ok, other=0.0, cache_modifier=".cg")
            tl.store(y_at, total.to(y_at.dtype.element_ty), mask=ok)
            tl.store(count_ptr + tile, 0)  # ready for the next product


@triton.jit
def _gemv_words_kernel(x_ptr, q_ptr, s_ptr, z_ptr, sup_ptr, y_ptr, part_ptr, count_ptr, M, N, num_segments,
                       steps_per_split, magic_bits, stride_x, stride_q, stride_s, stride_sup, stride_y,
                       BITS: tl.constexpr, SEG_WORDS: tl.constexpr, SEGS_PER_GROUP: tl.constexpr,
                       SEGS_PER_TILE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, KQ: tl.constexpr,
                       PDL: tl.constexpr):
    """Input row m against BLOCK_N output columns, SEGS_PER_TILE segments a step. The loop's tensors are
    [S, BLOCK_N, W] (value v of each word its own tensor): Triton then spreads threads over words and
    segments and gives each thread all BLOCK_N columns of its words, so each x is loaded, converted and
    scaled once for BLOCK_N weights, and the sums stay in a thread's registers until the end.
    SPLIT_K > 1 cuts K into ranges of steps_per_split steps (program axis 2), so a layer of few column
    tiles still has programs enough to keep every SM's loads in flight; the ranges' sums meet in
    _store_sums."""
    pid_n, m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    cols = tl.where(col_ok, cols, 0)  # out-of-range columns read column 0 and are not stored
    PER_WORD: tl.constexpr = 32 // BITS
    x_row = x_ptr + m * stride_x
    s_begin = pid_k * (steps_per_split * SEGS_PER_TILE)
    begin(PDL)
    acc = tl.zeros([SEGS_PER_TILE, BLOCK_N, SEG_WORDS], dtype=tl.float32)
    for step in range(0, steps_per_split):
        s0 = s_begin + step * SEGS_PER_TILE
        segs = s0 + tl.arange(0, SEGS_PER_TILE)
        seg_ok = segs < num_segments
        segs = tl.where(seg_ok, segs, 0)  # out-of-range segments read segment 0, scaled by 0
        word = segs[:, None] * SEG_WORDS + tl.arange(0, SEG_WORDS)[None, :]  # [S, W]
        words = tl.load(q_ptr + cols[None, :, None].to(tl.int64) * stride_q + word[:, None, :],
                        mask=seg_ok[:, None, None], other=0)  # [S, N, W]; a partial last step reads no memory
        scale, second = _group_affine(s_ptr, z_ptr, sup_ptr, cols[None, :], (segs // SEGS_PER_GROUP)[:, None],
                                      seg_ok[:, None], stride_s, stride_sup, KQ)  # [S, BLOCK_N]
        high = words >> 16
        dot = tl.zeros([SEGS_PER_TILE, BLOCK_N, SEG_WORDS], dtype=tl.float32)
        if KQ > 0:  # q * x and x summed per word; the group's offset times its inputs' sum after
            x_sum = tl.zeros([SEGS_PER_TILE, SEG_WORDS], dtype=tl.float32)
            for v in tl.static_range(PER_WORD):
                q_x, x = _unsigned_value_times_x(words, high, x_row + word * PER_WORD, magic_bits, v, BITS)
                dot += q_x
                x_sum += x
            acc += dot * scale[:, :, None] - second[:, :, None] * x_sum[:, None, :]
        else:
            for v in tl.static_range(PER_WORD):
                dot += _value_times_x(words, high, second[:, :, None], x_row + word * PER_WORD, magic_bits, v, BITS)
            acc += dot * scale[:, :, None]
    _store_sums(tl.sum(tl.sum(acc, axis=2), axis=0), y_ptr + m * stride_y + cols, part_ptr + m * N + cols, M * N,
                count_ptr, m * tl.num_programs(0) + pid_n, pid_k, col_ok, SPLIT_K)


@triton.jit
def _value_times_x(words, high, zero, x_at_word, magic_bits, V: tl.constexpr, BITS: tl.constexpr):
    """[S, BN, W] float32: (q - zero) * x for value V of each word; x_at_word [S, W] points at each word's
    first input. (q - zero) * 2^p is exact and x * 2^-p too (p: V's place in its half)."""
    UP: tl.constexpr = 1 << _place_bits(V, BITS)
    x = tl.load(x_at_word + V).to(tl.float32) * (1.0 / UP)
    return (mantissa_value(words, high, magic_bits, V, BITS) - (MAGIC + zero * UP)) * x[:, None, :]


@triton.jit
def _unsigned_value_times_x(words, high, x_at_word, magic_bits, V: tl.constexpr, BITS: tl.constexpr):
    """([S, BN, W] float32 q * x for value V of each word, x [S, W]): _value_times_x without a zero."""
    UP: tl.constexpr = 1 << _place_bits(V, BITS)
    x = tl.load(x_at_word + V).to(tl.float32)
    return (mantissa_value(words, high, magic_bits, V, BITS) - MAGIC) * (x * (1.0 / UP))[:, None, :], x


@triton.jit
def _weight(words, high, second, scale, magic_bits, V: tl.constexpr, BITS: tl.constexpr, KQ: tl.constexpr):
    """Value V of each word dequantized in float32 with the reference's one rounding (the powers of two and,
    in the K-quant form, q * scale are exact): (q - zero) * scale, or q * scale - second (dmin * mn)."""
    UP: tl.constexpr = 1 << _place_bits(V, BITS)
    if KQ > 0:
        return (mantissa_value(words, high, magic_bits, V, BITS) - MAGIC) * (scale * (1.0 / UP)) - second
    else:
        return (mantissa_value(words, high, magic_bits, V, BITS) - (MAGIC + second * UP)) * (scale * (1.0 / UP))


@triton.jit
def _tile_weights(words, second, scale, magic, BITS: tl.constexpr, KQ: tl.constexpr):
    """Words [BN, S, W] -> float32 weights [BN, S, W, 32 / BITS], value v of word w at [..., w, v]
    (tl.join adds a minor dimension: the last join is over v's lowest bit)."""
    hi = words >> 16
    z, s = second, scale
    if BITS == 4:
        w_0 = tl.join(_weight(words, hi, z, s, magic, 0, 4, KQ), _weight(words, hi, z, s, magic, 4, 4, KQ))
        w_1 = tl.join(_weight(words, hi, z, s, magic, 1, 4, KQ), _weight(words, hi, z, s, magic, 5, 4, KQ))
        w_2 = tl.join(_weight(words, hi, z, s, magic, 2, 4, KQ), _weight(words, hi, z, s, magic, 6, 4, KQ))
        w_3 = tl.join(_weight(words, hi, z, s, magic, 3, 4, KQ), _weight(words, hi, z, s, magic, 7, 4, KQ))
        w = tl.join(tl.join(w_0, w_2), tl.join(w_1, w_3))  # [..., h, a, c]: value 4h + 2a + c
    else:
        w_0 = tl.join(_weight(words, hi, z, s, magic, 0, 8, KQ), _weight(words, hi, z, s, magic, 2, 8, KQ))
        w_1 = tl.join(_weight(words, hi, z, s, magic, 1, 8, KQ), _weight(words, hi, z, s, magic, 3, 8, KQ))
        w = tl.join(w_0, w_1)  # [..., h, c]: value 2h + c
    return w


@triton.jit
def _dequantized_tile(q_ptr, s_ptr, z_ptr, sup_ptr, cols_in, s0, num_segments, magic_bits, stride_q, stride_s,
                      stride_sup, BITS: tl.constexpr, SEG_WORDS: tl.constexpr, SEGS_PER_GROUP: tl.constexpr,
                      SEGS_PER_TILE: tl.constexpr, BLOCK_N: tl.constexpr, KQ: tl.constexpr):
    """float32 weights [BLOCK_N, BLOCK_K] of columns cols_in and segments s0 .. s0 + SEGS_PER_TILE, as
    the reference dequantizes them; segments past num_segments read nothing and come out 0."""
    BLOCK_K: tl.constexpr = SEGS_PER_TILE * SEG_WORDS * (32 // BITS)
    words, word, groups, seg_ok = _segment_words(q_ptr, cols_in, stride_q, s0, num_segments, SEG_WORDS,
                                                  SEGS_PER_TILE, SEGS_PER_GROUP)
    scale, second = _group_affine(s_ptr, z_ptr, sup_ptr, cols_in[:, None], groups[None, :], seg_ok[None, :],
                                  stride_s, stride_sup, KQ)  # [BLOCK_N, S]
    weights = _tile_weights(words, second[:, :, None], scale[:, :, None], magic_bits, BITS, KQ)
    return tl.reshape(weights, (BLOCK_N, BLOCK_K))


@triton.jit
def _tile_words_kernel(x_ptr, q_ptr, s_ptr, z_ptr, sup_ptr, y_ptr, part_ptr, count_ptr, M, N, num_segments,
                       steps_per_split, magic_bits, stride_x, stride_q, stride_s, stride_sup, stride_y,
                       BITS: tl.constexpr, SEG_WORDS: tl.constexpr, SEGS_PER_GROUP: tl.constexpr,
                       SEGS_PER_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       SWAP: tl.constexpr, SPLIT_K: tl.constexpr, KQ: tl.constexpr):
    """BLOCK_M rows against BLOCK_N columns; each weight tile dequantized once, then tl.dot.

    SWAP computes the transposed product (W x^T, the dequantized weights as the dot's first operand, which
    a Hopper tensor-core MMA can take from registers; x^T from shared memory), for few rows. SPLIT_K > 1
    cuts K into SPLIT_K ranges of steps_per_split loop steps (program axis 2; the last range's steps past K
    load nothing), whose sums meet in _store_sums."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    cols_in = tl.where(col_ok, cols, 0)
    PER_WORD: tl.constexpr = 32 // BITS
    BLOCK_K: tl.constexpr = SEGS_PER_TILE * SEG_WORDS * PER_WORD
    s_begin = pid_k * (steps_per_split * SEGS_PER_TILE)  # a step never crosses into the next range
    x_row = x_ptr + rows.to(tl.int64) * stride_x
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, steps_per_split):
        s0 = s_begin + step * SEGS_PER_TILE
        w = _dequantized_tile(q_ptr, s_ptr, z_ptr, sup_ptr, cols_in, s0, num_segments, magic_bits, stride_q,
                              stride_s, stride_sup, BITS, SEG_WORDS, SEGS_PER_GROUP, SEGS_PER_TILE, BLOCK_N, KQ)
        k = s0 * (SEG_WORDS * PER_WORD) + tl.arange(0, BLOCK_K)
        k_ok = k < num_segments * (SEG_WORDS * PER_WORD)
        if SWAP:
            x_t = tl.load(x_row[None, :] + k[:, None], mask=k_ok[:, None] & row_ok[None, :], other=0.0)
            acc = tl.dot(w.to(x_t.dtype), x_t, acc)
        else:
            x = tl.load(x_row[:, None] + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    if SWAP:
        acc = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    _store_sums(acc, y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :],
                part_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], M * N, count_ptr,
                pid_m * tl.num_programs(1) + pid_n, pid_k, row_ok[:, None] & col_ok[None, :], SPLIT_K)


@triton.jit
def _dequant_words_kernel(q_ptr, s_ptr, z_ptr, sup_ptr, w_ptr, N, num_segments, magic_bits, stride_q, stride_s,
                          stride_sup, stride_w, BITS: tl.constexpr, SEG_WORDS: tl.constexpr,
                          SEGS_PER_GROUP: tl.constexpr, SEGS_PER_TILE: tl.constexpr, BLOCK_N: tl.constexpr,
                          KQ: tl.constexpr):
    """W[n, k] (as the reference dequantizes it, in float32) stored in w's dtype, for BLOCK_N columns and one tile of
    segments: the tile GEMM's dequantization (_dequantized_tile), written out instead of multiplied."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    s0 = tl.program_id(1) * SEGS_PER_TILE
    col_ok = cols < N
    cols_in = tl.where(col_ok, cols, 0)
    PER_WORD: tl.constexpr = 32 // BITS
    BLOCK_K: tl.constexpr = SEGS_PER_TILE * SEG_WORDS * PER_WORD
    w = _dequantized_tile(q_ptr, s_ptr, z_ptr, sup_ptr, cols_in, s0, num_segments, magic_bits, stride_q, stride_s,
                          stride_sup, BITS, SEG_WORDS, SEGS_PER_GROUP, SEGS_PER_TILE, BLOCK_N, KQ)
    k = s0 * (SEG_WORDS * PER_WORD) + tl.arange(0, BLOCK_K)
    ok = col_ok[:, None] & (k < num_segments * (SEG_WORDS * PER_WORD))[None, :]
    tl.store(w_ptr + cols[:, None].to(tl.int64) * stride_w + k[None, :], w.to(w_ptr.dtype.element_ty), mask=ok)


DEQUANT_WORDS_TILE = (32, 32, 4)  # (BLOCK_N, words a column, num_warps): 256 4-bit values a column


def dequantize_words(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                     out: torch.Tensor, supers: torch.Tensor | None = None) -> torch.Tensor:
    """The whole weight [N, K] dequantized into out (bf16/fp16, contiguous rows); the caller checked words_take.
    supers: the K-quant form (module docstring)."""
    num_cols, num_groups = scales.shape
    block_n, tile_words, num_warps = DEQUANT_WORDS_TILE
    geo = words_geometry(qweight.shape[1], num_groups, tile_words)
    assert out.shape == (num_cols, qweight.shape[1] * 8 // bits) and out.stride(1) == 1, out.shape
    sup, stride_sup, kq = _supers_args(scales, supers)
    _dequant_words_kernel[(triton.cdiv(num_cols, block_n), triton.cdiv(geo.num_segments, geo.segs_per_tile))](
        qweight.view(torch.int32), scales, zeros, sup, out, num_cols, geo.num_segments, MAGIC_BITS,
        geo.words_per_row, scales.stride(0), stride_sup, out.stride(0), BITS=bits, SEG_WORDS=geo.seg_words,
        SEGS_PER_GROUP=geo.segs_per_group, SEGS_PER_TILE=geo.segs_per_tile, BLOCK_N=block_n, KQ=kq,
        num_warps=num_warps)
    return out


def gemv_split(num_steps: int, programs_unsplit: int, min_programs: int) -> tuple[int, int]:
    """(split_k, steps_per_split): K cut into as few ranges as give at least min_programs programs (0: none),
    never more ranges than loop steps, and none empty."""
    split_k = max(1, min(num_steps, -(-min_programs // programs_unsplit))) if min_programs else 1
    steps_per_split = -(-num_steps // split_k)
    return -(-num_steps // steps_per_split), steps_per_split


def gemv_words(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
               block_n: int, tile_words: int, num_warps: int, min_programs: int = 0,
               supers: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (a few rows; one program row each) @ W.T -> [M, N] in x's dtype; the caller checked words_take.
    min_programs: split K (gemv_split) until the launch has that many programs; supers: the K-quant form."""
    num_rows = x.shape[0]
    num_cols, num_groups = scales.shape
    assert x.shape[1] == qweight.shape[1] * 8 // bits and x.is_contiguous(), (x.shape, qweight.shape)
    geo = words_geometry(qweight.shape[1], num_groups, tile_words)
    col_tiles = triton.cdiv(num_cols, block_n)
    split_k, steps_per_split = gemv_split(triton.cdiv(geo.num_segments, geo.segs_per_tile), col_tiles * num_rows,
                                          min_programs)
    y = torch.empty(num_rows, num_cols, dtype=x.dtype, device=x.device)
    parts, counts = split_buffers(split_k * num_rows * num_cols, col_tiles * num_rows, x.device) if split_k > 1 \
        else (y, y)
    sup, stride_sup, kq = _supers_args(scales, supers)
    _gemv_words_kernel[(col_tiles, num_rows, split_k)](
        x, qweight.view(torch.int32), scales, zeros, sup, y, parts, counts, num_rows, num_cols, geo.num_segments,
        steps_per_split, MAGIC_BITS, x.stride(0), geo.words_per_row, scales.stride(0), stride_sup, y.stride(0),
        BITS=bits, SEG_WORDS=geo.seg_words, SEGS_PER_GROUP=geo.segs_per_group, SEGS_PER_TILE=geo.segs_per_tile,
        BLOCK_N=block_n, SPLIT_K=split_k, KQ=kq, num_warps=num_warps, **pdl.options(x.device))
    return y


_split_buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_outgrown: list[torch.Tensor] = []  # buffers a captured CUDA graph may still point at: never freed


def split_buffers(num_partials: int, num_tiles: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A split-K product's float32 partial sums and its per-tile counters (zero between products: the
    last program of a tile resets its counter), one pair per device, grown to the largest product; the
    layers of a step run one after another on one stream, so they share it."""
    parts, counts = _split_buffers.get(device, (None, None))
    if parts is None or parts.numel() < num_partials:
        _outgrown.extend([parts] if parts is not None else [])
        parts = torch.empty(num_partials, dtype=torch.float32, device=device)
    if counts is None or counts.numel() < num_tiles:
        _outgrown.extend([counts] if counts is not None else [])
        counts = torch.zeros(num_tiles, dtype=torch.int32, device=device)
    _split_buffers[device] = parts, counts
    return parts, counts


def tile_words(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
               block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int, swap: bool = False,
               split_k: int = 1, supers: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] in x's dtype, BLOCK_M rows a program; the caller checked words_take.
    swap: the product computed transposed; split_k: K cut into that many ranges (see the kernel); supers:
    the K-quant form."""
    num_rows = x.shape[0]
    num_cols, num_groups = scales.shape
    assert x.shape[1] == qweight.shape[1] * 8 // bits and x.is_contiguous(), (x.shape, qweight.shape)
    geo = words_geometry(qweight.shape[1], num_groups, block_k * bits // WORD_BITS)
    steps = triton.cdiv(geo.num_segments, geo.segs_per_tile)
    steps_per_split = triton.cdiv(steps, max(1, split_k))
    split_k = triton.cdiv(steps, steps_per_split)  # no empty range
    y = torch.empty(num_rows, num_cols, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(num_cols, block_n), split_k)
    parts, counts = split_buffers(split_k * num_rows * num_cols, grid[0] * grid[1], x.device) if split_k > 1 \
        else (y, y)
    sup, stride_sup, kq = _supers_args(scales, supers)
    _tile_words_kernel[grid](
        x, qweight.view(torch.int32), scales, zeros, sup, y, parts, counts, num_rows, num_cols, geo.num_segments,
        steps_per_split, MAGIC_BITS, x.stride(0), geo.words_per_row, scales.stride(0), stride_sup, y.stride(0),
        BITS=bits, SEG_WORDS=geo.seg_words, SEGS_PER_GROUP=geo.segs_per_group, SEGS_PER_TILE=geo.segs_per_tile,
        BLOCK_M=block_m, BLOCK_N=block_n, SWAP=swap, SPLIT_K=split_k, KQ=kq, num_warps=num_warps,
        num_stages=num_stages)
    return y
