"""Triton kernels for the paged KV cache: the store by slot (alone, or with the rotary embedding
of q and k), and one attention kernel for prefill, chunked prefill and decode alike
(kernels/triton_decode.py splits a small decode batch's context over more programs).

The attention kernel runs one program per (request, KV head, block of query tokens). The
program's rows are the query tokens of its block times the query heads that share the KV
head (GQA), so a decode step still feeds the tensor cores a tile of GROUP rows and each K/V
tile is read once per KV head rather than once per query head. It walks the request's
context in tiles of TILE_N tokens, gathering each token's block through the block table,
with an online softmax; keys past a query's own position are masked (causality). Every
bound it reads (query lengths, context lengths) comes from device memory, so the launch is
the same for every step of a given batch size: CUDA graphs can capture it. A sliding window
starts each program's walk at its first query's window (the blocks before it are never read: the
cache manager may have freed them) and masks the rest per row; a logit soft-cap and a head_dim
that is not a power of two (padded, with masks) are compile-time switches that cost nothing off.

The pure-torch versions in kernels/reference.py are the specification; tests compare.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fitserve.forward_batch import PAD_SLOT
from fitserve.kernels import fp8, pdl
from fitserve.kernels.pdl import begin
from fitserve.kernels.triton_fused import rope_table_row, rotate_heads_, rotated_heads

TILE_N = 64  # context tokens per inner-loop tile: several KV blocks, enough work per iteration
MIN_DOT_ROWS = 16  # tl.dot needs at least 16 rows


@triton.jit
def _store_row(cache_row_ptr, offs, x, scale, mask, QUANTIZE: tl.constexpr, FP8_MAX: tl.constexpr):
    """x (the model dtype) -> the cache row at offs; an fp8 cache gets x / scale (IEEE division, as
    kernels/fp8.py), saturated, rounded to nearest even."""
    if QUANTIZE:
        x = tl.clamp(tl.math.div_rn(x.to(tl.float32), scale), -FP8_MAX, FP8_MAX)
    tl.store(cache_row_ptr + offs, x.to(cache_row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale, v_scale,
    stride_k_token, stride_v_token, stride_cache_slot,
    ROW: tl.constexpr, ROW_POW2: tl.constexpr, QUANTIZE: tl.constexpr, FP8_MAX: tl.constexpr,
    PDL: tl.constexpr,
):
    begin(PDL)
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot == -1:  # PAD_SLOT
        return
    offs = tl.arange(0, ROW_POW2)
    mask = offs < ROW
    k = tl.load(k_ptr + token * stride_k_token + offs, mask=mask)
    v = tl.load(v_ptr + token * stride_v_token + offs, mask=mask)
    _store_row(k_cache_ptr + slot * stride_cache_slot, offs, k, k_scale, mask, QUANTIZE, FP8_MAX)
    _store_row(v_cache_ptr + slot * stride_cache_slot, offs, v, v_scale, mask, QUANTIZE, FP8_MAX)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k, v [T, Hkv, D] -> caches [num_blocks, block_size, Hkv, D] at slot_mapping [T] (PAD_SLOT skipped).

    An fp8 cache (float8_e4m3fn) stores k / k_scale and v / v_scale, as reference.store_kv.
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    assert PAD_SLOT == -1, "the kernel tests for -1"
    assert k.shape == v.shape and k_cache.shape == v_cache.shape and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert tuple(k_cache.shape[2:]) == (num_kv_heads, head_dim), "cache and k disagree on heads or head_dim"
    assert k.stride(2) == 1 and k.stride(1) == head_dim and v.stride(2) == 1 and v.stride(1) == head_dim
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype in (torch.int32, torch.int64)
    assert k_cache.dtype == v_cache.dtype and k_scale > 0 and v_scale > 0
    if num_tokens == 0:
        return
    row = num_kv_heads * head_dim
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, float(k_scale), float(v_scale),
        k.stride(0), v.stride(0), row,
        ROW=row, ROW_POW2=triton.next_power_of_2(row), QUANTIZE=fp8.is_fp8(k_cache.dtype), FP8_MAX=fp8.FP8_MAX,
        **pdl.options(k.device),
    )


def cache_scales(k_cache: torch.Tensor, k_scale: float, v_scale: float) -> tuple[float, float]:
    """The scales apply to an fp8 cache only (as in reference.paged_attention); other dtypes read 1.0."""
    return (float(k_scale), float(v_scale)) if fp8.is_fp8(k_cache.dtype) else (1.0, 1.0)


def check_window_softcap(sliding_window: int | None, softcap: float | None) -> None:
    assert sliding_window is None or sliding_window >= 1, "a sliding window holds at least one token"
    assert softcap is None or softcap > 0, "a soft-cap is positive"


@triton.jit
def soft_cap(scores, softcap):
    """softcap * tanh(scores / softcap), tanh(x) written as 2 sigmoid(2x) - 1 (exact at +-inf)."""
    return softcap * (2.0 * tl.sigmoid(2.0 * scores / softcap) - 1.0)


@triton.jit
def attend_tiles(q, query_pos, k_cache_ptr, v_cache_ptr, table, kv_head, key_begin, key_end, scale,
                  window, softcap, stride_cache_block, stride_cache_slot, stride_cache_head,
                  BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_POW2: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  TILE: tl.constexpr, CAUSAL: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr):
    """Online softmax of q [BLOCK_M, HEAD_POW2] over the paged keys [key_begin, key_end) of one KV head.

    Returns (running max, running sum, unnormalised output [BLOCK_M, HEAD_POW2]), all float32; the
    head is padded to a power of two, its dims >= HEAD_DIM neither loaded nor stored. CAUSAL hides
    keys after each row's query_pos [BLOCK_M]; without it query_pos is not read. SLIDING (with
    CAUSAL) also hides keys at or before query_pos - window. SOFTCAP caps the scaled scores
    (soft_cap) before the mask. Keys outside [key_begin, key_end) are never loaded: a caller with a
    window starts key_begin at its first row's window, so cache blocks freed before it (whose
    contents may be anything, NaN included) are not read; p = 0 times a NaN would still be NaN.
    """
    dims = tl.arange(0, HEAD_POW2)
    dim_valid = dims < HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_POW2], tl.float32)
    for tile_start in range(key_begin, key_end, TILE):
        key_pos = tile_start + tl.arange(0, TILE)  # [TILE]
        key_valid = key_pos < key_end
        block_id = tl.load(table + key_pos // BLOCK_SIZE, mask=key_valid, other=0)
        kv_offset = block_id * stride_cache_block + (key_pos % BLOCK_SIZE) * stride_cache_slot + kv_head * stride_cache_head
        k = tl.load(k_cache_ptr + kv_offset[None, :] + dims[:, None], mask=key_valid[None, :] & dim_valid[:, None],
                    other=0.0)  # [D, TILE]
        scores = tl.dot(q, k.to(q.dtype)) * scale  # [BLOCK_M, TILE] fp32
        if SOFTCAP:
            scores = soft_cap(scores, softcap)
        visible = key_valid[None, :]
        if CAUSAL:
            visible = visible & (key_pos[None, :] <= query_pos[:, None])
            if SLIDING:
                visible = visible & (key_pos[None, :] > query_pos[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet stay at zero
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + kv_offset[:, None] + dims[None, :], mask=key_valid[:, None] & dim_valid[None, :],
                    other=0.0)  # [TILE, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    query_start_ptr, seq_lens_ptr, block_tables_ptr, scale, v_scale, window, softcap,
    stride_q_token, stride_q_head, stride_o_token, stride_o_head,
    stride_cache_block, stride_cache_slot, stride_cache_head, stride_table,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_POW2: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    SLIDING: tl.constexpr, SOFTCAP: tl.constexpr,
    PDL: tl.constexpr,
):
    begin(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_block = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    num_cached = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)  # row r: query token r // GROUP of this block, head r % GROUP
    token = q_block * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (token < q_len)
    dims = tl.arange(0, HEAD_POW2)
    mask = row_valid[:, None] & (dims < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + (q_start + token)[:, None] * stride_q_token + head[:, None] * stride_q_head + dims[None, :],
                mask=mask, other=0.0)  # [BLOCK_M, HEAD_POW2]
    query_pos = num_cached + token  # [BLOCK_M]
    last_key = tl.minimum(num_cached + (q_block + 1) * BLOCK_Q, seq_len)  # keys this block can see
    first_key = 0
    if SLIDING:  # the block's first query sees keys after num_cached + q_block * BLOCK_Q - window
        first_key = tl.maximum(num_cached + q_block * BLOCK_Q - window + 1, 0)

    m_i, l_i, acc = attend_tiles(
        q, query_pos, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_table, kv_head, first_key, last_key,
        scale, window, softcap, stride_cache_block, stride_cache_slot, stride_cache_head,
        BLOCK_M, HEAD_DIM, HEAD_POW2, BLOCK_SIZE, TILE, True, SLIDING, SOFTCAP)
    out = acc * v_scale / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + (q_start + token)[:, None] * stride_o_token + head[:, None] * stride_o_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
    max_query_len: int, scale: float, k_scale: float = 1.0, v_scale: float = 1.0,
    sliding_window: int | None = None, softcap: float | None = None,
) -> torch.Tensor:
    """q [T, H, D]; caches [num_blocks, block_size, Hkv, D]; writes and returns out [T, H, D].

    sliding_window: a query at position p sees keys p - sliding_window < j <= p only, and the KV
    blocks wholly before its block's first window are not read (their table entries may point
    anywhere); softcap: scores soft-capped, softcap * tanh(score / softcap), before the mask. Both
    as reference.paged_attention; off (None), they cost nothing (compile-time switches). A head_dim
    that is not a power of two is padded to one inside the kernel.

    The caches may be fp8 (float8_e4m3fn): their tiles are widened to q's dtype for the dot
    products, k_scale folds into the softmax scale and v_scale into the output.

    query_start_loc [S+1] int32, seq_lens [S] int32, block_tables [S, max_blocks] int32 as in
    ForwardBatch. Rows that belong to no request (CUDA-graph padding) are left untouched.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    assert num_heads % num_kv_heads == 0 and head_dim == k_cache.shape[3] and head_dim >= 16
    check_window_softcap(sliding_window, softcap)
    assert q.stride(2) == 1 and out.shape == q.shape and out.stride(2) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape
    assert query_start_loc.shape == (num_seqs + 1,) and block_tables.shape[0] == num_seqs
    assert block_tables.stride(1) == 1
    if num_seqs == 0 or num_tokens == 0:
        return out
    k_scale, v_scale = cache_scales(k_cache, k_scale, v_scale)
    group = num_heads // num_kv_heads
    block_q = 1 if max_query_len == 1 else max(MIN_DOT_ROWS // group, 16)
    block_m = max(MIN_DOT_ROWS, triton.next_power_of_2(block_q * group))
    grid = (num_seqs, num_kv_heads, triton.cdiv(max_query_len, block_q))
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, scale * k_scale, float(v_scale),
        sliding_window or 0, float(softcap or 1.0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, HEAD_DIM=head_dim, HEAD_POW2=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size, TILE=TILE_N, SLIDING=sliding_window is not None, SOFTCAP=softcap is not None,
        num_warps=4, num_stages=2, **pdl.options(q.device),
    )
    return out


# -- rotary embedding and the KV store in one kernel ----------------------------------------------------
# The same math as triton_fused.rotary_ followed by store_kv (the shared helpers round alike), one
# launch instead of two per layer. Rotated K goes to the cache only: attention reads K from there.


@triton.jit
def _rotary_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, positions_ptr, cos_ptr, sin_ptr,
    k_scale, v_scale, stride_q, stride_k, stride_v, stride_table, stride_cache_slot,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, Q_HEADS_POW2: tl.constexpr, KV_HEADS_POW2: tl.constexpr,
    HALF: tl.constexpr, HALF_POW2: tl.constexpr, HEAD_DIM: tl.constexpr, KV_ROW_POW2: tl.constexpr,
    QUANTIZE: tl.constexpr,
    FP8_MAX: tl.constexpr,
    PDL: tl.constexpr,
):
    begin(PDL)
    token = tl.program_id(0)
    cos, sin = rope_table_row(cos_ptr, sin_ptr, positions_ptr, token, stride_table, HALF, HALF_POW2)  # [1, D/2]
    rotate_heads_(q_ptr + token * stride_q, cos, sin, NUM_Q_HEADS, Q_HEADS_POW2, HALF, HALF_POW2, HEAD_DIM)  # every row
    slot = tl.load(slot_ptr + token)
    if slot == -1:  # PAD_SLOT: nothing stored
        return
    first, mask, k1, k2 = rotated_heads(k_ptr + token * stride_k, cos, sin, NUM_KV_HEADS, KV_HEADS_POW2, HALF,
                                        HALF_POW2, HEAD_DIM)
    k_row = k_cache_ptr + slot * stride_cache_slot
    _store_row(k_row, first, k1, k_scale, mask, QUANTIZE, FP8_MAX)
    _store_row(k_row, first + HALF, k2, k_scale, mask, QUANTIZE, FP8_MAX)
    offs = tl.arange(0, KV_ROW_POW2)
    v_mask = offs < NUM_KV_HEADS * HEAD_DIM
    v = tl.load(v_ptr + token * stride_v + offs, mask=v_mask)
    _store_row(v_cache_ptr + slot * stride_cache_slot, offs, v, v_scale, v_mask, QUANTIZE, FP8_MAX)


def rotary_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """q [T, H*D] rotated in place; k rotated and v, [T, Hkv*D] each, stored at slot_mapping [T] (PAD_SLOT
    skipped) into caches [num_blocks, block_size, Hkv, D]: triton_fused.rotary_ then store_kv in one launch.

    q, k, v may be row-strided views of one qkv tensor. k itself is left as it was. positions [T];
    cos, sin [max_positions, D] float32 tables (rotate_half layout, as layers/rotary.py).
    """
    num_tokens = q.shape[0]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    assert PAD_SLOT == -1, "the kernel tests for -1"
    assert q.stride(1) == 1 and k.stride(1) == 1 and v.stride(1) == 1 and head_dim % 2 == 0
    assert k.shape == v.shape == (num_tokens, num_kv_heads * head_dim) and q.shape[1] % head_dim == 0
    assert k_cache.shape == v_cache.shape and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k_cache.dtype == v_cache.dtype and k_scale > 0 and v_scale > 0
    assert cos.is_contiguous() and sin.is_contiguous() and cos.shape == sin.shape and cos.shape[1] == head_dim
    assert positions.shape == (num_tokens,) and slot_mapping.shape == (num_tokens,)
    assert slot_mapping.dtype in (torch.int32, torch.int64)
    if num_tokens == 0:
        return
    num_q_heads = q.shape[1] // head_dim
    _rotary_store_kv_kernel[(num_tokens,)](
        q, k, v, k_cache, v_cache, slot_mapping, positions, cos, sin, float(k_scale), float(v_scale),
        q.stride(0), k.stride(0), v.stride(0), cos.stride(0), num_kv_heads * head_dim,
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, Q_HEADS_POW2=triton.next_power_of_2(num_q_heads),
        KV_HEADS_POW2=triton.next_power_of_2(num_kv_heads), HALF=head_dim // 2,
        HALF_POW2=triton.next_power_of_2(head_dim // 2), HEAD_DIM=head_dim,
        KV_ROW_POW2=triton.next_power_of_2(num_kv_heads * head_dim),
        QUANTIZE=fp8.is_fp8(k_cache.dtype), FP8_MAX=fp8.FP8_MAX, num_warps=4, **pdl.options(q.device),
    )
