"""FP8 GEMMs of the Llama-3-8B linear layers on the GPU: bf16 cuBLAS against torch._scaled_mm
(row-wise and per-tensor scales) and the Triton kernel of kernels/triton_fp8.py, by batch rows.
Decides layers/formats/fp8.py's SCALED_MM_MIN_ROWS (docs/quantization.md).

    python benchmarks/fp8_gemm_bench.py --out $OUT     # table on stdout, fp8_gemm.json under --out
    python benchmarks/fp8_gemm_bench.py --small-m --out $OUT   # fp8_small_m.json: the sweep below

`--small-m` sweeps kernels/triton_fp8_small.py at decode sizes (1-32 rows): split-K tiles and
splits, and the one-row GEMV, against bf16 and what served those sizes before, and prints the
best config per (shape, rows): the numbers for its SMALL_M_TABLE.

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

from fitserve.kernels import fp8, triton_fp8, triton_fp8_small, triton_gemv  # noqa: E402
from fitserve.kernels.triton_fp8_small import GemvConfig, SplitKConfig  # noqa: E402
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


def bench(fn, copies: int, warmup_ms: int = 10, rep_ms: int = 60) -> float:
    state = {"i": 0}

    def step():
        fn(state["i"] % copies)
        state["i"] += 1
    return triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def configs_for(rows: int) -> list[GemmConfig]:
    return TRITON_CONFIGS["small" if rows <= 16 else "mid" if rows <= 64 else "large"]


# --small-m: about 100 compiles (a second or less each) and 700 short timings, under 4 minutes.
SMALL_M_ROWS = (1, 4, 16, 20, 32)
SPLIT_TILES = ((32, 128, 4), (32, 256, 4), (64, 128, 4), (64, 256, 4), (64, 256, 8), (128, 128, 4),
               (128, 256, 8))  # (BLOCK_N, BLOCK_K, num_warps); BLOCK_M 16 up to 16 rows, else 32
SPLITS = (1, 2, 4, 8, 16)
MAX_WAVES = 4  # more split programs than 4 per SM only add partial-sum traffic
GEMV_CONFIGS = (GemvConfig(4, 2048, 8), GemvConfig(8, 2048, 8), GemvConfig(8, 1024, 4), GemvConfig(16, 1024, 8),
                GemvConfig(4, 4096, 8))
SWEEP_WARMUP_MS, SWEEP_REP_MS = 5, 25


def split_configs(rows: int, n: int, k: int, sms: int) -> list[SplitKConfig]:
    """The split-K grid for one product: splits whose K slices are whole BLOCK_K tiles."""
    block_m = 16 if rows <= 16 else 32
    configs = []
    for block_n, block_k, warps in SPLIT_TILES:
        tiles = triton.cdiv(rows, block_m) * triton.cdiv(n, block_n)
        for split in SPLITS:
            if k % (split * block_k) == 0 and (split == 1 or tiles * split <= MAX_WAVES * sms):
                configs.append(SplitKConfig(block_m, block_n, block_k, split, warps, 4))
    return configs


def timed(fn, copies: int) -> float | str:
    """ms, or the error of a config that does not compile or fit (the sweep goes on)."""
    try:
        return bench(fn, copies, SWEEP_WARMUP_MS, SWEEP_REP_MS)
    except Exception as error:  # noqa: BLE001  (OutOfResources, CUDA errors, unsupported forms)
        return f"error: {str(error)[:160]}"


def small_m_row(name: str, n: int, k: int, rows: int, w16: list, qw: list, sms: int) -> dict:
    copies = len(qw)
    x = torch.randn(rows, k, device=w16[0].device).to(torch.bfloat16)
    qx, sx = triton_fp8.quantize_per_token(x)
    bf16 = torch.bfloat16
    row = {"shape": name, "N": n, "K": k, "M": rows, "bf16_ms": timed(lambda i: F.linear(x, w16[i]), copies)}
    if rows == 1:
        row["bf16_gemv_ms"] = timed(lambda i: triton_gemv.gemv(x, w16[i]), copies)
    row["scaled_mm_rowwise_fast_ms"] = timed(lambda i: fp8.scaled_mm_torch(qx, sx, *qw[i], bf16, True), copies)
    row["triton_fp8_default_ms"] = timed(lambda i: triton_fp8.scaled_mm(qx, sx, *qw[i], bf16), copies)
    choice = triton_fp8_small.plan(rows, n, k, sms)
    row["plan"] = f"{choice.kernel} {choice.config}" if choice else None
    if choice is not None:
        row["plan_ms"] = timed(lambda i: triton_fp8_small.run(choice, qx, sx, *qw[i], bf16), copies)
    candidates = {}
    for cfg in split_configs(rows, n, k, sms):
        candidates[str(cfg)] = timed(lambda i, cfg=cfg: triton_fp8_small.scaled_mm_split_k(qx, sx, *qw[i], bf16, cfg), copies)
    for cfg in GEMV_CONFIGS if rows == 1 else ():
        candidates[str(cfg)] = timed(lambda i, cfg=cfg: triton_fp8_small.gemv(qx, sx, *qw[i], bf16, cfg), copies)
    row["candidates_ms"] = candidates
    ok = {key: ms for key, ms in candidates.items() if isinstance(ms, float)}
    row["best"] = min(ok, key=ok.get) if ok else None
    row["best_ms"] = ok[row["best"]] if ok else None
    row["best_weight_tb_s"] = n * k / (row["best_ms"] * 1e-3) / 1e12 if ok else None
    return row


def sweep_small_m(out_dir: Path) -> None:
    dev = torch.device("cuda")
    sms = triton_fp8_small.num_sms(dev)
    report = {"card": torch.cuda.get_device_name(), "sms": sms, "torch": torch.__version__,
              "triton": triton.__version__, "commit": os.environ.get("FITSERVE_COMMIT", "unknown"), "results": []}

    def fmt(v):
        return f"{v:7.4f}" if isinstance(v, float) else "    n/a"
    print(f"{'shape':8} {'M':>3} {'bf16':>7} {'smRowF':>7} {'trit':>7} {'plan':>7} {'best':>7} {'TB/s':>5}  best config (ms)")
    for name, (n, k) in SHAPES.items():
        copies = max(2, COPIES_BYTES // (n * k))
        w16 = [(torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16) for _ in range(min(copies, 4))]
        w16 = [w16[i % len(w16)].clone() for i in range(copies)]
        qw = [fp8.quantize_per_row(w) for w in w16]
        qw = [(q, s.reshape(1, -1).contiguous()) for q, s in qw]
        for rows in SMALL_M_ROWS:
            row = small_m_row(name, n, k, rows, w16, qw, sms)
            report["results"].append(row)
            tb_s = row["best_weight_tb_s"]
            print(f"{name:8} {rows:3d} {fmt(row['bf16_ms'])} {fmt(row['scaled_mm_rowwise_fast_ms'])} "
                  f"{fmt(row['triton_fp8_default_ms'])} {fmt(row.get('plan_ms'))} {fmt(row['best_ms'])} "
                  f"{tb_s or 0:5.2f}  {row['best']}", flush=True)
        del w16, qw
        torch.cuda.empty_cache()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fp8_small_m.json").write_text(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--small-m", action="store_true", help="sweep triton_fp8_small at 1-32 rows instead")
    args = parser.parse_args()
    if args.small_m:
        sweep_small_m(Path(args.out))
        return
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
