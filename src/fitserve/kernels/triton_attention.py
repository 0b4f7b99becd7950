"""Triton kernels for the paged KV cache: the store by slot, and one attention kernel for
prefill, chunked prefill and decode alike.

The attention kernel runs one program per (request, KV head, block of query tokens). The
program's rows are the query tokens of its block times the query heads that share the KV
head (GQA), so a decode step still feeds the tensor cores a tile of GROUP rows and each K/V
tile is read once per KV head rather than once per query head. It walks the request's
context in tiles of TILE_N tokens, gathering each token's block through the block table,
with an online softmax; keys past a query's own position are masked (causality). Every
bound it reads (query lengths, context lengths) comes from device memory, so the launch is
the same for every step of a given batch size: CUDA graphs can capture it.

The pure-torch versions in kernels/reference.py are the specification; tests compare.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fitserve.forward_batch import PAD_SLOT
from fitserve.kernels import fp8

TILE_N = 64  # context tokens per inner-loop tile: several KV blocks, enough work per iteration
MIN_DOT_ROWS = 16  # tl.dot needs at least 16 rows


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale, v_scale,
    stride_k_token, stride_v_token, stride_cache_slot,
    ROW: tl.constexpr, ROW_POW2: tl.constexpr, QUANTIZE: tl.constexpr, FP8_MAX: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot == -1:  # PAD_SLOT
        return
    offs = tl.arange(0, ROW_POW2)
    mask = offs < ROW
    k = tl.load(k_ptr + token * stride_k_token + offs, mask=mask)
    v = tl.load(v_ptr + token * stride_v_token + offs, mask=mask)
    if QUANTIZE:  # fp8 cache: x / scale (IEEE division, as kernels/fp8.py), saturated, rounded to nearest even
        k = tl.clamp(tl.math.div_rn(k.to(tl.float32), k_scale), -FP8_MAX, FP8_MAX)
        v = tl.clamp(tl.math.div_rn(v.to(tl.float32), v_scale), -FP8_MAX, FP8_MAX)
    tl.store(k_cache_ptr + slot * stride_cache_slot + offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * stride_cache_slot + offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


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
    )


def _cache_scales(k_cache: torch.Tensor, k_scale: float, v_scale: float) -> tuple[float, float]:
    """The scales apply to an fp8 cache only (as in reference.paged_attention); other dtypes read 1.0."""
    return (float(k_scale), float(v_scale)) if fp8.is_fp8(k_cache.dtype) else (1.0, 1.0)


@triton.jit
def _attend_tiles(q, query_pos, k_cache_ptr, v_cache_ptr, table, kv_head, key_begin, key_end, scale,
                  stride_cache_block, stride_cache_slot, stride_cache_head,
                  BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
                  CAUSAL: tl.constexpr):
    """Online softmax of q [BLOCK_M, D] over the paged keys [key_begin, key_end) of one KV head.

    Returns (running max, running sum, unnormalised output [BLOCK_M, D]), all float32. CAUSAL
    hides keys after each row's query_pos [BLOCK_M]; without it query_pos is not read.
    """
    dims = tl.arange(0, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for tile_start in range(key_begin, key_end, TILE):
        key_pos = tile_start + tl.arange(0, TILE)  # [TILE]
        key_valid = key_pos < key_end
        block_id = tl.load(table + key_pos // BLOCK_SIZE, mask=key_valid, other=0)
        kv_offset = block_id * stride_cache_block + (key_pos % BLOCK_SIZE) * stride_cache_slot + kv_head * stride_cache_head
        k = tl.load(k_cache_ptr + kv_offset[None, :] + dims[:, None], mask=key_valid[None, :], other=0.0)  # [D, TILE]
        scores = tl.dot(q, k.to(q.dtype)) * scale  # [BLOCK_M, TILE] fp32
        visible = key_valid[None, :]
        if CAUSAL:
            visible = visible & (key_pos[None, :] <= query_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet stay at zero
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + kv_offset[:, None] + dims[None, :], mask=key_valid[:, None], other=0.0)  # [TILE, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    query_start_ptr, seq_lens_ptr, block_tables_ptr, scale, v_scale,
    stride_q_token, stride_q_head, stride_o_token, stride_o_head,
    stride_cache_block, stride_cache_slot, stride_cache_head, stride_table,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
):
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
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_start + token)[:, None] * stride_q_token + head[:, None] * stride_q_head + dims[None, :],
                mask=row_valid[:, None], other=0.0)  # [BLOCK_M, D]
    query_pos = num_cached + token  # [BLOCK_M]
    last_key = tl.minimum(num_cached + (q_block + 1) * BLOCK_Q, seq_len)  # keys this block can see

    m_i, l_i, acc = _attend_tiles(
        q, query_pos, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_table, kv_head, 0, last_key, scale,
        stride_cache_block, stride_cache_slot, stride_cache_head, BLOCK_M, HEAD_DIM, BLOCK_SIZE, TILE, True)
    out = acc * v_scale / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + (q_start + token)[:, None] * stride_o_token + head[:, None] * stride_o_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
    max_query_len: int, scale: float, k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    """q [T, H, D]; caches [num_blocks, block_size, Hkv, D]; writes and returns out [T, H, D].

    The caches may be fp8 (float8_e4m3fn): their tiles are widened to q's dtype for the dot
    products, k_scale folds into the softmax scale and v_scale into the output.

    query_start_loc [S+1] int32, seq_lens [S] int32, block_tables [S, max_blocks] int32 as in
    ForwardBatch. Rows that belong to no request (CUDA-graph padding) are left untouched.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    assert num_heads % num_kv_heads == 0 and head_dim == k_cache.shape[3] and head_dim >= 16
    assert head_dim & (head_dim - 1) == 0, "head_dim must be a power of two"
    assert q.stride(2) == 1 and out.shape == q.shape and out.stride(2) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape
    assert query_start_loc.shape == (num_seqs + 1,) and block_tables.shape[0] == num_seqs
    assert block_tables.stride(1) == 1
    if num_seqs == 0 or num_tokens == 0:
        return out
    k_scale, v_scale = _cache_scales(k_cache, k_scale, v_scale)
    group = num_heads // num_kv_heads
    block_q = 1 if max_query_len == 1 else max(MIN_DOT_ROWS // group, 16)
    block_m = max(MIN_DOT_ROWS, triton.next_power_of_2(block_q * group))
    grid = (num_seqs, num_kv_heads, triton.cdiv(max_query_len, block_q))
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, scale * k_scale, float(v_scale),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, TILE=TILE_N,
        num_warps=4, num_stages=2,
    )
    return out


# -- decode with the context split across programs ----------------------------------------------------
# A decode batch of few requests gives the kernel above only S x Hkv programs, each walking a long
# context alone: the chip idles. Splitting each context into NUM_SPLITS slices, attended in
# parallel and merged by their log-sum-exp, fills the chip; the merge reads S x H x NUM_SPLITS
# partial rows, small beside the K/V bytes.

MIN_PROGRAMS_PER_SM = 2  # enough programs in flight to hide memory latency
MAX_SPLITS = 16


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, part_out_ptr, part_lse_ptr,
    query_start_ptr, seq_lens_ptr, block_tables_ptr, scale, v_scale,
    stride_q_token, stride_q_head, stride_cache_block, stride_cache_slot, stride_cache_head, stride_table,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    seq_len = tl.where(q_len > 0, tl.load(seq_lens_ptr + seq), 0)  # padding sequences attend to nothing
    num_tiles = tl.cdiv(seq_len, TILE)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    key_begin = split * tiles_per_split * TILE
    key_end = tl.minimum(key_begin + tiles_per_split * TILE, seq_len)

    rows = tl.arange(0, BLOCK_M)
    head = kv_head * GROUP + rows
    row_valid = rows < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + q_start * stride_q_token + head[:, None] * stride_q_head + dims[None, :],
                mask=row_valid[:, None] & (q_len > 0), other=0.0)  # [BLOCK_M, D]
    m_i, l_i, acc = _attend_tiles(
        q, rows, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_table, kv_head, key_begin, key_end, scale,
        stride_cache_block, stride_cache_slot, stride_cache_head, BLOCK_M, HEAD_DIM, BLOCK_SIZE, TILE, False)
    # Partial results: out normalised within the slice, and the slice's log-sum-exp (-inf if empty).
    out = acc * v_scale / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_i))
    part_row = (seq * NUM_HEADS + head) * NUM_SPLITS + split  # [BLOCK_M]
    tl.store(part_out_ptr + part_row[:, None] * HEAD_DIM + dims[None, :], out, mask=row_valid[:, None])
    tl.store(part_lse_ptr + part_row, lse, mask=row_valid)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, query_start_ptr, stride_o_token, stride_o_head,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_ptr + seq)
    if tl.load(query_start_ptr + seq + 1) == q_start:
        return  # a padding sequence: no row to write
    splits = tl.arange(0, SPLITS_POW2)
    base = (seq * NUM_HEADS + head) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + base + splits, mask=splits < NUM_SPLITS, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    weights = tl.exp(lse - lse_max)  # empty slices weigh 0
    weights = weights / tl.sum(weights, axis=0)
    dims = tl.arange(0, HEAD_DIM)
    parts = tl.load(part_out_ptr + (base + splits)[:, None] * HEAD_DIM + dims[None, :],
                    mask=(splits < NUM_SPLITS)[:, None], other=0.0)  # [SPLITS, D]
    out = tl.sum(parts * weights[:, None], axis=0)
    tl.store(out_ptr + q_start * stride_o_token + head * stride_o_head + dims, out.to(out_ptr.dtype.element_ty))


def decode_num_splits(num_seqs: int, num_kv_heads: int, num_sms: int) -> int:
    """Context slices per (request, KV head) so that the chip has enough programs: 1 for big batches."""
    wanted = -(-MIN_PROGRAMS_PER_SM * num_sms // (num_seqs * num_kv_heads))
    return max(1, min(MAX_SPLITS, wanted))


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
    num_splits: int, k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    """Like paged_attention for a batch where every request feeds one token, split over the context."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_seqs = seq_lens.shape[0]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    assert num_heads % num_kv_heads == 0 and head_dim & (head_dim - 1) == 0 and head_dim >= 16
    assert q.stride(2) == 1 and out.shape == q.shape and out.stride(2) == 1 and block_tables.stride(1) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and 1 <= num_splits <= MAX_SPLITS
    if num_seqs == 0:
        return out
    k_scale, v_scale = _cache_scales(k_cache, k_scale, v_scale)
    group = num_heads // num_kv_heads
    part_out = torch.empty(num_seqs * num_heads * num_splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_seqs * num_heads * num_splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, part_out, part_lse, query_start_loc, seq_lens, block_tables, scale * k_scale,
        float(v_scale), q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        NUM_HEADS=num_heads, NUM_SPLITS=num_splits, GROUP=group, BLOCK_M=max(MIN_DOT_ROWS, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, TILE=TILE_N, num_warps=4, num_stages=2,
    )
    _decode_merge_kernel[(num_seqs, num_heads)](
        part_out, part_lse, out, query_start_loc, out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, NUM_SPLITS=num_splits, SPLITS_POW2=triton.next_power_of_2(num_splits),
        HEAD_DIM=head_dim, num_warps=1,
    )
    return out
