"""A decode batch's bf16 linear layers, each way cuBLAS can be asked for them (GPU, one call).

    python benchmarks/skinny_linear_bench.py --model gemma-3-12b --rows 20 64 --out $OUT

Gemma-3-12B's o_proj (4096 -> 3840) read at 1.7 TB/s at 20 rows in `gpu_bench.py kernels`
(results/quant_h200_1fe2dfb/gemma_kernels.txt): cuBLAS chose a 64 x 24 tile without split-K,
60 programs for 132 SMs. This times each of a model's four layer shapes (its layers' count of
distinct weights, one CUDA graph) as `F.linear(x, W)` (x W^T) and as `(W x^T)^T` made contiguous,
the same product asked with the operands swapped, which cuBLAS tiles differently; and checks that
both give the same numbers. Writes skinny_linear.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from decode_gemm_bench import time_graph

# layers, hidden, q + k + v rows, attention output columns, intermediate
MODELS = {"gemma-3-12b": (48, 3840, 8192, 4096, 15360), "llama-3-8b": (32, 4096, 6144, 4096, 14336)}


def shapes(model: str) -> dict[str, tuple[int, int]]:
    _, hidden, qkv, attn, inter = MODELS[model]
    return {"qkv": (qkv, hidden), "o": (hidden, attn), "gate_up": (2 * inter, hidden), "down": (hidden, inter)}


def swapped(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.matmul(w, x.t()).t().contiguous()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma-3-12b", choices=sorted(MODELS))
    parser.add_argument("--rows", nargs="+", type=int, default=[20, 64])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    layers = MODELS[args.model][0]
    rows_out = []
    for name, (n, k) in shapes(args.model).items():
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
        gb = layers * n * k * 2 / 1e9
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            err = ((swapped(x, weights[0]).float() - F.linear(x, weights[0]).float()).norm()
                   / F.linear(x, weights[0]).float().norm()).item()
            for way, fn in (("linear", F.linear), ("swapped", swapped)):
                ms = time_graph(lambda: [fn(x, w) for w in weights])
                row = {"shape": name, "n": n, "k": k, "rows": m, "way": way, "ms": round(ms, 4),
                       "tb_s": round(gb / ms, 3), "rel_err_swapped": err}
                print(json.dumps(row), flush=True)
                rows_out.append(row)
        del weights
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "skinny_linear.json").write_text(json.dumps({"model": args.model, "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()
