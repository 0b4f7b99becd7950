"""Where a decode step's GPU time goes, kernel by kernel, for a model shape (dummy weights, eager).

    python benchmarks/decode_kernel_profile.py --model-config configs/gemma-3-12b-it --batch 20 --out $OUT

Prefills `--batch` requests of `--prompt` tokens, then profiles `--steps` decode steps with
torch.profiler and groups the CUDA kernels by name: milliseconds a step and share of the step's
kernel time. Eager mode launches the same kernels as the CUDA graph replays (which hide them from
the profiler); launch gaps are not counted, so the sum is the GPU's busy time, below the graph's step.
Prints one JSON object (and writes it under --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench  # noqa: E402


def profile(args: argparse.Namespace) -> dict:
    from fitserve.sampling_params import SamplingParams

    engine, _ = gpu_bench.build_fitserve(args)
    engine.async_scheduling = False
    params = SamplingParams(max_tokens=args.steps + 40, temperature=0.0, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(engine.make_request(f"p{i}", [1 + (i * 7 + j) % 1000 for j in range(args.prompt)], params))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()):
        engine.step()
    for _ in range(5):  # warm
        engine.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    per_kernel_us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel_us[event.name[:90]] += event.device_time
            calls[event.name[:90]] += 1
    total_us = sum(per_kernel_us.values())
    rows = sorted(per_kernel_us.items(), key=lambda kv: -kv[1])
    return {"model_config": Path(args.model_config).name, "batch": args.batch, "prompt": args.prompt,
            "steps": args.steps, "kernel_ms_per_step": total_us / args.steps / 1000,
            "kernels_per_step": sum(calls.values()) / args.steps,
            "top": [{"kernel": name, "ms_per_step": us / args.steps / 1000, "share": us / total_us,
                     "calls_per_step": calls[name] / args.steps} for name, us in rows[:args.top]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-config", type=Path, default=gpu_bench.CONFIG_DIR)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    # what gpu_bench.build_fitserve reads, at the benchmark's defaults, eager
    args.quant_variant, args.budget_gib, args.gpu_memory_utilization = "bf16", None, 0.9
    args.fp8_small_table, args.pdl, args.fp8_weight_only = None, True, False
    args.enforce_eager, args.disable_async_output_proc, args.async_scheduling = True, False, False
    args.max_num_seqs, args.max_num_batched_tokens = 256, 2048
    report = profile(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"decode_kernels_{report['model_config']}_b{args.batch}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
