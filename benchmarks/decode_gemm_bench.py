"""How close do a decode step's GEMMs come to the card's read bandwidth?

One device call: the read and copy ceilings, then the 128 linear layers of a Llama-3-8B decode
step (32 layers x qkv, o, gate_up, down; distinct weights, 13.96 GB, so nothing comes from L2)
captured in one CUDA graph and replayed, for a few batch sizes, with each GEMM backend torch
offers (cuBLAS, cuBLASLt) and, at batch 1, a plain Triton GEMV. Writes decode_gemm.json to --out.

    python benchmarks/decode_gemm_bench.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

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


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, K: tl.constexpr, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :])
        x = tl.load(x_ptr + cols)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    tl.store(y_ptr + rows, acc.to(y_ptr.dtype.element_ty))


def triton_gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, block_n: int, block_k: int, warps: int) -> None:
    n, k = w.shape
    _gemv_kernel[(n // block_n,)](x, w, out, k, w.stride(0), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)


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
        if batch != 1:
            continue
        for block_n, block_k, warps in ((4, 512, 4), (8, 512, 4), (8, 1024, 8), (16, 256, 4), (16, 512, 8), (32, 256, 8)):
            def triton_step(inputs=inputs, outs=outs, block_n=block_n, block_k=block_k, warps=warps) -> None:
                for layer in weights:
                    for name, w in layer.items():
                        triton_gemv(inputs[name][0], w, outs[name][0], block_n, block_k, warps)
            expected = F.linear(inputs["down"], weights[0]["down"])
            triton_gemv(inputs["down"][0], weights[0]["down"], outs["down"][0], block_n, block_k, warps)
            error = (outs["down"].float() - expected.float()).abs().max().item()
            ms = time_graph(triton_step)
            key = f"batch1-triton-n{block_n}-k{block_k}-w{warps}"
            report["runs"][key] = {"ms": ms, "tb_s": total_bytes / ms / 1e9, "max_abs_error": error}
            print(key, f"{ms:.3f} ms", f"{total_bytes / ms / 1e9:.2f} TB/s", f"err {error:.3g}", flush=True)
    report["weight_bytes"] = total_bytes
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "decode_gemm.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
