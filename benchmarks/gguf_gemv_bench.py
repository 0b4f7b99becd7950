"""Decode kernels over packed GGUF blocks (kernels/triton_gguf.py matmul: the GEMV, then the small
GEMM from 5 rows) at 1, 4, 16 and 64 rows, against the bf16 GEMV at one row on the same
shapes: a Llama-3-8B decode step's 128 linear layers (distinct weights, so nothing comes from L2),
each backend captured in one CUDA graph and replayed. Prints one JSON line per case and writes
gguf_gemv.json to --out.

    python benchmarks/gguf_gemv_bench.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--layers", type=int, default=LAYERS)
    args = parser.parse_args()
    results = []
    for rows in (1, 4, 16, 64):
        x_by_k = {k: torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for k in (HIDDEN, INTER)}
        cases: dict[str, int | None] = {"bf16": None, **TYPES}
        for label, ggml_type in cases.items():
            if ggml_type is None and rows > 1:
                continue  # triton_gemv is one row
            weights = []
            for _ in range(args.layers):
                for n, k in SHAPES.values():
                    if ggml_type is None:
                        weights.append((torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.01, None, k))
                    else:
                        row_bytes = gguf.BLOCK_TYPES[ggml_type].row_bytes(k)
                        weights.append((torch.randint(0, 256, (n, row_bytes), dtype=torch.uint8, device="cuda"),
                                        ggml_type, k))
            num_bytes = sum(w.numel() * w.element_size() for w, _, _ in weights)
            ms = time_graph(step(weights, x_by_k))
            result = {"rows": rows, "type": label, "ms": round(ms, 3), "weight_gb": round(num_bytes / 1e9, 3),
                      "tb_per_s": round(num_bytes / ms / 1e9, 2), "config": list(triton_gguf.CONFIG)}
            print(json.dumps(result), flush=True)
            results.append(result)
            del weights
            torch.cuda.empty_cache()
    Path(args.out, "gguf_gemv.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
