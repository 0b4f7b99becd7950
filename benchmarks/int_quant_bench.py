"""Weight-only kernels of a Llama-3-8B decode step: integer group-quantized (kernels/triton_int_quant.py:
GEMV, tile GEMM) and fp8 on the W8A16 path (kernels/triton_w8a16.py), against
bf16 (the Triton GEMV at one row, cuBLAS above) on the same shapes. The step's 128 linear layers
have distinct weights (nothing comes from L2); each case is captured in one CUDA graph and replayed.
Each kernel's tile configurations are swept; one JSON line per case, all in int_quant.json.

    python benchmarks/int_quant_bench.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fitserve.kernels import triton_gemv, triton_int_quant, triton_w8a16
from gguf_gemv_bench import time_graph  # beside this file: one CUDA graph, replayed

HIDDEN, INTER, LAYERS = 4096, 14336, 32
SHAPES = {"qkv": (6144, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}
GEMV_CONFIGS = [(8, 8, 4), (16, 8, 8), (16, 4, 4)]
W8_GEMV_CONFIGS = [(4, 1024, 4), (2, 2048, 4), (4, 2048, 8)]


def int_layers(bits: int, group_size: int) -> list[tuple]:
    layers = []
    for _ in range(LAYERS):
        for n, k in SHAPES.values():
            groups = k // group_size
            qweight = torch.randint(0, 256, (n, k * bits // 8), dtype=torch.uint8, device="cuda")
            scales = torch.rand(n, groups, device="cuda") * 0.01 + 1e-3
            zeros = torch.full((n, groups), 1 << (bits - 1), dtype=torch.uint8, device="cuda")
            layers.append((qweight, scales, zeros, k))
    return layers


def fp8_layers() -> list[tuple]:
    layers = []
    for _ in range(LAYERS):
        for n, k in SHAPES.values():
            qw = torch.randint(0, 120, (n, k), dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
            layers.append((qw, torch.rand(1, n, device="cuda") * 0.01, k))
    return layers


def layer_bytes(layers: list[tuple]) -> int:
    return sum(t.numel() * t.element_size() for layer in layers for t in layer[:-1])


def report(results: list, **case) -> None:
    case["tb_per_s"] = round(case["weight_gb"] / case["ms"], 2)
    print(json.dumps(case), flush=True)
    results.append(case)


def bench_bf16(results: list, rows_list: list[int]) -> None:
    weights = [(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.01, k)
               for _ in range(LAYERS) for n, k in SHAPES.values()]
    gb = layer_bytes(weights) / 1e9
    for rows in rows_list:
        xs = {k: torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for k in (HIDDEN, INTER)}
        mm = triton_gemv.gemv if rows == 1 else (lambda x, w: x @ w.t())
        ms = time_graph(lambda: [mm(xs[k], w) for w, k in weights])
        report(results, kind="bf16", path="gemv" if rows == 1 else "cublas", rows=rows, ms=round(ms, 3),
               weight_gb=round(gb, 3))


def bench_int(results: list, bits: int, gemv_rows: list[int], tile_rows: list[int], sweep: bool) -> None:
    layers = int_layers(bits, 128)
    gb = layer_bytes(layers) / 1e9
    kind = f"int{bits}_g128"
    cases = [("gemv", rows, cfg) for rows in gemv_rows for cfg in (GEMV_CONFIGS if sweep else GEMV_CONFIGS[:1])]
    cases += [("tile_gemm", rows, None) for rows in tile_rows]
    for path, rows, cfg in cases:
        if path == "gemv":
            triton_int_quant.GEMV_CONFIG = cfg
        fn = getattr(triton_int_quant, path)
        xs = {k: torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for k in (HIDDEN, INTER)}
        try:
            ms = time_graph(lambda: [fn(xs[k], q, s, z, None, bits) for q, s, z, k in layers])
        except Exception as error:  # a tile too large for shared memory: recorded, the sweep goes on
            print(json.dumps({"kind": kind, "path": path, "rows": rows, "config": cfg, "error": str(error)[:200]}))
            continue
        report(results, kind=kind, path=path, rows=rows, config=cfg, ms=round(ms, 3), weight_gb=round(gb, 3))


def bench_w8a16(results: list, gemv_rows: list[int], tile_rows: list[int]) -> None:
    layers = fp8_layers()
    gb = layer_bytes(layers) / 1e9
    cases = [("gemv", rows, cfg) for rows in gemv_rows for cfg in W8_GEMV_CONFIGS]
    cases += [("weight_only_mm", rows, None) for rows in tile_rows]
    for path, rows, cfg in cases:
        if cfg:
            triton_w8a16.GEMV_CONFIG = cfg
        fn = getattr(triton_w8a16, path)
        xs = {k: torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for k in (HIDDEN, INTER)}
        ms = time_graph(lambda: [fn(xs[k], q, s) for q, s, k in layers])
        report(results, kind="fp8_w8a16", path=path, rows=rows, config=cfg, ms=round(ms, 3), weight_gb=round(gb, 3))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--no-sweep", action="store_true", help="each kernel's current configuration only")
    args = parser.parse_args()
    results: list = []
    bench_bf16(results, [1, 4, 16, 64, 256])
    torch.cuda.empty_cache()
    bench_int(results, 4, [1], [2, 16, 64, 256, 2048], sweep=not args.no_sweep)
    torch.cuda.empty_cache()
    bench_int(results, 8, [1], [16, 64], sweep=False)
    torch.cuda.empty_cache()
    bench_w8a16(results, [1], [16, 64])
    Path(args.out, "int_quant.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
