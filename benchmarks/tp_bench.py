"""Tensor parallelism in one device call (two GPUs): the gpu-marked TP tests, TP=2 vs TP=1 greedy
tokens on Llama-3-8B with dummy weights, and W2 and single-stream for TP=1 and TP=2.

    python benchmarks/tp_bench.py --out $OUT        # the device: writes $OUT/tp_bench.json
    python benchmarks/tp_bench.py --smoke --out /tmp/tp  # the CPU: a tiny config, tiny workloads

Every part runs in its own process (the previous part's GPU memory is gone before the next
starts; a TP=2 part also starts one worker process). Greedy tokens are compared in float32,
where TP=2's different summation order (two partial sums and an all-reduce) moves logits by
~1e-6 and cannot flip a random model's top token; bf16 moves them by ~1e-2, enough to flip
near-ties of random weights, so bf16 agreement is recorded, not required. The same seed gives
the same dummy weights at any TP size (each tensor drawn whole from a generator seeded by its
name, then sliced). W2 and single-stream run in bf16 with CUDA graphs, as gpu_bench.py does,
through its run_workload.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench  # noqa: E402  (puts src/ on the path)

ROOT = gpu_bench.ROOT
NUM_PROMPTS, PROMPT_TOKENS, OUTPUT_TOKENS = 4, 64, 32  # the greedy comparison
# --smoke: a config with even head counts and workloads that take seconds on the CPU
SMOKE_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "eos_token_id": 2,
}
SMOKE_WORKLOADS = {"W2": (16, 8, 32, 8), "single": (1, 1, 32, 16)}


def engine_config(args: argparse.Namespace, tp: int, dtype: str):
    from fitserve.config import CacheConfig, EngineConfig, SchedulerConfig

    cache = CacheConfig(gpu_memory_utilization=args.gpu_memory_utilization,
                        kv_cache_memory_bytes=(64 << 20) if args.smoke else None)
    return EngineConfig(model=args.model, load_format="dummy", dtype=dtype, tensor_parallel_size=tp,
                        device="cpu" if args.smoke else "cuda", seed=0, cache=cache,
                        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                                  max_num_batched_tokens=args.max_num_batched_tokens))


def greedy(engine, vocab_size: int) -> list[list[int]]:
    from fitserve.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, vocab_size, (NUM_PROMPTS, PROMPT_TOKENS), generator=gen).tolist()
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(NUM_PROMPTS)}
    for i, prompt in enumerate(prompts):
        engine.add_request(engine.make_request(str(i), prompt, params))
    while engine.has_unfinished:
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    return [tokens[str(i)] for i in range(NUM_PROMPTS)]


def part_tokens(args: argparse.Namespace) -> dict:
    """Greedy tokens of one TP size, in float32 and in bf16."""
    from fitserve.startup import build_engine

    result = {"tp": args.tp}
    args.max_num_seqs = NUM_PROMPTS  # fewer CUDA graphs to capture; the prompts run side by side
    for dtype in ("float32", "bfloat16"):
        built = build_engine(engine_config(args, args.tp, dtype), progress=False)
        result[dtype] = greedy(built.engine, built.engine.limits.vocab_size)
        built.engine.shutdown()
        del built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def part_workloads(args: argparse.Namespace) -> dict:
    """W2 and single-stream on one TP size, bf16 with CUDA graphs (gpu_bench.run_workload)."""
    from fitserve.startup import build_engine

    start = time.perf_counter()
    built = build_engine(engine_config(args, args.tp, "float32" if args.smoke else "bfloat16"), progress=False)
    engine, memory = built.engine, built.memory
    result = {"tp": args.tp, "startup_s": time.perf_counter() - start,
              "kv_cache_tokens": engine.kv_cache.pool.num_blocks * engine.block_size,
              "memory": memory.to_json() if memory is not None and memory.start is not None else None,
              "planned_weights_bytes_per_gpu": memory.planned.weights.total_bytes if memory is not None else None,
              "runs": {}}
    gpu_bench.run_workload(engine, "single", seed=99)  # warm-up: first-touch costs stay out of the numbers
    for workload in args.workloads:
        result["runs"][workload] = gpu_bench.run_workload(engine, workload)
        print(json.dumps({f"tp{args.tp}-{workload}": result["runs"][workload]["duration_s"]}), file=sys.stderr,
              flush=True)
    engine.shutdown()
    return result


def part_tests(args: argparse.Namespace) -> dict:
    # --noconftest: tests/conftest.py brings the HTTP fixtures (openai, uvicorn), which these tests do not use
    cmd = [sys.executable, "-m", "pytest", "-q", "--noconftest", "-m", "gpu", "tests/test_tensor_parallel_gpu.py"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.part_timeout_s,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])})
    return {"command": " ".join(cmd[1:]), "exit_code": proc.returncode, "tail": proc.stdout[-3000:]}


def run_part(part: str, args: argparse.Namespace, extra: list[str]) -> dict:
    """gpu_bench.run_part runs gpu_bench.py; this runs this file's parts the same way."""
    common = ["--model", args.model, "--gpu-memory-utilization", str(args.gpu_memory_utilization),
              "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
              "--workloads", *args.workloads, *(["--smoke"] if args.smoke else [])]
    cmd = [sys.executable, __file__, part, *common, *extra]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.part_timeout_s)
    except subprocess.TimeoutExpired as error:
        stderr = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else (error.stderr or "")
        return {"error": f"timed out after {args.part_timeout_s:.0f} s", "stderr_tail": stderr[-2000:]}
    if proc.returncode != 0:
        return {"error": f"exit code {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
    sys.stderr.write(proc.stderr[-1500:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(one: dict, two: dict) -> dict:
    def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
        first = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), None) for p, q in zip(a, b)]
        return {"equal": a == b, "first_divergence_per_prompt": first}

    if "error" in one or "error" in two:
        return {"error": "a token part failed"}
    return {dtype: agreement(one[dtype], two[dtype]) for dtype in ("float32", "bfloat16")}


def orchestrate(args: argparse.Namespace) -> dict:
    report = {"commit": gpu_bench.git_commit(), "command": " ".join(sys.argv), "torch": torch.__version__,
              "smoke": args.smoke, "model": args.model, "cards": [], "workload_shapes": {
                  w: gpu_bench.WORKLOADS[w] for w in args.workloads}}
    if torch.cuda.is_available():
        report["cards"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part, so a call cut short still leaves what ran
        (out / "tp_bench.json").write_text(json.dumps(report, indent=2, default=str))

    if not args.smoke:
        report["gpu_tests"] = part_tests(args)
        save()
    report["tokens"] = {f"tp{tp}": run_part("tokens", args, ["--tp", str(tp)]) for tp in (1, 2)}
    report["tokens_agree"] = compare(report["tokens"]["tp1"], report["tokens"]["tp2"])
    save()
    report["fitserve"] = {}
    for tp in (1, 2):
        report["fitserve"][f"tp{tp}"] = run_part("workloads", args, ["--tp", str(tp)])
        save()
    print_table(report)
    return report


def print_table(report: dict) -> None:
    tests = report.get("gpu_tests")
    if tests:
        print(f"gpu tests: exit {tests['exit_code']}: {tests['tail'].strip().splitlines()[-1:]}")
    print(f"greedy tokens TP=2 vs TP=1: {json.dumps(report['tokens_agree'])}")
    print(f"{'':6} {'run':7} {'s':>8} {'req/s':>7} {'out tok/s':>9} {'TTFT med':>9} {'TPOT med':>9} {'KV tokens':>10}")
    for name, part in report["fitserve"].items():
        if "error" in part:
            print(f"{name} failed: {part['error']}\n{part.get('stderr_tail', '')[-1500:]}")
            continue
        for workload, run in part["runs"].items():
            print(f"{name:6} {workload:7} {run['duration_s']:8.2f} {run['request_throughput']:7.2f} "
                  f"{run['output_token_throughput']:9.0f} {run['ttft_ms']['median']:8.1f}m "
                  f"{run['tpot_ms']['median']:8.2f}m {part['kv_cache_tokens']:>10}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", nargs="?", default="all", choices=["all", "tokens", "workloads", "tests"])
    parser.add_argument("--smoke", action="store_true", help="the CPU: a tiny config and tiny workloads")
    parser.add_argument("--model", default=str(gpu_bench.CONFIG_DIR))
    parser.add_argument("--tp", type=int, default=1, help="a part's --tensor-parallel-size")
    parser.add_argument("--workloads", nargs="+", default=["W2", "single"])
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--part-timeout-s", type=float, default=240)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if args.smoke:
        gpu_bench.WORKLOADS.update(SMOKE_WORKLOADS)
        if args.model == str(gpu_bench.CONFIG_DIR):
            folder = Path(tempfile.gettempdir()) / "fitserve-tp-smoke"
            folder.mkdir(exist_ok=True)
            (folder / "config.json").write_text(json.dumps(SMOKE_CONFIG))
            args.model = str(folder)
    if args.part == "all":
        orchestrate(args)
        return
    handler = {"tokens": part_tokens, "workloads": part_workloads, "tests": part_tests}[args.part]
    print(json.dumps(handler(args), default=str))


if __name__ == "__main__":
    main()
