"""Weight-only kernels of a Llama-3-8B decode step: integer group-quantized (kernels/triton_int_quant.py's
kernel tables, VARIANTS: the bytes baseline and the words kernels of triton_int_words.py) and, with
--w8a16, fp8 on the W8A16 path (kernels/triton_w8a16.py), against bf16 (the Triton GEMV at one row,
cuBLAS above) on the same shapes in the same call. The step's 128 linear layers have distinct weights
(nothing comes from L2); each case is captured in one CUDA graph and replayed. Before timing a variant
at a row count, its output on the first layer of each shape is compared with the reference
(int_quant.int_quant_mm_reference): `rel_err`, the largest relative norm error. One JSON line per
case; all of them in int_quant.json.

    python benchmarks/int_quant_bench.py --out $OUT                       # every variant, rows 1 16 64 256
    python benchmarks/int_quant_bench.py --variant baseline words --rows 1 2 16 --bits 4 8
    python benchmarks/int_quant_bench.py --dry-run                        # the cases, no GPU needed
    python benchmarks/int_quant_bench.py --per-shape --rows 1 --variant words  # each layer shape alone

--per-shape times each of the four shapes' 32 layers alone (bf16 and the variants) and reports the
registers and spills of every compiled words GEMV and tile kernel (Triton's compiled-kernel metadata).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

HIDDEN, INTER, LAYERS = 4096, 14336, 32
SHAPES = {"qkv": (6144, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}
GROUP_SIZE = 128
DEVICE = "cuda"  # a CPU smoke run of the case loop (interpreter, small SHAPES) may replace it
DEFAULT_ROWS = (1, 16, 64, 256)
W8_GEMV_CONFIGS = [(4, 1024, 4), (2, 2048, 4), (4, 2048, 8)]


def int_layers(bits: int, group_size: int) -> list[tuple]:
    """(qweight, scales, zeros, K) a layer, in int_quant's layout, zeros random as an asymmetric checkpoint's."""
    layers = []
    for _ in range(LAYERS):
        for n, k in SHAPES.values():
            groups = k // group_size
            qweight = torch.randint(0, 256, (n, k * bits // 8), dtype=torch.uint8, device=DEVICE)
            scales = torch.rand(n, groups, device=DEVICE) * 0.01 + 1e-3
            zeros = torch.randint(0, 1 << bits, (n, groups), dtype=torch.uint8, device=DEVICE)
            layers.append((qweight, scales, zeros, k))
    return layers


def fp8_layers() -> list[tuple]:
    layers = []
    for _ in range(LAYERS):
        for n, k in SHAPES.values():
            qw = torch.randint(0, 120, (n, k), dtype=torch.uint8, device=DEVICE).view(torch.float8_e4m3fn)
            layers.append((qw, torch.rand(1, n, device=DEVICE) * 0.01, k))
    return layers


def layer_bytes(layers: list[tuple]) -> int:
    return sum(t.numel() * t.element_size() for layer in layers for t in layer[:-1])


def report(results: list, **case) -> None:
    case["tb_per_s"] = round(case["weight_gb"] / case["ms"], 2)
    print(json.dumps(case), flush=True)
    results.append(case)


def bench_bf16(results: list, rows_list: list[int], time_graph) -> None:
    from fitserve.kernels import triton_gemv
    weights = [(torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.01, k)
               for _ in range(LAYERS) for n, k in SHAPES.values()]
    gb = layer_bytes(weights) / 1e9
    for rows in rows_list:
        xs = {k: torch.randn(rows, k, device=DEVICE, dtype=torch.bfloat16) for k in (HIDDEN, INTER)}
        mm = triton_gemv.gemv if rows == 1 else (lambda x, w: x @ w.t())
        ms = time_graph(lambda: [mm(xs[k], w) for w, k in weights])
        report(results, kind="bf16", path="gemv" if rows == 1 else "cublas", rows=rows, ms=round(ms, 3),
               weight_gb=round(gb, 3))


def variant_error(table, layers: list[tuple], bits: int, xs: dict) -> float:
    """The largest relative norm error against the reference over the first layer of each shape."""
    from fitserve.kernels import int_quant, triton_int_quant
    worst = 0.0
    for q, s, z, k in layers[:len(SHAPES)]:
        got = triton_int_quant.int_quant_mm(xs[k], q, s, z, None, bits, table).float()
        expected = int_quant.int_quant_mm_reference(xs[k], q, s, z, None, bits).float()
        worst = max(worst, ((got - expected).norm() / expected.norm()).item())
    return worst


def bench_int(results: list, bits: int, rows_list: list[int], variants: list[str], time_graph) -> None:
    from fitserve.kernels import triton_int_quant
    layers = int_layers(bits, GROUP_SIZE)
    gb = layer_bytes(layers) / 1e9
    kind = f"int{bits}_g{GROUP_SIZE}"
    for name in variants:
        table = triton_int_quant.VARIANTS[name]
        for rows in rows_list:
            path = "gemv" if rows <= table.gemv_max_rows else "dequant_mm" if rows >= table.dequant_min_rows \
                else "tile_gemm"
            choice = {"gemv": table.gemv, "tile_gemm": table.tile_for(rows)}.get(path, triton_int_quant.DEQUANT_TILE)
            case = dict(kind=kind, variant=name, path=path, rows=rows, kernel=getattr(choice, "kernel", "dequant"))
            xs = {k: torch.randn(rows, k, device=DEVICE, dtype=torch.bfloat16) for k in (HIDDEN, INTER)}
            try:
                err = variant_error(table, layers, bits, xs)
                ms = time_graph(lambda: [triton_int_quant.int_quant_mm(xs[k], q, s, z, None, bits, table)
                                         for q, s, z, k in layers])
            except Exception as error:  # e.g. a tile too large for shared memory: recorded, the rest goes on
                print(json.dumps(dict(case, error=str(error)[:300])), flush=True)
                continue
            report(results, **case, choice=repr(choice), rel_err=float(f"{err:.2e}"), ms=round(ms, 3),
                   weight_gb=round(gb, 3))


def kernel_resources() -> list[dict]:
    """Registers and spills of every compiled words kernel, with its constexprs and warps."""
    from fitserve.kernels import triton_int_words
    found = []
    for kernel in (triton_int_words._gemv_words_kernel, triton_int_words._tile_words_kernel):
        for caches in kernel.device_caches.values():
            for compiled in caches[0].values():
                constants = getattr(getattr(compiled, "src", None), "constants", {}) or {}
                found.append(dict(kernel=kernel.fn.__name__, n_regs=getattr(compiled, "n_regs", None),
                                  n_spills=getattr(compiled, "n_spills", None), num_warps=compiled.metadata.num_warps,
                                  shared=compiled.metadata.shared,
                                  constants={str(k): v for k, v in constants.items() if isinstance(v, (int, bool))}))
    return found


def bench_per_shape(results: list, bits: int, rows_list: list[int], variants: list[str], time_graph) -> None:
    """Each shape's 32 layers alone: bf16 (the Triton GEMV at one row, cuBLAS above) and each variant."""
    from fitserve.kernels import triton_gemv, triton_int_quant
    layers = int_layers(bits, GROUP_SIZE)
    for shape_index, (shape, (n, k)) in enumerate(SHAPES.items()):
        mine = layers[shape_index::len(SHAPES)]
        gb = layer_bytes(mine) / 1e9
        weights = [torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.01 for _ in range(LAYERS)]
        for rows in rows_list:
            x = torch.randn(rows, k, device=DEVICE, dtype=torch.bfloat16)
            mm = triton_gemv.gemv if rows == 1 else (lambda x, w: x @ w.t())
            ms = time_graph(lambda: [mm(x, w) for w in weights])
            report(results, kind="bf16", shape=shape, rows=rows, ms=round(ms, 4),
                   weight_gb=round(2 * n * k * LAYERS / 1e9, 3))
            for name in variants:
                table = triton_int_quant.VARIANTS[name]
                ms = time_graph(lambda: [triton_int_quant.int_quant_mm(x, q, sc, z, None, bits, table)
                                         for q, sc, z, _ in mine])
                report(results, kind=f"int{bits}_g{GROUP_SIZE}", variant=name, shape=shape, rows=rows, ms=round(ms, 4),
                       weight_gb=round(gb, 3))
        torch.cuda.empty_cache()
    for resources in kernel_resources():
        print(json.dumps(resources), flush=True)
        results.append(resources)


def bench_w8a16(results: list, gemv_rows: list[int], tile_rows: list[int], time_graph) -> None:
    from fitserve.kernels import triton_w8a16
    layers = fp8_layers()
    gb = layer_bytes(layers) / 1e9
    cases = [("gemv", rows, cfg) for rows in gemv_rows for cfg in W8_GEMV_CONFIGS]
    cases += [("weight_only_mm", rows, None) for rows in tile_rows]
    for path, rows, cfg in cases:
        if cfg:
            triton_w8a16.GEMV_CONFIG = cfg
        fn = getattr(triton_w8a16, path)
        xs = {k: torch.randn(rows, k, device=DEVICE, dtype=torch.bfloat16) for k in (HIDDEN, INTER)}
        ms = time_graph(lambda: [fn(xs[k], q, s) for q, s, k in layers])
        report(results, kind="fp8_w8a16", path=path, rows=rows, config=cfg, ms=round(ms, 3), weight_gb=round(gb, 3))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--variant", nargs="+", default=None,
                        help="kernel tables of triton_int_quant.VARIANTS to time (default: all)")
    parser.add_argument("--rows", nargs="+", type=int, default=list(DEFAULT_ROWS))
    parser.add_argument("--bits", nargs="+", type=int, default=[4], choices=[4, 8])
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 reference rows")
    parser.add_argument("--w8a16", action="store_true", help="also the fp8 weight-only kernels at 1, 16, 64 rows")
    parser.add_argument("--dry-run", action="store_true", help="print the cases and exit (no GPU needed)")
    parser.add_argument("--per-shape", action="store_true",
                        help="each layer shape alone, and the compiled kernels' registers and spills")
    args = parser.parse_args(argv)
    from fitserve.kernels import triton_int_quant  # needs triton; not CUDA
    unknown = sorted(set(args.variant or ()) - set(triton_int_quant.VARIANTS))
    if unknown:
        parser.error(f"unknown --variant {unknown}; choose from {sorted(triton_int_quant.VARIANTS)}")
    args.variant = args.variant or list(triton_int_quant.VARIANTS)
    if any(rows < 1 for rows in args.rows):
        parser.error("--rows must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        for bits in args.bits:
            for name in args.variant:
                print(json.dumps({"bits": bits, "variant": name, "rows": args.rows}))
        return
    if not torch.cuda.is_available():
        raise SystemExit("int_quant_bench times CUDA kernels: no CUDA device here (--dry-run lists the cases)")
    from gguf_gemv_bench import time_graph  # beside this file: one CUDA graph, replayed
    results: list = []
    if args.per_shape:
        for bits in args.bits:
            bench_per_shape(results, bits, args.rows, args.variant, time_graph)
        Path(args.out, "int_quant_shapes.json").write_text(json.dumps(results, indent=1))
        return
    if not args.no_bf16:
        bench_bf16(results, args.rows, time_graph)
        torch.cuda.empty_cache()
    for bits in args.bits:
        bench_int(results, bits, args.rows, args.variant, time_graph)
        torch.cuda.empty_cache()
    if args.w8a16:
        bench_w8a16(results, [1], [16, 64], time_graph)
    Path(args.out, "int_quant.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
