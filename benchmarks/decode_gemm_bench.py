"""How close do a decode step's GEMMs come to the card's read bandwidth?

One device call: the read and copy ceilings, then the 128 linear layers of a Llama-3-8B decode
step (32 layers x qkv, o, gate_up, down; distinct weights, 13.96 GB, so nothing comes from L2)
captured in one CUDA graph and replayed, for a few batch sizes, with each GEMM backend torch
offers (cuBLAS, cuBLASLt) and, at batch 1, kernels/triton_gemv.py with each tile config on each
shape. Writes decode_gemm.json to --out.

    python benchmarks/decode_gemm_bench.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import triton

HIDDEN, INTER, LAYERS = 4096, 14336, 32
SHAPES = {"qkv": (6144, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}


def time_graph(fn, repeats: int = 20) -> float:
    """Milliseconds per call of fn, captured in a CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / repeats


def ceilings() -> dict:
    n = 2 * 2**30  # 2 GiB of bf16
    src = torch.empty(n // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    out = torch.empty((), dtype=torch.bfloat16, device="cuda")
    copy_ms = time_graph(lambda: dst.copy_(src))
    read_ms = time_graph(lambda: torch.amax(src, dim=0, out=out))
    return {"copy_tb_s": 2 * n / copy_ms / 1e9, "read_tb_s (amax)": n / read_ms / 1e9}


def sweep_gemv(weights: list[dict[str, torch.Tensor]], inputs: dict[str, torch.Tensor],
               outs: dict[str, torch.Tensor], report: dict) -> None:
    """kernels/triton_gemv.py at one row: each tile config on each shape (32 layers' weights per
    graph), then the whole step with the default config (triton_gemv.CONFIG)."""
    from fitserve.kernels import triton_gemv

    default = triton_gemv.CONFIG
    for config in CONFIGS:
        triton_gemv.CONFIG = config
        for name in SHAPES:
            def one_shape(name=name) -> None:
                for layer in weights:
                    triton_gemv.gemv(inputs[name][:1], layer[name])
            ms = time_graph(one_shape)
            shape_bytes = sum(layer[name].numel() * 2 for layer in weights)
            key = f"gemv-{name}-n{config[0]}-k{config[1]}-w{config[2]}"
            report["runs"][key] = {"ms": ms, "tb_s": shape_bytes / ms / 1e9}
            print(key, f"{ms:.3f} ms", f"{shape_bytes / ms / 1e9:.2f} TB/s", flush=True)
    triton_gemv.CONFIG = default

    def whole_step() -> None:
        for layer in weights:
            for name, w in layer.items():
                triton_gemv.gemv(inputs[name][:1], w)

    ms = time_graph(whole_step)
    total = sum(w.numel() * 2 for layer in weights for w in layer.values())
    report["runs"][f"batch1-gemv-default-{default}"] = {"ms": ms, "tb_s": total / ms / 1e9}
    print("batch1 gemv default", default, f"{ms:.3f} ms", f"{total / ms / 1e9:.2f} TB/s", flush=True)


CONFIGS = [(bn, bk, w) for bn in (4, 8, 16) for bk in (512, 1024, 2048) for w in (4, 8)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 20])
    args = parser.parse_args()
    torch.manual_seed(0)
    report = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "ceilings": ceilings(), "runs": {}}
    print(report["ceilings"], flush=True)
    weights = [{name: torch.empty(shape, dtype=torch.bfloat16, device="cuda").normal_(0, 0.02)
                for name, shape in SHAPES.items()} for _ in range(LAYERS)]
    total_bytes = sum(w.numel() * 2 for layer in weights for w in layer.values())
    for batch in args.batches:
        inputs = {name: torch.randn(batch, shape[1], dtype=torch.bfloat16, device="cuda") for name, shape in SHAPES.items()}
        outs = {name: torch.empty(batch, shape[0], dtype=torch.bfloat16, device="cuda") for name, shape in SHAPES.items()}

        def torch_step(inputs=inputs, outs=outs) -> None:
            for layer in weights:
                for name, w in layer.items():
                    torch.matmul(inputs[name], w.t(), out=outs[name])

        for library in ("cublas", "cublaslt"):
            torch.backends.cuda.preferred_blas_library(library)
            ms = time_graph(torch_step)
            report["runs"][f"batch{batch}-{library}"] = {"ms": ms, "tb_s": total_bytes / ms / 1e9}
            print(batch, library, f"{ms:.3f} ms", f"{total_bytes / ms / 1e9:.2f} TB/s", flush=True)
        torch.backends.cuda.preferred_blas_library("cublas")
        if batch == 1:
            sweep_gemv(weights, inputs, outs, report)
    report["weight_bytes"] = total_bytes
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "decode_gemm.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
