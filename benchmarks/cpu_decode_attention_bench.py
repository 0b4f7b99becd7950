"""The CPU decode attention alone, 16 sequences of SmolLM2's heads (9 query, 3 KV, head_dim 64) over a bf16
paged cache of 16-token blocks in random order, one layer, 2 threads: the compiled step's in-place form
(kernels/reference.py `_decode_attention_in_place` under torch.compile) against gathering K and V then SDPA
(the eager path's way), and gathering then two matmuls, eager and compiled. One line a variant and context:
ms a layer, the K and V bytes over that (GB/s), relative error to the in-place form.

    python benchmarks/cpu_decode_attention_bench.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from fitserve.kernels import reference

SEQS, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 16, 9, 3, 64, 16
SCALE = HEAD_DIM ** -0.5


def paged_inputs(context: int) -> tuple[torch.Tensor, ...]:
    """q [S, H, D], K and V caches [blocks, BLOCK, Hkv, D], a random block table [S, context / BLOCK], lengths."""
    num_blocks = SEQS * context // BLOCK + 8
    k_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM).bfloat16()
    v_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM).bfloat16()
    table = torch.randperm(num_blocks)[:SEQS * context // BLOCK].view(SEQS, -1)
    return torch.randn(SEQS, HEADS, HEAD_DIM).bfloat16(), k_cache, v_cache, table, torch.full((SEQS,), context)


def in_place(q, k_cache, v_cache, table, seq_lens):
    return reference._decode_attention_in_place(q, k_cache, v_cache, table, seq_lens, SCALE)


def _gathered(q, k_cache, v_cache, table):
    k = k_cache[table].flatten(1, 2).transpose(1, 2)  # [S, Hkv, L, D]
    v = v_cache[table].flatten(1, 2).transpose(1, 2)
    return q.reshape(SEQS, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM), k, v


def gather_sdpa(q, k_cache, v_cache, table, seq_lens):
    grouped, k, v = _gathered(q, k_cache, v_cache, table)
    mask = torch.arange(k.shape[2])[None, :] < seq_lens[:, None]
    out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask[:, None, None, :], scale=SCALE)
    return out.reshape(SEQS, HEADS, HEAD_DIM)


def gather_matmuls(q, k_cache, v_cache, table, seq_lens):
    grouped, k, v = _gathered(q, k_cache, v_cache, table)
    scores = torch.matmul(grouped, k.transpose(-1, -2)).float() * SCALE  # [S, Hkv, G, L]
    unseen = torch.arange(k.shape[2])[None, None, None, :] >= seq_lens[:, None, None, None]
    weights = scores.masked_fill(unseen, float("-inf")).softmax(-1).to(v.dtype)
    return torch.matmul(weights, v).reshape(SEQS, HEADS, HEAD_DIM)


def per_call_ms(fn, args, calls: int = 20) -> float:
    for _ in range(3):
        fn(*args)
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    torch.set_num_threads(2)
    variants = {"in_place_compiled": torch.compile(in_place, dynamic=False), "gather_sdpa_eager": gather_sdpa,
                "gather_matmuls_eager": gather_matmuls,
                "gather_matmuls_compiled": torch.compile(gather_matmuls, dynamic=False)}
    for context in (256, 1024):
        args = paged_inputs(context)
        expected = in_place(*args).float()
        kv_mb = 2 * SEQS * context * KV_HEADS * HEAD_DIM * 2 / 1e6
        for name, fn in variants.items():
            error = ((fn(*args).float() - expected).norm() / expected.norm()).item()
            ms = per_call_ms(fn, args)
            print(f"context {context:5d} {name:24s} {ms:7.3f} ms a layer {kv_mb / ms:6.2f} GB/s  rel. error {error:.1e}",
                  flush=True)


if __name__ == "__main__":
    main()
