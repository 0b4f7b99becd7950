"""Planned vs allocated GPU memory at start-up: Llama-3-8B-Instruct (dummy weights, bf16) at several
--gpu-memory-utilization values, each start-up in its own process. One device call:

    python benchmarks/startup_memory.py all --out $OUT      # writes $OUT/startup_memory.json
    python benchmarks/startup_memory.py one --utilization 0.5   # one start-up, JSON on stdout

For each utilization it records what `fitserve plan --gpu-memory <this card's total>` says
before anything runs, what start-up planned (with the card's measured free memory) and what
it measured and allocated, the KV blocks of each, and the self-explaining message when the
setting cannot fit. A short stress run after start-up (a full batch with the sampler's most
expensive settings, and a long chunked prefill) checks that peak use stays inside the budget.
Imports only what the engine needs (no HTTP stack).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
CONFIG_DIR = ROOT / "configs" / "llama-3-8b-instruct"
UTILIZATIONS = (0.1, 0.3, 0.5, 0.9, 1.0)  # 0.1 and 1.0: the two failures of the guide's table (weights; free memory)
# The same start-up with torch's expandable segments: how much of the stress run's overshoot
# of the budget is the caching allocator's fragmentation (cached, free, but not returned).
VARIANTS = ((0.3, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),)
PROVENANCE_FILE = ROOT / "benchmarks" / "results" / "provenance_startup_memory.json"  # written before the call
STRESS_PROMPT_TOKENS = 64
STRESS_OUTPUT_TOKENS = 16
LONG_PROMPT_TOKENS = 8000


def _plan_only(config, total_bytes: int) -> dict:
    """What `fitserve plan --gpu-memory <total>` prints, from the config alone."""
    from fitserve.startup import plan_inputs
    from fitserve.plan.planner import plan_memory, resolve_max_model_len
    from fitserve.plan.report import plan_to_json
    from fitserve.weights.source import resolve_model_source

    import torch

    source = resolve_model_source(config)
    max_model_len = resolve_max_model_len(config.scheduler.max_model_len, source.arch)
    inputs = plan_inputs(config, source, max_model_len, torch.device("cuda"), None)
    from dataclasses import replace
    return plan_to_json(plan_memory(replace(inputs, device_total_bytes=total_bytes)))


def _stress(built) -> dict:
    """A batch as large as --max-num-seqs with top-k/top-p/min-p, then one long prompt; peak device use."""
    import torch

    from fitserve.sampling_params import SamplingParams

    engine = built.engine
    capacity_tokens = engine.kv_cache.pool.num_blocks * engine.block_size
    per_request = STRESS_PROMPT_TOKENS + STRESS_OUTPUT_TOKENS + engine.block_size
    num_requests = max(1, min(engine.limits.scheduler.max_num_seqs, capacity_tokens // per_request))
    rng = random.Random(0)
    params = SamplingParams(max_tokens=STRESS_OUTPUT_TOKENS, temperature=1.0, top_p=0.9, top_k=50, min_p=0.05,
                            ignore_eos=True)
    for i in range(num_requests):
        prompt = [rng.randrange(engine.limits.vocab_size) for _ in range(STRESS_PROMPT_TOKENS)]
        engine.add_request(engine.make_request(f"s{i}", prompt, params))
    if capacity_tokens >= LONG_PROMPT_TOKENS + 64:
        long_prompt = [rng.randrange(engine.limits.vocab_size) for _ in range(LONG_PROMPT_TOKENS)]
        engine.add_request(engine.make_request("long", long_prompt, SamplingParams(max_tokens=4, ignore_eos=True)))
    torch.cuda.reset_peak_memory_stats()
    min_free = torch.cuda.mem_get_info()[0]
    start_s = time.monotonic()
    steps = 0
    while engine.has_unfinished:
        engine.step()
        steps += 1
        min_free = min(min_free, torch.cuda.mem_get_info()[0])
    return {"num_requests": num_requests, "long_prompt": capacity_tokens >= LONG_PROMPT_TOKENS + 64,
            "steps": steps, "seconds": time.monotonic() - start_s,
            "min_free_bytes": min_free, "max_reserved_bytes": torch.cuda.max_memory_reserved(),
            "max_allocated_bytes": torch.cuda.max_memory_allocated(),
            "num_preemptions": engine.scheduler.num_preemptions_total}


def run_one(utilization: float, fp8: bool = False) -> dict:
    import torch

    from fitserve.config import CacheConfig, ConfigError, EngineConfig
    from fitserve.startup import build_engine

    config = EngineConfig(model=str(CONFIG_DIR), load_format="dummy", dtype="bfloat16",
                          quantization="fp8" if fp8 else None,
                          cache=CacheConfig(gpu_memory_utilization=utilization, kv_cache_dtype="fp8" if fp8 else "auto"))
    total_bytes = torch.cuda.mem_get_info()[1]
    row: dict = {"utilization": utilization, "plan_only": _plan_only(config, total_bytes)}
    start_s = time.monotonic()
    try:
        built = build_engine(config, progress=False)
    except ConfigError as error:
        row.update(started=False, error=str(error), seconds=time.monotonic() - start_s,
                   torch_allocated_at_failure_bytes=torch.cuda.memory_allocated())
        return row
    memory = built.memory
    allocated = built.engine.kv_cache.pool.num_blocks
    planned = memory.planned.num_kv_blocks
    plan_only = row["plan_only"]["num_kv_blocks"]
    row.update(
        started=True, seconds=time.monotonic() - start_s, startup=memory.to_json(), table=memory.table(),
        allocated_kv_blocks=allocated, planned_kv_blocks=planned, plan_only_kv_blocks=plan_only,
        planned_vs_allocated_pct=100.0 * (planned - allocated) / allocated,
        plan_only_vs_allocated_pct=100.0 * (plan_only - allocated) / allocated,
    )
    row["stress"] = _stress(built)
    stress = row["stress"]
    budget_end = memory.start.used_bytes + memory.planned.budget_bytes  # the context plus the budget
    stress["budget_end_bytes"] = budget_end
    stress["peak_used_bytes"] = total_bytes - stress["min_free_bytes"]  # what nvidia-smi shows: cached too
    stress["within_budget"] = stress["peak_used_bytes"] <= budget_end
    # What live tensors needed at the peak, plus everything outside torch: cached-but-free blocks left out.
    stress["peak_needed_bytes"] = memory.end.non_torch_bytes + stress["max_allocated_bytes"]
    stress["needed_within_budget"] = stress["peak_needed_bytes"] <= budget_end
    row["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    return row


def _environment() -> dict:
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    provenance = json.loads(PROVENANCE_FILE.read_text()) if PROVENANCE_FILE.is_file() else {}
    return {"card": torch.cuda.get_device_name(0), "total_bytes": torch.cuda.mem_get_info()[1],
            "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "commit": os.environ.get("FITSERVE_COMMIT") or provenance.get("commit"),
            "uncommitted_files": provenance.get("uncommitted_files"),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def run_all(out_dir: Path, fp8: bool = False, utilizations: tuple[float, ...] = UTILIZATIONS) -> None:
    rows = []
    variants = [] if fp8 else list(VARIANTS)
    for utilization, env in [(u, {}) for u in utilizations] + variants:
        child = subprocess.run([sys.executable, __file__, "one", "--utilization", str(utilization)]
                               + (["--fp8"] if fp8 else []),
                               capture_output=True, text=True, timeout=240, env={**os.environ, **env})
        try:
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        except (json.JSONDecodeError, IndexError):
            rows.append({"utilization": utilization, "crashed": True, "returncode": child.returncode,
                         "stderr_tail": child.stderr[-3000:]})
        print(f"utilization {utilization}: {json.dumps(rows[-1])[:400]}", flush=True)
        print(child.stderr[-1500:], flush=True)
    model = "configs/llama-3-8b-instruct (--load-format dummy, bfloat16" + (", --quantization fp8 --kv-cache-dtype fp8)" if fp8 else ")")
    result = {"benchmark": "startup_memory", "model": model,
              "environment": _environment(), "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ("startup_memory_fp8.json" if fp8 else "startup_memory.json")).write_text(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("one")
    one.add_argument("--utilization", type=float, required=True)
    one.add_argument("--fp8", action="store_true", help="--quantization fp8 --kv-cache-dtype fp8")
    every = sub.add_parser("all")
    every.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    every.add_argument("--fp8", action="store_true", help="--quantization fp8 --kv-cache-dtype fp8")
    every.add_argument("--utilizations", type=float, nargs="+", default=list(UTILIZATIONS))
    args = parser.parse_args()
    if args.command == "one":
        import logging
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        print(json.dumps(run_one(args.utilization, args.fp8)))
    else:
        run_all(args.out, args.fp8, tuple(args.utilizations))


if __name__ == "__main__":
    main()
