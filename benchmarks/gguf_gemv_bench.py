"""Decode kernels over packed GGUF blocks (kernels/triton_gguf.py matmul: the GEMV, then the small
GEMM from 5 rows) at 1, 4, 16 and 64 rows, against the bf16 GEMV at one row on the same
shapes: a Llama-3-8B decode step's 128 linear layers (distinct weights, so nothing comes from L2),
each backend captured in one CUDA graph and replayed. Prints one JSON line per case and writes
gguf_gemv.json to --out.

    python benchmarks/gguf_gemv_bench.py --out $OUT
    python benchmarks/gguf_gemv_bench.py --k-form --out $OUT   # Q4_K as stored against the K-quant form
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import torch

from fitserve.kernels import gguf, triton_gemv, triton_gguf

HIDDEN, INTER, LAYERS = 4096, 14336, 32
SHAPES = {"qkv": (6144, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}
TYPES = {block.name: ggml_type for ggml_type, block in gguf.BLOCK_TYPES.items()}


def time_graph(fn, repeats: int = 20) -> float:
    """Milliseconds per call of fn, captured in a CUDA graph and replayed."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def step(weights: list[tuple[torch.Tensor, int | None, int]], x_by_k: dict[int, torch.Tensor]):
    def run() -> None:
        for w, ggml_type, k in weights:
            x = x_by_k[k]
            if ggml_type is None:
                triton_gemv.gemv(x, w)
            else:
                triton_gguf.matmul(x, w, ggml_type)
    return run


GEMV_CONFIGS = [(8, 512, 4), (4, 512, 4), (16, 256, 4), (8, 1024, 8), (4, 1024, 4), (16, 512, 8), (2, 1024, 4)]
K_FORM_ROWS = (1, 2, 4, 16, 20, 64, 256)
GEMM_CONFIGS = [(64, 256, 4), (32, 256, 4), (64, 128, 4), (128, 256, 8), (32, 512, 8)]


def packed_layers(ggml_type: int | None, layers: int) -> list:
    weights = []
    for _ in range(layers):
        for n, k in SHAPES.values():
            if ggml_type is None:
                weights.append((torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.01, None, k))
            else:
                row_bytes = gguf.BLOCK_TYPES[ggml_type].row_bytes(k)
                weights.append((torch.randint(0, 256, (n, row_bytes), dtype=torch.uint8, device="cuda"), ggml_type, k))
    return weights


def cases(sweep: list[str]) -> list[tuple[str, int, tuple | None]]:
    """(type, rows, config): every type at one row and the default configs; the swept types over configs."""
    out = [(name, 1, None) for name in TYPES]
    for name in sweep:
        out += [(name, rows, cfg) for rows in (1, 4) for cfg in GEMV_CONFIGS]
        out += [(name, rows, cfg) for rows in (16, 64) for cfg in GEMM_CONFIGS]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--sweep", nargs="*", default=["Q4_K", "Q6_K"], help="types whose tile configs are swept")
    parser.add_argument("--k-form", action="store_true",
                        help="only bf16 and Q4_K, as stored against the K-quant form, at K_FORM_ROWS rows")
    args = parser.parse_args()
    if args.k_form:
        return k_form_cases(args)
    results = []
    x_by_k = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for k in (HIDDEN, INTER)}
    weights = packed_layers(None, args.layers)
    ms = time_graph(step(weights, x_by_k))
    gb = sum(w.numel() * w.element_size() for w, _, _ in weights) / 1e9
    results.append({"rows": 1, "type": "bf16", "ms": round(ms, 3), "weight_gb": round(gb, 3), "tb_per_s": round(gb / ms, 2)})
    print(json.dumps(results[-1]), flush=True)
    del weights
    current = None
    default_gemv, default_gemm = triton_gguf.CONFIG, triton_gguf.GEMM_CONFIG
    for name, rows, cfg in cases(args.sweep):
        if name != current:
            weights, current = None, name
            torch.cuda.empty_cache()
            weights = packed_layers(TYPES[name], args.layers)
            gb = sum(w.numel() * w.element_size() for w, _, _ in weights) / 1e9
        triton_gguf.CONFIG = cfg if cfg and rows <= triton_gguf.GEMV_MAX_ROWS else default_gemv
        triton_gguf.GEMM_CONFIG = cfg if cfg and rows > triton_gguf.GEMV_MAX_ROWS else default_gemm
        x_by_k = {k: torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for k in (HIDDEN, INTER)}
        ms = time_graph(step(weights, x_by_k))
        result = {"rows": rows, "type": name, "config": cfg, "ms": round(ms, 3), "weight_gb": round(gb, 3),
                  "tb_per_s": round(gb / ms, 2)}
        print(json.dumps(result), flush=True)
        results.append(result)
    Path(args.out, "gguf_gemv.json").write_text(json.dumps(results, indent=1))


def k_form_cases(args: argparse.Namespace) -> None:
    """Q4_K as the file stores it (triton_gguf.matmul) against the K-quant form (triton_int_quant.int_quant_mm with
    supers: what a 16-bit CUDA layer now holds) and bf16 (layers/linear.py: the GEMV at one row, cuBLAS above),
    at K_FORM_ROWS rows, each checked against matmul_reference on the first layer of each shape (rel_err);
    gguf_k_form.json."""
    from fitserve.kernels import triton_int_quant
    from fitserve.layers.linear import linear
    from fitserve.weights.dummy_gguf import random_blocks

    def multiply(kind: str, x: torch.Tensor, w) -> torch.Tensor:
        if kind == "bf16":
            return linear(x, w)
        if kind == "Q4_K bytes":
            return triton_gguf.matmul(x, w, TYPES["Q4_K"])
        qweight, sub_scales, sub_mins, supers = w
        return triton_int_quant.int_quant_mm(x, qweight, sub_scales, sub_mins, None, 4, supers=supers)

    def run_all(kind: str, weights: list, x_by_k: dict) -> None:
        for w, k in weights:
            multiply(kind, x_by_k[k], w)

    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [shape for _ in range(args.layers) for shape in SHAPES.values()]
    results = []
    for kind in ("bf16", "Q4_K bytes", "Q4_K k-form"):
        if kind == "bf16":
            weights = [(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.01, k) for n, k in shapes]
        else:
            weights = [(random_blocks("Q4_K", (n, k), gen, torch.device("cuda")), k) for n, k in shapes]
            if kind == "Q4_K k-form":
                weights = [(gguf.q4_k_words_form(w), k) for w, k in weights]
        held = [t for w, _ in weights for t in (w if isinstance(w, tuple) else (w,))]
        gb = sum(t.numel() * t.element_size() for t in held) / 1e9
        for rows in K_FORM_ROWS:
            x_by_k = {k: torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for k in (HIDDEN, INTER)}
            err = None
            if kind != "bf16":
                err = 0.0
                for index, (n, k) in enumerate(shapes[:len(SHAPES)]):
                    packed = random_blocks("Q4_K", (n, k), torch.Generator(device="cuda").manual_seed(index),
                                           torch.device("cuda"))
                    got = multiply(kind, x_by_k[k], packed if kind == "Q4_K bytes" else gguf.q4_k_words_form(packed))
                    expected = gguf.matmul_reference(x_by_k[k], packed, TYPES["Q4_K"]).float()
                    err = max(err, ((got.float() - expected).norm() / expected.norm()).item())
            ms = time_graph(partial(run_all, kind, weights, x_by_k))
            result = {"rows": rows, "type": kind, "rel_err": err, "ms": round(ms, 3), "weight_gb": round(gb, 3),
                      "tb_per_s": round(gb / ms, 2)}
            print(json.dumps(result), flush=True)
            results.append(result)
        weights = held = []
        torch.cuda.empty_cache()
    Path(args.out, "gguf_k_form.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
