"""Decode attention over a bf16 and an fp8 KV cache, as a decode step runs it (GPU, one call).

    python benchmarks/decode_attention_bench.py --out $OUT    # writes decode_attention.json
    python benchmarks/decode_attention_bench.py --model gemma-3-12b --tiles 64 32 16 --out $OUT

Llama-3-8B's heads (32 query, 8 KV, head_dim 128), 32 layers, each with its own cache (nothing
from L2), a batch of S requests at a context of L tokens in non-contiguous blocks; the 32
layers' `triton_decode.paged_decode_attention` calls captured in one CUDA graph and replayed,
for several context splits per (request, KV head): the one decode_num_splits picks and others.
Reports ms per step, the KV bytes read per second, and the error against the pure-torch
reference. (Commit dee7751 timed float16 dots over the fp8 cache with this script: mixed, reverted.)
--model gemma-3-12b takes its heads (16 query, 8 KV, head_dim 256, 48 layers); --tiles times keys per
loop step (the kernel's `tile`) at the picked splits over a bf16 cache instead of the splits.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from decode_gemm_bench import time_graph

from fitserve.kernels import fp8, reference, triton_decode
from fitserve.kernels.triton_decode import decode_num_splits
from paged_helpers import make_batch

LAYERS, HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 32, 8, 128, 16
MODELS = {"llama-3-8b": (32, 32, 8, 128), "gemma-3-12b": (48, 16, 8, 256)}  # layers, heads, KV heads, head_dim
CASES = ((1, 576), (20, 576), (64, 576), (20, 2048))  # (requests, context tokens)


def build(num_seqs: int, context: int, cache_dtype: torch.dtype):
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = num_seqs * blocks_per_seq + 1
    perm = torch.randperm(num_blocks - 1) + 1  # block 0 stays unused, tables non-contiguous
    tables = perm.reshape(num_seqs, blocks_per_seq).tolist()
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    caches = [((torch.randn(shape, device="cuda")).to(cache_dtype), torch.randn(shape, device="cuda").to(cache_dtype))
              for _ in range(LAYERS)]
    batch = make_batch(list(range(num_seqs)), [context - 1] * num_seqs, [0] * num_seqs, [1] * num_seqs,
                       [context] * num_seqs, tables, device="cuda")
    q = torch.randn(num_seqs, HEADS, HEAD_DIM, device="cuda").to(torch.bfloat16)
    return caches, batch, q


def run_case(num_seqs: int, context: int, cache_dtype: torch.dtype, splits: int, tile: int | None = None) -> dict:
    caches, batch, q = build(num_seqs, context, cache_dtype)
    out = torch.empty_like(q)
    scale = HEAD_DIM ** -0.5

    def step() -> None:
        for k_cache, v_cache in caches:
            triton_decode.paged_decode_attention(q, k_cache, v_cache, out, batch.query_start_loc, batch.seq_lens,
                                                 batch.block_tables, scale, splits, tile=tile)
    ms = time_graph(step)
    kv_bytes = LAYERS * 2 * num_seqs * context * KV_HEADS * HEAD_DIM * caches[0][0].element_size()
    k_cache, v_cache = caches[0]
    triton_decode.paged_decode_attention(q, k_cache, v_cache, out, batch.query_start_loc, batch.seq_lens,
                                         batch.block_tables, scale, splits, tile=tile)
    expected = reference.paged_attention(q, k_cache, v_cache, batch, scale)
    error = ((out.float() - expected.float()).norm() / expected.float().norm()).item()
    return {"requests": num_seqs, "context": context, "cache": str(cache_dtype).removeprefix("torch."),
            "splits": splits, "tile": tile or triton_decode.decode_tile(HEAD_DIM), "picked": splits == picked_splits(num_seqs), "ms_per_step": ms, "kv_tb_s": kv_bytes / ms / 1e9,
            "rel_err_vs_reference": error}


def picked_splits(num_seqs: int) -> int:
    return decode_num_splits(num_seqs, KV_HEADS, torch.cuda.get_device_properties(0).multi_processor_count)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--model", default="llama-3-8b", choices=sorted(MODELS))
    parser.add_argument("--tiles", nargs="+", type=int, help="time these keys-per-step tiles (bf16 cache, picked splits)")
    args = parser.parse_args()
    global LAYERS, HEADS, KV_HEADS, HEAD_DIM
    LAYERS, HEADS, KV_HEADS, HEAD_DIM = MODELS[args.model]
    torch.manual_seed(0)
    rows = []
    for num_seqs, context in CASES if not args.tiles else ():

        picked = picked_splits(num_seqs)
        for cache_dtype in (torch.bfloat16, fp8.FP8_DTYPE):
            for splits in sorted({max(1, picked // 2), picked, picked * 2, picked * 4, 16} - {32, 64}):
                row = run_case(num_seqs, context, cache_dtype, min(splits, triton_decode.MAX_SPLITS))
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
                rows.append(row)
    for num_seqs, context in CASES if args.tiles else ():
        for tile in args.tiles:
            row = run_case(num_seqs, context, torch.bfloat16, picked_splits(num_seqs), tile)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            rows.append(row)
    report = {"card": torch.cuda.get_device_name(), "model": args.model, "commit": os.environ.get("FITSERVE_COMMIT", ""), "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "decode_attention.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
