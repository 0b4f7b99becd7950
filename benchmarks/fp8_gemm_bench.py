"""FP8 GEMMs of the Llama-3-8B linear layers on the GPU: bf16 cuBLAS against torch._scaled_mm
(row-wise and per-tensor scales) and the Triton kernel of kernels/triton_fp8.py, by batch rows.
Decides layers/quantization.py's SCALED_MM_MIN_ROWS (docs/quantization.md).

    python benchmarks/fp8_gemm_bench.py --out $OUT     # table on stdout, fp8_gemm.json under --out

Each weight exists in several copies, used in turn, so that no timing reads it from L2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fitserve.kernels import fp8, triton_fp8  # noqa: E402
from fitserve.kernels.triton_fp8 import GemmConfig  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)
ROWS = (1, 8, 20, 32, 64, 128, 256, 2048)
COPIES_BYTES = 256 * 2**20  # enough copies of each weight to be several times the L2
TRITON_CONFIGS = {
    "small": [GemmConfig(16, 64, 256, 4, 4), GemmConfig(16, 32, 256, 4, 5), GemmConfig(16, 128, 128, 4, 4),
              GemmConfig(16, 64, 128, 4, 6)],
    "mid": [GemmConfig(32, 64, 256, 4, 4), GemmConfig(64, 64, 128, 4, 4), GemmConfig(64, 128, 128, 4, 4)],
    "large": [GemmConfig(64, 128, 128, 4, 4), GemmConfig(128, 128, 128, 8, 3), GemmConfig(128, 256, 128, 8, 3),
              GemmConfig(128, 128, 128, 4, 4)],
}


def bench(fn, copies: int) -> float:
    state = {"i": 0}

    def step():
        fn(state["i"] % copies)
        state["i"] += 1
    return triton.testing.do_bench(step, warmup=10, rep=60, return_mode="median")


def configs_for(rows: int) -> list[GemmConfig]:
    return TRITON_CONFIGS["small" if rows <= 16 else "mid" if rows <= 64 else "large"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    dev = torch.device("cuda")
    report = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "commit": os.environ.get("FITSERVE_COMMIT", "unknown"), "results": []}
    print(f"{'shape':8} {'M':>5} {'bf16':>7} {'sm_row':>7} {'sm_rowF':>7} {'sm_tens':>7} {'triton':>7} "
          f"{'quant':>6}  best triton config  (ms)")
    for name, (n, k) in SHAPES.items():
        copies = max(2, COPIES_BYTES // (n * k))
        w16 = [(torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16) for _ in range(min(copies, 4))]
        w16 = [w16[i % len(w16)].clone() for i in range(copies)]
        qw_row = [fp8.quantize_per_row(w) for w in w16]
        qw_row = [(q, s.reshape(1, -1).contiguous()) for q, s in qw_row]
        qw_ten = [fp8.quantize_per_tensor(w) for w in w16]
        for rows in ROWS:
            x = torch.randn(rows, k, device=dev).to(torch.bfloat16)
            qx, sx = triton_fp8.quantize_per_token(x)
            qxt, sxt = fp8.quantize_per_tensor(x)
            row = {"shape": name, "N": n, "K": k, "M": rows}
            row["bf16_ms"] = bench(lambda i: F.linear(x, w16[i]), copies)
            for key, fast in (("scaled_mm_rowwise_ms", False), ("scaled_mm_rowwise_fast_ms", True)):
                try:
                    row[key] = bench(lambda i: fp8.scaled_mm_torch(qx, sx, qw_row[i][0], qw_row[i][1],
                                                                   torch.bfloat16, fast), copies)
                except RuntimeError as error:
                    row[key] = None
                    row[key + "_error"] = str(error)[:200]
            try:
                row["scaled_mm_tensor_ms"] = bench(lambda i: fp8.scaled_mm_torch(qxt, sxt, qw_ten[i][0], qw_ten[i][1],
                                                                                 torch.bfloat16), copies)
            except RuntimeError as error:
                row["scaled_mm_tensor_ms"] = None
                row["scaled_mm_tensor_error"] = str(error)[:200]
            triton_times = {}
            for cfg in configs_for(rows):
                if k % cfg.block_k:
                    continue
                triton_times[str(cfg)] = bench(lambda i: triton_fp8.scaled_mm(qx, sx, qw_row[i][0], qw_row[i][1],
                                                                              torch.bfloat16, cfg), copies)
            row["triton_default_ms"] = bench(lambda i: triton_fp8.scaled_mm(qx, sx, qw_row[i][0], qw_row[i][1],
                                                                            torch.bfloat16), copies)
            row["triton_configs_ms"] = triton_times
            best = min(triton_times, key=triton_times.get)
            row["quant_per_token_ms"] = triton.testing.do_bench(lambda: triton_fp8.quantize_per_token(x),
                                                                warmup=10, rep=40, return_mode="median")
            report["results"].append(row)

            def fmt(v):
                return f"{v:7.4f}" if v is not None else "    n/a"
            print(f"{name:8} {rows:5d} {fmt(row['bf16_ms'])} {fmt(row['scaled_mm_rowwise_ms'])} "
                  f"{fmt(row['scaled_mm_rowwise_fast_ms'])} {fmt(row['scaled_mm_tensor_ms'])} "
                  f"{fmt(triton_times[best])} {row['quant_per_token_ms']:6.4f}  {best}", flush=True)
        del w16, qw_row, qw_ten
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fp8_gemm.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
