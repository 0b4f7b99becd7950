"""The fp8 path's quantizing row kernels (kernels/triton_fused.py): RMSNorm with the residual add
and SiLU-and-multiply, each quantizing its output per token, at decode sizes and several warp
counts per row. 32 calls (a decode step's layers) in one CUDA graph, as the step replays them.

    python benchmarks/fused_quant_bench.py --out $OUT     # prints and writes fused_quant.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from decode_gemm_bench import time_graph

from fitserve.kernels import triton_fused

HIDDEN, INTER, LAYERS = 4096, 14336, 32  # Llama-3-8B
WARPS = (2, 4, 8, 16, 32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    defaults = (triton_fused.norm_warps, triton_fused.silu_quant_warps)
    report = {"card": torch.cuda.get_device_name(), "commit": os.environ.get("FITSERVE_COMMIT"),
              "default_warps": {"rms_norm_quant": defaults[0](HIDDEN),
                                "silu_and_mul_quant": defaults[1](triton_fused.triton.next_power_of_2(INTER))},
              "us_per_call": {}}
    for rows in (1, 20, 64):
        x = [torch.randn(rows, HIDDEN, device="cuda").to(torch.bfloat16) for _ in range(LAYERS)]
        residual = [torch.randn_like(t) for t in x]
        weight = torch.randn(HIDDEN, device="cuda").to(torch.bfloat16)
        gate_up = [torch.randn(rows, 2 * INTER, device="cuda").to(torch.bfloat16) for _ in range(LAYERS)]
        for warps in WARPS:
            triton_fused.norm_warps = lambda hidden, warps=warps: warps
            triton_fused.silu_quant_warps = lambda block, warps=warps: warps
            norm_ms = time_graph(lambda: [triton_fused.rms_norm_quant(a, weight, 1e-5, r) for a, r in zip(x, residual)])
            silu_ms = time_graph(lambda: [triton_fused.silu_and_mul_quant(g) for g in gate_up])
            report["us_per_call"][f"rows{rows}_warps{warps}"] = {"rms_norm_quant": 1000 * norm_ms / LAYERS,
                                                                 "silu_and_mul_quant": 1000 * silu_ms / LAYERS}
            print(rows, warps, {k: round(v, 2) for k, v in report["us_per_call"][f"rows{rows}_warps{warps}"].items()},
                  flush=True)
    triton_fused.norm_warps, triton_fused.silu_quant_warps = defaults
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fused_quant.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
