"""FP8 decode GEMMs as a decode step runs them: 32 layers' calls captured in one CUDA graph.

`fp8_gemm_bench.py --small-m` times single calls, where a split-K call's second launch and the
host dominate; inside a graph neither does. This times, per Llama-3-8B shape (32 distinct fp8
weights each, nothing from L2) at 1 row and at 24 rows (W6's batch of 20, padded to its graph):
what `Fp8Linear` does now, the general GEMMs, every GEMV tile (1 row) and every split-K tile
(24 rows) of kernels/triton_fp8_small.py. It writes fp8_decode.json and fp8_small_table.json,
the table rows that beat the present choice (`gpu_bench.py --fp8-small-table` loads them).

    python benchmarks/fp8_decode_bench.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from decode_gemm_bench import LAYERS, SHAPES, time_graph

from fitserve.kernels import fp8, triton_fp8, triton_fp8_small
from fitserve.kernels.triton_fp8_small import GemvConfig, SplitKConfig

GEMV_TILES = [GemvConfig(bn, bk, w) for bn in (4, 8, 16, 32) for bk in (512, 1024, 2048, 4096) for w in (4, 8)]
SPLIT_K_TILES = [SplitKConfig(32, bn, bk, split, w) for bn in (32, 64, 128) for bk in (128, 256)
                 for split in (1, 2, 4, 8) for w in (4, 8)]


def present_choice(qx, x_scale, qw, w_scale):
    """What Fp8Linear._gemm_cuda does for per-channel scales (layers/formats/fp8.py)."""
    choice = triton_fp8_small.plan(qx.shape[0], qw.shape[0], qw.shape[1], triton_fp8_small.num_sms(qx.device))
    if choice is not None:
        return triton_fp8_small.run(choice, qx, x_scale, qw, w_scale, torch.bfloat16)
    if qx.shape[0] >= 17:
        return fp8.scaled_mm_torch(qx, x_scale, qw, w_scale, torch.bfloat16, use_fast_accum=True)
    return triton_fp8.scaled_mm(qx, x_scale, qw, w_scale, torch.bfloat16)


def time_shape(fn, weights, name: str, qx, x_scale) -> float:
    def step() -> None:
        for layer in weights:
            fn(qx, x_scale, *layer[name])
    try:
        return time_graph(step)
    except Exception as error:  # a tile that does not compile or fit: recorded, the sweep goes on
        print("failed:", name, repr(error)[:200], flush=True)
        return float("inf")


def sweep(rows: int, weights, report: dict) -> dict[str, dict[str, float]]:
    """Per candidate, ms for the 32 layers of each shape."""
    candidates = {"present": present_choice,
                  "triton_fp8": lambda qx, xs, qw, ws: triton_fp8.scaled_mm(qx, xs, qw, ws, torch.bfloat16),
                  "scaled_mm_fast": lambda qx, xs, qw, ws: fp8.scaled_mm_torch(qx, xs, qw, ws, torch.bfloat16,
                                                                                 use_fast_accum=True)}
    tiles = GEMV_TILES if rows == 1 else SPLIT_K_TILES
    for tile in tiles:
        run = triton_fp8_small.gemv if rows == 1 else triton_fp8_small.scaled_mm_split_k
        candidates[repr(tile)] = lambda qx, xs, qw, ws, run=run, tile=tile: run(qx, xs, qw, ws, torch.bfloat16, tile)
    times = time_candidates(candidates, rows, weights)
    report["runs"][f"rows{rows}"] = times
    return times


def time_candidates(candidates: dict, rows: int, weights, on_timed=None) -> dict[str, dict[str, float]]:
    """ms for each candidate on each shape's 32 layers; on_timed(key, shape, qx, x_scale) after each
    candidate that ran."""
    times: dict[str, dict[str, float]] = {}
    for key, fn in candidates.items():
        times[key] = {}
        for name, (_, inner) in SHAPES.items():
            qx = torch.randn(rows, inner, device="cuda").to(torch.float8_e4m3fn)
            x_scale = torch.rand(rows, 1, device="cuda") + 0.5
            times[key][name] = time_shape(fn, weights, name, qx, x_scale)
            if on_timed is not None and times[key][name] != float("inf"):
                on_timed(key, name, qx, x_scale)
        print(rows, key, {k: round(v, 3) for k, v in times[key].items()}, round(sum(times[key].values()), 3), flush=True)
    return times


WIDE_TILES = [SplitKConfig(bm, bn, bk, split, 4, stages) for bm in (32, 64) for bn in (64, 128) for bk in (128, 256)
              for split in (1, 2, 4) for stages in (4, 6)]


def sweep_tiles(weights, report: dict, name: str, tiles: list, run, rows: int = 24) -> None:
    """Each tile of `run` (scaled_mm_split_k or scaled_mm_swap_ab) at `rows` rows beside the present
    choice: ms per shape (report["runs"][f"{name}_rows{rows}"]) and the relative error on down
    against the exact reference (report[f"{name}_rel_err_down"])."""
    errors: dict[str, float] = {}
    by_key = {repr(tile): tile for tile in tiles}
    candidates = {"present": present_choice}
    for key, tile in by_key.items():
        candidates[key] = lambda qx, xs, qw, ws, tile=tile: run(qx, xs, qw, ws, torch.bfloat16, tile)

    def error_on_down(key: str, shape: str, qx: torch.Tensor, x_scale: torch.Tensor) -> None:
        if shape == "down" and key in by_key:
            qw, w_scale = weights[0][shape]
            expected = fp8.scaled_mm_reference(qx, x_scale, qw, w_scale, torch.float32)
            got = run(qx, x_scale, qw, w_scale, torch.float32, by_key[key])
            errors[key] = ((got - expected).norm() / expected.norm()).item()
            print(f"  {key}: relative error on down {errors[key]:.1e}", flush=True)

    report["runs"][f"{name}_rows{rows}"] = time_candidates(candidates, rows, weights, error_on_down)
    report[f"{name}_rel_err_down"] = errors


def sweep_wide(weights, report: dict, rows: int = 24) -> None:
    """--wide: split-K tiles at `rows` rows with 64-row tiles (Hopper's wgmma, whose fp8 sums are
    not exact float32 without promotion: their error against the reference is recorded) and
    deeper pipelines."""
    triton_fp8_small.MMA_SYNC_MAX_BLOCK_M = 64  # this sweep only: the kernel's guard for exact sums
    sweep_tiles(weights, report, "wide", WIDE_TILES, triton_fp8_small.scaled_mm_split_k, rows)


SWAP_AB_TILES = [triton_fp8_small.SwapABConfig(bn, 32, bk, split, 4, stages)
                 for bn in (64, 128) for bk in (128, 256) for split in (1, 2, 4, 8) for stages in (3, 4, 6)]
SWAP_AB_PROMOTE = [triton_fp8_small.SwapABConfig(128, 32, 128, 2, 4, 4, promote) for promote in (64, 128)]


def sweep_swap_ab(weights, report: dict, rows: int = 24) -> None:
    """--swap-ab: the weight on wgmma's M side (triton_fp8_small.scaled_mm_swap_ab) at `rows` rows,
    beside the present choice and bf16 cuBLAS on the same shapes; the error on down against the
    exact reference for each tile."""
    sweep_tiles(weights, report, "swap_ab", SWAP_AB_TILES + SWAP_AB_PROMOTE, triton_fp8_small.scaled_mm_swap_ab, rows)
    bf16 = {name: torch.randn(32, *shape, device="cuda").to(torch.bfloat16).unbind(0) for name, shape in SHAPES.items()}
    report["runs"][f"bf16_cublas_rows{rows}"] = {}
    for name, (_, inner) in SHAPES.items():
        x = torch.randn(rows, inner, device="cuda").to(torch.bfloat16)
        report["runs"][f"bf16_cublas_rows{rows}"][name] = time_graph(lambda x=x, name=name: [
            torch.nn.functional.linear(x, w) for w in bf16[name]])
        del bf16[name]
    bf16_ms = report["runs"][f"bf16_cublas_rows{rows}"]
    print(rows, "bf16 cuBLAS", {k: round(v, 3) for k, v in bf16_ms.items()}, round(sum(bf16_ms.values()), 3), flush=True)


def sweep_per_tensor(weights, report: dict, rows: int = 24) -> None:
    """--per-tensor: fp8_per_tensor's GEMM (cuBLASLt through torch._scaled_mm) against swap-AB with
    the same per-tensor scales, at `rows` rows."""
    one = torch.ones((), dtype=torch.float32, device="cuda")
    tile = triton_fp8_small.SMALL_M_TABLE[-1].config
    candidates = {
        "cublaslt_per_tensor": lambda qx, xs, qw, ws: fp8.scaled_mm_torch(qx, one, qw, one, torch.bfloat16),
        "swap_ab_per_tensor": lambda qx, xs, qw, ws: triton_fp8_small.run(
            triton_fp8_small.plan(qx.shape[0], qw.shape[0], qw.shape[1], triton_fp8_small.num_sms(qx.device)),
            qx, one, qw, one, torch.bfloat16),
    }
    report["per_tensor_tile"] = repr(tile)
    report["runs"][f"per_tensor_rows{rows}"] = time_candidates(candidates, rows, weights)


def best_table_rows(times1, times24) -> list[dict]:
    """Table rows (SMALL_M_TABLE's form) whose tile beats the present choice summed over shapes."""
    rows = []
    gemv = {k: v for k, v in times1.items() if k.startswith("GemvConfig")}
    best = min(gemv, key=lambda k: sum(gemv[k].values()))
    if sum(gemv[best].values()) < sum(times1["present"].values()):
        tile = next(t for t in GEMV_TILES if repr(t) == best)
        rows.append({"max_rows": 1, "kernel": "gemv", "config": [tile.block_n, tile.block_k, tile.num_warps],
                     "only_if_underfilled": False})
    # At 24 rows: each tile on every shape, or (only_if_underfilled) only where its output tiles
    # leave SMs idle and the general GEMM (row-wise _scaled_mm from 17 rows) elsewhere, as plan() does.
    sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132
    options = []
    for tile in SPLIT_K_TILES:
        tile_ms = times24[repr(tile)]
        for underfilled_only in (False, True):
            total = sum(tile_ms[name] if not underfilled_only
                        or triton_fp8_small.output_tiles(24, num_cols, tile) < sms
                        else times24["scaled_mm_fast"][name] for name, (num_cols, _) in SHAPES.items())
            options.append((total, tile, underfilled_only))
    total, tile, underfilled_only = min(options, key=lambda option: option[0])
    if total < sum(times24["present"].values()):
        rows.append({"max_rows": 32, "kernel": "split_k",
                     "config": [tile.block_m, tile.block_n, tile.block_k, tile.split_k, tile.num_warps],
                     "only_if_underfilled": underfilled_only})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--wide", action="store_true", help="only sweep_wide: 64-row tiles, deeper pipelines")
    parser.add_argument("--swap-ab", action="store_true", help="only sweep_swap_ab: the weight on wgmma's M side")
    parser.add_argument("--per-tensor", action="store_true", help="only sweep_per_tensor: cuBLASLt vs swap-AB")
    args = parser.parse_args()
    torch.manual_seed(0)
    weights = []
    for _ in range(LAYERS):
        layer = {}
        for name, (num_cols, inner) in SHAPES.items():
            qw = torch.randn(num_cols, inner, device="cuda").to(torch.float8_e4m3fn)
            layer[name] = (qw, torch.rand(1, num_cols, device="cuda") / 100)
        weights.append(layer)
    report = {"card": torch.cuda.get_device_name(), "commit": os.environ.get("FITSERVE_COMMIT", ""), "runs": {}}
    if args.per_tensor:
        for rows in (8, 24):
            sweep_per_tensor(weights, report, rows)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "fp8_decode_per_tensor.json").write_text(json.dumps(report, indent=2))
        return
    if args.swap_ab:
        sweep_swap_ab(weights, report)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "fp8_decode_swap_ab.json").write_text(json.dumps(report, indent=2))
        return
    if args.wide:
        sweep_wide(weights, report)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "fp8_decode_wide.json").write_text(json.dumps(report, indent=2))
        return
    times1, times24 = sweep(1, weights, report), sweep(24, weights, report)
    report["table_rows"] = best_table_rows(times1, times24)
    print("table rows:", report["table_rows"], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fp8_decode.json").write_text(json.dumps(report, indent=2))
    (Path(args.out) / "fp8_small_table.json").write_text(json.dumps(report["table_rows"], indent=2))


if __name__ == "__main__":
    main()
