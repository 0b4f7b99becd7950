"""Decode attention with each request's context split across programs, merged by log-sum-exp.

A decode batch of few requests gives triton_attention.paged_attention only S x Hkv programs,
each walking a long context alone: the chip idles. Splitting each context into NUM_SPLITS
slices, attended in parallel, fills the chip. Each slice's program writes its partial rows
(output normalised within the slice, and the slice's log-sum-exp); the merge reads S x H x
NUM_SPLITS partial rows, small beside the K/V bytes: a second kernel (one program per request
and query head) weighs them by log-sum-exp.

A one-launch variant (the last slice of each (request, KV head) to finish, found by an atomic
ticket counter, merging in the same launch) was measured on an H200 and not kept: no faster
(Llama-3-8B, context 512, `benchmarks/gpu_bench.py fusion`: 6.21 vs 5.76 us per call at batch 1
with 16 splits, 15.86 vs 16.03 us at batch 20 with 2 splits; whole decode forward 4.312 vs
4.292 ms at batch 1, 4.868 vs 4.858 ms at batch 20), for a persistent counter buffer and more code.

Padding sequences (zero query tokens, CUDA-graph padding) attend to nothing and get no output
row. The pure-torch reference.paged_attention is the specification; tests compare.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fitserve.kernels import pdl
from fitserve.kernels.pdl import begin
from fitserve.kernels.triton_attention import (
    MIN_DOT_ROWS,
    TILE_N,
    attend_tiles,
    cache_scales,
    check_window_softcap,
)

# Enough programs in flight to hide memory latency. benchmarks/decode_attention_bench.py on the
# H200 (results/decode_attention_splits_h200_bf72932.json, Llama-3-8B heads, 32 layers): at 20
# requests x 576 tokens 4 splits took 0.630 ms (bf16 cache) and 0.566 ms (fp8) against 0.670 and
# 0.631 ms for the 2 that 2 programs per SM gave; at 20 x 2048 1.468 / 1.718 against 1.605 / 1.817
# ms; at 64 requests 2 splits cost 1-3% against 1, and at one request 16 splits stay best.
MIN_PROGRAMS_PER_SM = 4
MAX_SPLITS = 16
# Keys a loop step: TILE_N up to head_dim 128; above, fewer, so that a K and a V tile take the shared
# memory they take at 128 (head_dim 256, Gemma: 64 keys took 128 KiB over two stages). On an H200
# (results/h200_c5b0edf/, Gemma-3-12B's 48 layers) 32 keys took 1.45 ms against 1.60 at 20 requests of
# 576 tokens, whose 9 tiles of 64 filled 3 of 4 splits, but 4.94 against 4.27 at 2048 tokens and 0.37
# against 0.33 at one request: the workloads' contexts decided it (Gemma-3-12B W1 78.4% -> 80.7%).
TILE_ELEMENTS = TILE_N * 128


def decode_tile(head_pow2: int) -> int:
    return max(16, min(TILE_N, TILE_ELEMENTS // head_pow2))


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, part_out_ptr, part_lse_ptr,
    query_start_ptr, seq_lens_ptr, block_tables_ptr, scale, v_scale, window, softcap,
    stride_q_token, stride_q_head, stride_cache_block, stride_cache_slot, stride_cache_head, stride_table,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_POW2: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    SLIDING: tl.constexpr, SOFTCAP: tl.constexpr,
    PDL: tl.constexpr,
):
    """One slice of one (request, KV head): its GROUP query heads' partial rows, written at
    part_row = (seq * NUM_HEADS + head) * NUM_SPLITS + split (output [D] and log-sum-exp, float32).
    With SLIDING the slices split the window's keys [seq_len - window, seq_len) only."""
    begin(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    seq_len = tl.where(q_len > 0, tl.load(seq_lens_ptr + seq), 0)  # padding sequences attend to nothing
    first_key = 0
    if SLIDING:  # the one query, at seq_len - 1, sees keys after seq_len - 1 - window
        first_key = tl.maximum(seq_len - window, 0)
    num_tiles = tl.cdiv(seq_len - first_key, TILE)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    key_begin = first_key + split * tiles_per_split * TILE
    key_end = tl.minimum(key_begin + tiles_per_split * TILE, seq_len)
    rows = tl.arange(0, BLOCK_M)
    head = kv_head * GROUP + rows
    row_valid = rows < GROUP
    dims = tl.arange(0, HEAD_POW2)
    dim_valid = dims < HEAD_DIM
    q = tl.load(q_ptr + q_start * stride_q_token + head[:, None] * stride_q_head + dims[None, :],
                mask=row_valid[:, None] & dim_valid[None, :] & (q_len > 0), other=0.0)  # [BLOCK_M, HEAD_POW2]
    m_i, l_i, acc = attend_tiles(
        q, rows, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_table, kv_head, key_begin, key_end, scale,
        window, softcap, stride_cache_block, stride_cache_slot, stride_cache_head,
        BLOCK_M, HEAD_DIM, HEAD_POW2, BLOCK_SIZE, TILE, False, False, SOFTCAP)
    # Partial results: out normalised within the slice, and the slice's log-sum-exp (-inf if empty).
    out = acc * v_scale / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_i))
    part_row = (seq * NUM_HEADS + head) * NUM_SPLITS + split  # [BLOCK_M]
    tl.store(part_out_ptr + part_row[:, None] * HEAD_DIM + dims[None, :], out,
             mask=row_valid[:, None] & dim_valid[None, :])
    tl.store(part_lse_ptr + part_row, lse, mask=row_valid)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, query_start_ptr, stride_o_token, stride_o_head,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_POW2: tl.constexpr, PDL: tl.constexpr,
):
    begin(PDL)
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
    dims = tl.arange(0, HEAD_POW2)
    parts = tl.load(part_out_ptr + (base + splits)[:, None] * HEAD_DIM + dims[None, :],
                    mask=(splits < NUM_SPLITS)[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)  # [SPLITS, D]
    out = tl.sum(parts * weights[:, None], axis=0)
    tl.store(out_ptr + q_start * stride_o_token + head * stride_o_head + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


def decode_num_splits(num_seqs: int, num_kv_heads: int, num_sms: int) -> int:
    """Context slices per (request, KV head) so that the chip has enough programs: 1 for big batches."""
    wanted = -(-MIN_PROGRAMS_PER_SM * num_sms // (num_seqs * num_kv_heads))
    return max(1, min(MAX_SPLITS, wanted))


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
    num_splits: int, k_scale: float = 1.0, v_scale: float = 1.0,
    sliding_window: int | None = None, softcap: float | None = None, tile: int | None = None,
) -> torch.Tensor:
    """Like triton_attention.paged_attention for a batch where every request feeds one token (at most),
    split over the context: q [T, H, D], out [T, H, D], query_start_loc [S+1], seq_lens [S], block_tables
    [S, max_blocks]: the split kernel, then the merge kernel. sliding_window and softcap as there:
    with a window the splits share only the window's keys, so a long context costs no more.
    tile: keys a loop step (None: decode_tile's choice for the head size).
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_seqs = seq_lens.shape[0]
    num_kv_heads = k_cache.shape[2]
    assert num_heads % num_kv_heads == 0 and head_dim >= 16
    check_window_softcap(sliding_window, softcap)
    assert q.stride(2) == 1 and out.shape == q.shape and out.stride(2) == 1 and block_tables.stride(1) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape
    assert head_dim == k_cache.shape[3] and 1 <= num_splits <= MAX_SPLITS
    assert query_start_loc.shape == (num_seqs + 1,) and block_tables.shape[0] == num_seqs
    if num_seqs == 0:
        return out
    k_scale, v_scale = cache_scales(k_cache, k_scale, v_scale)
    group = num_heads // num_kv_heads
    head_pow2 = triton.next_power_of_2(head_dim)
    part_out = torch.empty(num_seqs * num_heads * num_splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_seqs * num_heads * num_splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, part_out, part_lse, query_start_loc, seq_lens, block_tables, scale * k_scale,
        float(v_scale), sliding_window or 0, float(softcap or 1.0),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), NUM_HEADS=num_heads, NUM_SPLITS=num_splits, GROUP=group,
        BLOCK_M=max(MIN_DOT_ROWS, triton.next_power_of_2(group)), HEAD_DIM=head_dim, HEAD_POW2=head_pow2,
        BLOCK_SIZE=k_cache.shape[1], TILE=tile or decode_tile(head_pow2), SLIDING=sliding_window is not None,
        SOFTCAP=softcap is not None, num_warps=4, num_stages=2, **pdl.options(q.device),
    )
    _decode_merge_kernel[(num_seqs, num_heads)](
        part_out, part_lse, out, query_start_loc, out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, NUM_SPLITS=num_splits, SPLITS_POW2=triton.next_power_of_2(num_splits),
        HEAD_DIM=head_dim, HEAD_POW2=head_pow2, num_warps=1, **pdl.options(q.device),
    )
    return out
