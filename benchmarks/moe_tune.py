"""Which tiles should the fused MoE kernel use at each batch size? One device call.

Mixtral-8x7B's expert shapes (8 experts of 4096 -> 2 x 14336 -> 4096, top 2, bf16; one layer's
2.8 GB of experts, far beyond L2) at token counts from a single decode to a full 2048-token prefill
chunk, with uniform random routing (what a random-weight router gives). For each count:

- the kernel as it ships (kernels/triton_moe.py `config_for`), whole;
- each candidate tile of each of the two grouped GEMMs on its own (gate_up: [T*k, 4096] x
  [28672, 4096]^T; down: [T*k, 14336] x [4096, 14336]^T), per block height BLOCK_M (the align step's,
  shared by both GEMMs), and the best pair, whole;
- the peer in the same process: the pure-torch path (kernels/moe_reference.py: cuBLAS per chosen
  expert; one host sync per call);
- the floors: the chosen experts' bytes over the card's copy bandwidth, the products' FLOPs over its
  bf16 matmul rate, both measured here.

Each GEMM runs alone under triton's do_bench (one launch, GPU-bound). A whole fused_moe call is some
twenty launches (the align step's torch ops, the GEMMs, the SiLU, the sum): launched one by one its
time at a few tokens is the host's (about 0.9 ms at one token where the two GEMMs take 0.19 ms), so
whole calls are timed as a CUDA graph's replays, as decode steps run.

Writes moe_tune.json to --out and prints a table. `--write-table PATH` also writes each size's best
pair in kernels/moe_tiles.json's form (kernels/moe_tiles.py) with the card, shape and commit, so one
call can measure the tiles and then serve with them; the file comes back and is committed.
`--table-from moe_tune.json` writes the table again from a saved report, no GPU.

    python benchmarks/moe_tune.py --out $OUT --write-table src/fitserve/kernels/moe_tiles.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
from pathlib import Path

import torch

from fitserve.kernels import moe_reference, moe_tiles
from fitserve.kernels.moe_tiles import MoeConfig

try:  # CUDA machines; without triton only --table-from works
    import triton
    import triton.testing
    from decode_gemm_bench import time_graph  # a function's ms, captured in a CUDA graph and replayed
    from gpu_bench import measure_ceilings

    from fitserve.kernels import triton_moe
except ImportError:
    triton = None

HIDDEN, INTER, EXPERTS, TOP_K = 4096, 14336, 8, 2
TOKENS = (1, 4, 16, 20, 32, 64, 128, 256, 512, 1024, 2048)
# (BLOCK_N, BLOCK_K, num_warps, num_stages) per BLOCK_M
TILES = {
    16: [(64, 64, 4, 3), (64, 128, 4, 4), (128, 64, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3), (256, 64, 4, 3),
         (128, 128, 8, 3)],
    32: [(64, 64, 4, 4), (64, 128, 4, 4), (128, 64, 4, 4), (128, 128, 4, 3), (128, 64, 8, 4)],
    64: [(64, 32, 4, 3), (64, 64, 4, 4), (128, 64, 4, 4), (128, 64, 8, 4), (256, 64, 8, 3), (128, 128, 8, 3)],
    128: [(64, 64, 4, 4), (128, 64, 8, 4), (256, 64, 8, 3), (128, 128, 8, 3)],
}


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def floors_ms(ids: torch.Tensor, ceil: dict) -> dict:
    """The chosen experts' weights read once, and the products' FLOPs, at the measured rates."""
    experts_read = ids.unique().numel()
    weight_bytes = experts_read * 3 * HIDDEN * INTER * 2
    flops = 2 * ids.numel() * 3 * HIDDEN * INTER
    return {"experts_read": experts_read, "read_ms": weight_bytes / ceil["copy_bytes_per_s"] * 1e3,
            "compute_ms": flops / ceil["bf16_flops_per_s"] * 1e3}


def tune_one(num_tokens: int, w13: torch.Tensor, w2: torch.Tensor, ceil: dict) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    x = torch.randn(num_tokens, HIDDEN, generator=gen, device="cuda").to(torch.bfloat16)
    logits = torch.randn(num_tokens, EXPERTS, generator=gen, device="cuda")
    weights, ids = moe_reference.route(logits, TOP_K, renormalize=True)
    num_choices = ids.numel()
    flat_weights = weights.reshape(-1).contiguous()
    gate_up = torch.empty(num_choices, 2 * INTER, dtype=x.dtype, device="cuda")
    hidden = torch.randn(num_choices, INTER, generator=gen, device="cuda").to(x.dtype)
    down = torch.empty(num_choices, HIDDEN, dtype=x.dtype, device="cuda")
    row = {"tokens": num_tokens, "choices": num_choices, **floors_ms(ids, ceil)}
    shipped = moe_tiles.config_for(num_choices, EXPERTS, x.dtype)
    row["shipped"] = {"config": config_dict(shipped),
                      "ms": time_graph(lambda: triton_moe.fused_moe(x, w13, w2, weights, ids))}
    row["torch_ms"] = bench_ms(lambda: moe_reference.experts(x, w13, w2, weights, ids))
    row["tiles"], best = [], None
    for block_m, tiles in TILES.items():
        aligned = triton_moe.align_to_experts(ids, EXPERTS, block_m)
        gemm_best = {}
        for name, a, b, c, divisor, mul in (("gate_up", x, w13, gate_up, TOP_K, False),
                                            ("down", hidden, w2, down, 1, True)):
            for tile in tiles:
                try:
                    ms = bench_ms(lambda: triton_moe._gemm(a, b, c, flat_weights, aligned, divisor, mul, block_m, tile))
                except Exception as exc:  # a tile beyond the card's shared memory: recorded, skipped
                    row["tiles"].append({"block_m": block_m, "gemm": name, "tile": tile, "error": str(exc)[:200]})
                    continue
                row["tiles"].append({"block_m": block_m, "gemm": name, "tile": tile, "ms": ms})
                if name not in gemm_best or ms < gemm_best[name][1]:
                    gemm_best[name] = (tile, ms)
        if len(gemm_best) == 2:
            total = gemm_best["gate_up"][1] + gemm_best["down"][1]
            if best is None or total < best[1]:
                best = (MoeConfig(block_m, gemm_best["gate_up"][0], gemm_best["down"][0]), total)
    config = best[0]
    row["best"] = {"config": config_dict(config),
                   "ms": time_graph(lambda: triton_moe.fused_moe(x, w13, w2, weights, ids, config))}
    got = triton_moe.fused_moe(x, w13, w2, weights, ids, config).float()
    want = moe_reference.experts(x, w13, w2, weights, ids).float()
    row["best"]["max_rel_error"] = ((got - want).abs().max() / want.abs().max()).item()
    return row


def config_dict(config: MoeConfig) -> dict:
    return {"block_m": config.block_m, "gate_up": list(config.gate_up), "down": list(config.down)}


def table_entry(row: dict, num_experts: int) -> dict:
    """One size's entry: the pair of each GEMM's fastest tile (at the block height whose pair is
    fastest), with the whole call's time beside the shipped tiles'."""
    return {"max_rows_per_expert": row["choices"] / num_experts, "tokens": row["tokens"], **row["best"]["config"],
            "ms": round(row["best"]["ms"], 4), "shipped_ms": round(row["shipped"]["ms"], 4)}


def write_table(path: Path, report: dict, commit: str | None = None) -> None:
    """Each measured size's entry, smallest first, as kernels/moe_tiles.py loads them."""
    if commit is None:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    tiles = [table_entry(row, report["shape"]["experts"]) for row in sorted(report["rows"], key=lambda r: r["choices"])]
    table = {"measured_by": "benchmarks/moe_tune.py", "card": report["ceilings"]["card"], "commit": commit,
             "shape": report["shape"], "tiles": tiles}
    path.write_text(json.dumps(table, indent=1) + "\n")
    moe_tiles.load_table(path)  # it loads, or this call fails here rather than at serving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--write-table", type=Path, help="the best tiles, as kernels/moe_tiles.json")
    parser.add_argument("--table-from", type=Path, help="a saved moe_tune.json: only write --write-table from it")
    parser.add_argument("--commit", help="the measured tree's commit, for --table-from")
    args = parser.parse_args()
    if args.table_from:
        write_table(args.write_table, json.loads(args.table_from.read_text()), args.commit)
        return
    ceil = measure_ceilings()
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen, device="cuda") * HIDDEN ** -0.5).to(torch.bfloat16)
    w2 = (torch.randn(EXPERTS, HIDDEN, INTER, generator=gen, device="cuda") * INTER ** -0.5).to(torch.bfloat16)
    report = {"ceilings": ceil, "shape": {"hidden": HIDDEN, "inter": INTER, "experts": EXPERTS, "top_k": TOP_K},
              "rows": []}
    print("| tokens | floor (read, compute) | shipped | best | torch | best tiles |\n|---:|---|---:|---:|---:|---|")
    for num_tokens in args.tokens:
        row = tune_one(num_tokens, w13, w2, ceil)
        report["rows"].append(row)
        floor = max(row["read_ms"], row["compute_ms"])
        print(f"| {num_tokens} | {floor:.3f} ms ({row['read_ms']:.3f}, {row['compute_ms']:.3f}) "
              f"| {row['shipped']['ms']:.3f} ms ({floor / row['shipped']['ms']:.0%}) "
              f"| {row['best']['ms']:.3f} ms ({floor / row['best']['ms']:.0%}) | {row['torch_ms']:.3f} ms "
              f"| {row['best']['config']} |", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "moe_tune.json").write_text(json.dumps(report, indent=1))
    if args.write_table:
        write_table(args.write_table, report)
    assert all(math.isfinite(r["best"]["max_rel_error"]) and r["best"]["max_rel_error"] < 2e-2 for r in report["rows"])


if __name__ == "__main__":
    main()
