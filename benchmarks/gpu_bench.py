"""One device call: GPU ceilings, workload floors, fitserve's engine on W1-W4 and single-stream
decode, and transformers' continuous batching on the same card for the side-by-side ratio.

    python benchmarks/gpu_bench.py all --out $OUT           # everything, each part in its own process
    python benchmarks/gpu_bench.py fitserve --workloads W1  # one part, prints JSON
    python benchmarks/gpu_bench.py all --quant-variants bf16 fp8 --workloads W2 W6 --hf-workloads none
        # bf16 and fp8 (weights and KV cache) in one call; W6 runs on an 18 GiB budget (--w6-budget-gib)
    python benchmarks/gpu_bench.py fusion --out $OUT        # rotary + KV store fusion on vs off (fusion_bench.py)
    python benchmarks/gpu_bench.py all --model-config configs/mixtral-8x7b-v0.1 --workloads W1 W2 --hf-workloads none
        # another shape; floors from fitserve's plan of it (bench_floors.py, docs/performance.md)
    python benchmarks/gpu_bench.py fitserve --quant-variant fp8_w8a16 --workloads single
        # fp8 weights through the weight-only kernel on any card; gptq_int4 and q4_k_m: dummy packed weights

The engine is driven in-process (no HTTP): a closed loop keeps `concurrency` requests in
flight, token-id prompts drawn at random (seeded), ignore_eos so output lengths are exact.
TTFT is from add_request to the step that returns the first token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_floors, fusion_bench beside this file
CONFIG_DIR = ROOT / "configs" / "llama-3-8b-instruct"  # --model-config's default

from bench_floors import (  # noqa: E402  (after the path above)
    QUANT_VARIANTS,
    WORKLOADS,
    floor_report,
    prompt_seed,
)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {"mean": statistics.fmean(ms) if ms else float("nan"), "median": percentile(ms, 50), "p99": percentile(ms, 99)}


# -- ceilings and floors ---------------------------------------------------------------------------


def measure_ceilings() -> dict:
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    one = torch.ones((), device="cuda")
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()  # b column-major
    fp8_ms = triton.testing.do_bench(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                                     warmup=50, rep=300, return_mode="median")
    return {
        "card": torch.cuda.get_device_name(),
        "total_memory_bytes": torch.cuda.get_device_properties(0).total_memory,
        "copy_bytes_per_s": 2 * src.numel() / (copy_ms / 1000),
        "bf16_flops_per_s": 2 * 8192**3 / (mm_ms / 1000),
        "fp8_flops_per_s": 2 * 8192**3 / (fp8_ms / 1000),
    }


# -- fitserve ---------------------------------------------------------------------------------------


def budget_utilization(budget_gib: float) -> float:
    """The --gpu-memory-utilization whose budget is budget_gib of this card's total memory."""
    return round(budget_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory, 4)


def load_fp8_small_table(path: str) -> None:
    """Replace rows of triton_fp8_small.SMALL_M_TABLE with fp8_decode_bench.py's (same max_rows)."""
    from fitserve.kernels import triton_fp8_small as small

    table = {choice.max_rows: choice for choice in small.SMALL_M_TABLE}
    for row in json.loads(Path(path).read_text()):
        kind = {"gemv": small.GemvConfig, "split_k": small.SplitKConfig, "swap_ab": small.SwapABConfig}[row["kernel"]]
        config = kind(*row["config"])
        table[row["max_rows"]] = small.SmallMChoice(row["max_rows"], row["kernel"], config, row["only_if_underfilled"])
    small.SMALL_M_TABLE = tuple(table[rows] for rows in sorted(table))
    print("fp8 small-batch table:", small.SMALL_M_TABLE, flush=True)


def choose_int_kernels(int_kernels: str | None) -> None:
    """The integer kernels of this run: --int-kernels names a triton_int_quant.VARIANTS table for
    DEFAULT_TABLE (GGUF's Q4_K in the K-quant form takes it too)."""
    if int_kernels:
        from fitserve.kernels import triton_int_quant

        triton_int_quant.DEFAULT_TABLE = triton_int_quant.VARIANTS[int_kernels]
        print("integer kernel table:", int_kernels, triton_int_quant.DEFAULT_TABLE, flush=True)


def force_fp8_weight_only() -> None:
    """fp8 weights through the weight-only W8A16 kernel (kernels/triton_w8a16.py) on this card, as on one
    without fp8 tensor cores: Fp8Format.for_device compares the card's compute capability with
    FP8_TENSOR_CORES when a model is built, so a capability no card has makes every card take that form
    (tests/test_fp8_gpu.py forces it the same way)."""
    from fitserve.layers.formats import fp8

    fp8.FP8_TENSOR_CORES = (99, 0)


def build_fitserve(args: argparse.Namespace, with_memory: bool = False):
    from fitserve.config import CacheConfig, EngineConfig, SchedulerConfig
    from fitserve.startup import build_engine

    variant = QUANT_VARIANTS[args.quant_variant]
    utilization = budget_utilization(args.budget_gib) if args.budget_gib else args.gpu_memory_utilization
    if args.fp8_small_table:
        load_fp8_small_table(args.fp8_small_table)
    choose_int_kernels(args.int_kernels)
    if not args.pdl:  # the A/B switch: every Triton kernel launched as before programmatic dependent launch
        from fitserve.kernels import pdl

        pdl.supported = lambda device_index: False
    if variant.fp8_weight_only or args.fp8_weight_only:
        force_fp8_weight_only()
    config = EngineConfig(
        model=str(args.model_config), load_format="dummy", dtype="bfloat16", enforce_eager=args.enforce_eager,
        disable_async_output_proc=args.disable_async_output_proc, async_scheduling=args.async_scheduling,
        quantization=variant.quantization,
        cache=CacheConfig(gpu_memory_utilization=utilization, kv_cache_dtype=variant.kv_cache_dtype),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens),
    )
    start = time.perf_counter()
    built = build_engine(config, progress=False)
    torch.cuda.synchronize()
    if with_memory:
        return built.engine, time.perf_counter() - start, built.memory, utilization
    return built.engine, time.perf_counter() - start


def run_workload(engine, workload: str, seed: int | None = None) -> dict:
    """One closed-loop run; `seed` (default: the workload's own, bench_floors.prompt_seed) draws the prompts."""
    from fitserve.sampling_params import SamplingParams

    requests, concurrency, prompt_len, output_len = WORKLOADS[workload]
    gen = torch.Generator().manual_seed(prompt_seed(workload) if seed is None else seed)
    vocab = engine.limits.vocab_size
    prompts = torch.randint(0, vocab, (requests, prompt_len), generator=gen).tolist()
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    added_at, first_at, last_at, finished_at, token_gaps = {}, {}, {}, {}, []
    next_index = 0
    preemptions_before = engine.scheduler.num_preemptions_total
    peak_usage = 0.0

    def add_next() -> None:
        nonlocal next_index
        rid = f"{workload}-{next_index}"
        engine.add_request(engine.make_request(rid, prompts[next_index], params))
        added_at[rid] = time.perf_counter()
        next_index += 1

    start = time.perf_counter()
    for _ in range(min(concurrency, requests)):
        add_next()
    num_steps = 0
    def on_outputs(outputs) -> None:  # called as soon as the engine hands outputs out, as a server would
        now = time.perf_counter()
        for out in outputs:
            rid = out.request_id
            if rid not in first_at:
                first_at[rid] = now
            else:
                token_gaps.append(now - last_at[rid])
            last_at[rid] = now
            if out.finished:
                finished_at[rid] = now
                if next_index < requests:
                    add_next()

    while engine.has_unfinished:
        engine.step(deliver=on_outputs)
        num_steps += 1
        peak_usage = max(peak_usage, engine.kv_cache.usage)
    duration = time.perf_counter() - start
    ttft = [first_at[r] - added_at[r] for r in added_at]
    tpot = [(finished_at[r] - first_at[r]) / max(output_len - 1, 1) for r in added_at]
    e2e = [finished_at[r] - added_at[r] for r in added_at]
    return {
        "workload": workload, "requests": requests, "concurrency": concurrency, "prompt_tokens": prompt_len,
        "output_tokens": output_len, "duration_s": duration, "steps": num_steps,
        "request_throughput": requests / duration, "output_token_throughput": requests * output_len / duration,
        "total_token_throughput": requests * (prompt_len + output_len) / duration,
        "ttft_ms": summary_ms(ttft), "tpot_ms": summary_ms(tpot), "itl_p99_ms": percentile(token_gaps, 99) * 1000,
        "e2e_ms": summary_ms(e2e), "preemptions": engine.scheduler.num_preemptions_total - preemptions_before,
        "peak_kv_usage_pct": 100 * peak_usage,
    }


def part_fitserve(args: argparse.Namespace) -> dict:
    from fitserve.config import ConfigError

    try:
        engine, startup_s, memory, utilization = build_fitserve(args, with_memory=True)
    except ConfigError as error:  # a setting that cannot start (e.g. bf16 on a tight budget): recorded
        return {"model": Path(args.model_config).name, "quant_variant": args.quant_variant,
                "max_num_seqs": args.max_num_seqs, "budget_gib": args.budget_gib,
                "startup_error": str(error), "runs": {}}
    capacity = engine.kv_cache.pool.num_blocks * engine.block_size
    planned = memory.planned if memory is not None else None
    result = {"startup_s": startup_s, "kv_cache_tokens": capacity, "enforce_eager": args.enforce_eager,
              "async_output": engine.async_output,
              "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
              "model": Path(args.model_config).name, "quant_variant": args.quant_variant,
              "quantization": QUANT_VARIANTS[args.quant_variant].quantization,
              "kv_cache_dtype": QUANT_VARIANTS[args.quant_variant].kv_cache_dtype,
              "fp8_weight_only": QUANT_VARIANTS[args.quant_variant].fp8_weight_only or args.fp8_weight_only,
              "budget_gib": args.budget_gib,
              "gpu_memory_utilization": utilization,
              "planned_weights_bytes": planned.weights.total_bytes if planned else None,
              "measured_weights_bytes": memory.weights_bytes if memory is not None else None,
              "planned_kv_cache_bytes": planned.kv_cache_bytes if planned else None,
              "memory_table": memory.table() if memory is not None and memory.start is not None else None,
              "runs": {}}
    run_workload(engine, "single", seed=99)  # warm-up: first-touch costs stay out of the numbers
    for workload in args.workloads:
        result["runs"][workload] = run_workload(engine, workload)
        print(json.dumps({workload: result["runs"][workload]["duration_s"]}), file=sys.stderr, flush=True)
    return result


def part_profile(args: argparse.Namespace) -> dict:
    """Where a decode step's time goes: host phases vs the GPU's own time for the same step."""
    from fitserve.sampling_params import SamplingParams

    engine, _ = build_fitserve(args)
    async_scheduling, engine.async_scheduling = engine.async_scheduling, False  # the phases below run one at a time
    runner = engine.runner
    result = {}
    for batch_size in (1, 20, 128):
        params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        for i in range(batch_size):
            engine.add_request(engine.make_request(f"p{batch_size}-{i}", list(range(1, 513)), params))
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()):
            engine.step()
        phases = {"schedule": [], "execute": [], "update_detok": [], "step": []}
        for _ in range(60):
            t0 = time.perf_counter()
            plan = engine.scheduler.schedule()
            t1 = time.perf_counter()
            out = runner.execute(plan)
            t2 = time.perf_counter()
            for request, token_id in engine.scheduler.update_from_output(plan, out):
                engine._detokenizers[request.request_id].append(token_id)
                engine._detokenizers[request.request_id].take_delta(False)
            t3 = time.perf_counter()
            for name, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                phases[name].append(value)
        engine_steps = []  # the engine's own step, with async output processing when it is on
        for _ in range(30):
            t0 = time.perf_counter()
            engine.step()
            engine_steps.append(time.perf_counter() - t0)
        phases["engine_step"] = engine_steps
        if async_scheduling:  # the engine's step when it plans the next step before reading the last
            engine.async_scheduling = True
            ahead_steps = []
            for _ in range(30):
                t0 = time.perf_counter()
                engine.step()
                ahead_steps.append(time.perf_counter() - t0)
            engine.drain()
            engine.async_scheduling = False
            phases["engine_step_async_scheduling"] = ahead_steps
        graphs = runner.decode_graphs
        gpu_ms = float("nan")
        if graphs is not None:
            size = next(s for s in graphs.sizes if s >= batch_size)
            graph, _ = graphs._graphs[size]
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(50):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            gpu_ms = begin.elapsed_time(end) / 50
        result[f"batch{batch_size}"] = {k: statistics.median(v) * 1000 for k, v in phases.items()} | {"graph_gpu_ms": gpu_ms}
        for rid in list(engine.scheduler.requests):
            engine.abort_request(rid)
        engine.step()
    return result


GEMM_KERNEL_MARKS = ("gemm", "gemv", "sm90", "cutlass", "nvjet", "scaled_mm", "splitk", "swap_ab")
ATTENTION_KERNEL_MARKS = ("attention", "_decode_split", "_decode_merge")


def gpu_ms_by_kind(prof, steps: int) -> dict[str, float]:
    """A torch profile's GPU time per step by kernel kind (gemm, attention, store_kv, other),
    and `n_<kind>`: the kernels of that kind per step."""
    kinds: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_time_total <= 0:
            continue
        name = event.key.lower()
        kind = ("gemm" if any(mark in name for mark in GEMM_KERNEL_MARKS) else
                "attention" if any(mark in name for mark in ATTENTION_KERNEL_MARKS) else
                "store_kv" if "store_kv" in name else "other")
        kinds[kind] = kinds.get(kind, 0.0) + event.device_time_total / 1000 / steps
        kinds[f"n_{kind}"] = kinds.get(f"n_{kind}", 0) + event.count / steps
    return kinds


def part_kernels(args: argparse.Namespace) -> dict:
    """GPU time per kernel kind for one decode step (eager, profiled), batch 1, 20 and 64, context 512."""
    from torch.profiler import ProfilerActivity, profile

    from fitserve.sampling_params import SamplingParams

    args.enforce_eager = True
    engine, _ = build_fitserve(args)
    result = {}
    for batch_size in (1, 20, 64):
        params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
        for i in range(batch_size):
            engine.add_request(engine.make_request(f"k{batch_size}-{i}", list(range(1, 513)), params))
        for _ in range(40):
            engine.step()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                engine.step()
            torch.cuda.synchronize()
        kinds = gpu_ms_by_kind(prof, steps=5)
        top = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:12]
        result[f"batch{batch_size}"] = {"ms_per_step": kinds,
                                        "top": [(e.key[:60], e.device_time_total / 1000 / 5, e.count / 5) for e in top]}
        for rid in list(engine.scheduler.requests):
            engine.abort_request(rid)
        engine.step()
    return result


def part_mixed(args: argparse.Namespace) -> dict:
    """A W1/W6-style mixed step: 19 requests decoding at context ~512 while a 512-token prompt is
    prefilled in the same step. Wall time per step (synchronized) and GPU time per kernel."""
    from torch.profiler import ProfilerActivity, profile

    from fitserve.sampling_params import SamplingParams

    engine, _ = build_fitserve(args)
    engine.async_scheduling = False  # one step at a time, timed alone
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    for i in range(19):
        engine.add_request(engine.make_request(f"d{i}", list(range(1, 513)), params))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()):
        engine.step()
    walls, decode_walls = [], []
    for i in range(12):
        engine.add_request(engine.make_request(f"m{i}", [(7 * i + j) % 1000 + 1 for j in range(512)],
                                               SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine.step()  # the prefilled request finishes; a plain decode step of 19 rows
        torch.cuda.synchronize()
        decode_walls.append(time.perf_counter() - t0)
    engine.add_request(engine.make_request("prof", [(3 * j) % 1000 + 1 for j in range(512)],
                                           SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    kinds = gpu_ms_by_kind(prof, steps=1)
    top = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:15]
    engine.add_request(engine.make_request("cpu", [(5 * j) % 1000 + 1 for j in range(512)],
                                           SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)))
    with profile(activities=[ProfilerActivity.CPU]) as cpu_prof:
        engine.step()
        torch.cuda.synchronize()
    cpu_top = sorted(cpu_prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
    if os.environ.get("MIXED_CPROFILE"):
        import cProfile
        import pstats
        engine.add_request(engine.make_request("py", [(11 * j) % 1000 + 1 for j in range(512)],
                                               SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)))
        py_prof = cProfile.Profile()
        py_prof.enable()
        engine.step()
        torch.cuda.synchronize()
        py_prof.disable()
        pstats.Stats(py_prof, stream=sys.stderr).sort_stats("tottime").print_stats(30)
    return {"quant_variant": args.quant_variant,
            "mixed_cpu_top": [(e.key[:70], e.self_cpu_time_total / 1000, e.count) for e in cpu_top], "mixed_step_wall_ms": statistics.median(walls) * 1000,
            "decode_step_wall_ms": statistics.median(decode_walls) * 1000, "mixed_gpu_ms_by_kind": kinds,
            "mixed_top": [(e.key[:70], e.device_time_total / 1000, e.count) for e in top]}


def part_fusion(args: argparse.Namespace) -> dict:
    """benchmarks/fusion_bench.py on the dummy 8B model: the rotary + KV store fusion on and off."""
    import fusion_bench  # beside this file: the script's folder is on sys.path
    import triton

    args.enforce_eager = True  # the part captures its own graphs, one per setting
    engine, startup_s = build_fitserve(args)
    runner = engine.runner
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    report = {"card": torch.cuda.get_device_name(), "commit": git_commit(), "torch": torch.__version__,
              "triton": triton.__version__, "quant_variant": args.quant_variant, "startup_s": startup_s,
              "context_tokens": fusion_bench.CONTEXT_TOKENS, "calls_per_graph": fusion_bench.CALLS_PER_GRAPH}
    report["results"] = fusion_bench.fusion_report(runner.model, engine.block_size, runner.capacity.num_blocks, num_sms)
    return report


# -- transformers -------------------------------------------------------------------------------------


def part_hf(args: argparse.Namespace) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(str(args.model_config))
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    model.set_attn_implementation("paged|sdpa")
    result = {"attn_implementation": "paged|sdpa", "runs": {}}
    for workload in args.workloads:
        requests, _, prompt_len, output_len = WORKLOADS[workload]
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, config.vocab_size, (requests, prompt_len), generator=gen).tolist()
        gen_config = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=None,
                                      pad_token_id=0, use_cuda_graph=False)
        torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = model.generate_batch(inputs=prompts, generation_config=gen_config, progress_bar=False)
        torch.cuda.synchronize()
        duration = time.perf_counter() - start
        num_out = sum(len(o.generated_tokens) for o in outputs.values())
        result["runs"][workload] = {"duration_s": duration, "request_throughput": requests / duration,
                                    "output_token_throughput": num_out / duration, "output_tokens": num_out}
        print(json.dumps({f"hf-{workload}": duration}), file=sys.stderr, flush=True)
    return result


# -- orchestration --------------------------------------------------------------------------------------


def run_part(part: str, extra: list[str], timeout_s: float) -> dict:
    """Each part in its own process, so one's GPU memory is gone before the next starts."""
    cmd = [sys.executable, __file__, part, *extra]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as error:
        stderr = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else (error.stderr or "")
        return {"error": f"timed out after {timeout_s:.0f} s", "stderr_tail": stderr[-2000:]}
    if proc.returncode != 0:
        return {"error": f"exit code {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
    sys.stderr.write(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fp8_ratios(parts: dict) -> dict:
    """fp8 req/s over bf16 req/s for each workload both ran (same variant and budget)."""
    ratios = {}
    for name, part in parts.items():
        if "-fp8" not in name or "runs" not in part:
            continue
        base = parts.get(name.replace("-fp8", "-bf16"), {})
        for workload, run in part["runs"].items():
            ref = base.get("runs", {}).get(workload)
            if ref:
                suffix = name.split("-fp8", 1)[1]
                ratios[f"{workload}{suffix.replace('-W6', '', 1)}"] = run["request_throughput"] / ref["request_throughput"]
    return ratios


def git_commit() -> str:
    if os.environ.get("FITSERVE_COMMIT"):  # the device copy of the tree has no .git
        return os.environ["FITSERVE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def print_table(report: dict) -> None:
    ceilings = report["ceilings"]
    if "copy_bytes_per_s" in ceilings:
        print(f"card {ceilings['card']}: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
              f"bf16 {ceilings['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s, "
              f"fp8 {ceilings.get('fp8_flops_per_s', 0) / 1e12:.0f} TFLOP/s; commit {report['commit'][:10]}")
    else:
        print(f"ceilings failed (no floors): {ceilings.get('error')}")
    for name, part in report["fitserve"].items():
        variant = part.get("quant_variant", "bf16")
        floors = report["floors_s"].get(variant, {})
        if "error" in part:
            print(f"fitserve[{name}] failed: {part['error']}\n{part.get('stderr_tail', '')[-1500:]}")
            continue
        if "startup_error" in part:
            print(f"fitserve[{name}] does not start: {part['startup_error'][:300]}")
            continue
        weights = part.get("measured_weights_bytes") or 0
        print(f"fitserve[{name}] start-up {part['startup_s']:.1f} s, KV {part['kv_cache_tokens']} tokens, "
              f"weights planned {(part.get('planned_weights_bytes') or 0) / 1e9:.2f} GB / measured {weights / 1e9:.2f} GB, "
              f"utilization {part.get('gpu_memory_utilization')}")
        print(f"  {'run':7} {'floor s':>8} {'meas s':>8} {'eff':>6} {'req/s':>7} {'out tok/s':>9} "
              f"{'TTFT med':>9} {'TPOT med':>9} {'preempt':>7}")
        for workload, run in part["runs"].items():
            floor = floors.get(workload, float("nan"))
            print(f"  {workload:7} {floor:8.2f} {run['duration_s']:8.2f} {floor / run['duration_s']:6.1%} "
                  f"{run['request_throughput']:7.2f} {run['output_token_throughput']:9.0f} "
                  f"{run['ttft_ms']['median']:8.1f}m {run['tpot_ms']['median']:8.2f}m {run['preemptions']:7d}")
            token_floor = report.get("single_token_floor_ms", {}).get(variant)
            if workload == "single" and token_floor:
                print(f"  single-stream decode floor {token_floor:.3f} ms/token: TPOT is "
                      f"{run['tpot_ms']['median'] / token_floor:.2f}x the floor")
    ratios = report.get("fp8_over_bf16")
    if ratios:
        print("fp8 / bf16 request throughput: " + ", ".join(f"{w} {r:.2f}x" for w, r in ratios.items()))
    hf = report.get("transformers")
    if hf:
        if "error" in hf:
            print(f"transformers failed: {hf['error']}\n{hf.get('stderr_tail', '')[-1500:]}")
        else:
            for workload, run in hf["runs"].items():
                ours = report["fitserve"].get("graphs", {}).get("runs", {}).get(workload)
                ratio = run["duration_s"] / ours["duration_s"] if ours else float("nan")
                print(f"  transformers {workload}: {run['duration_s']:.2f} s ({run['request_throughput']:.2f} req/s); "
                      f"fitserve is {ratio:.1f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=["all", "ceilings", "fitserve", "hf", "profile", "kernels", "fusion", "mixed"])
    parser.add_argument("--workloads", nargs="+", default=["W1", "W2", "W3", "W4", "single"])
    parser.add_argument("--hf-workloads", nargs="+", default=["W1", "W2"])
    parser.add_argument("--variants", nargs="+", default=["graphs"],
                        help="graphs (the defaults), eager, nosched (graphs with --no-async-scheduling), "
                             "sync (graphs with neither async scheduling nor async output processing) and/or "
                             "nopdl (graphs with --no-pdl)")
    parser.add_argument("--model-config", type=Path, default=CONFIG_DIR,
                        help="a config-only model folder (configs/*): the shapes the dummy weights take")
    parser.add_argument("--quant-variant", default="bf16", choices=sorted(QUANT_VARIANTS), help="one part's setting")
    parser.add_argument("--fp8-weight-only", action="store_true",
                        help="fp8 weights through the weight-only W8A16 kernel even on a card with fp8 tensor cores "
                             "(the fp8_w8a16 variant sets it)")
    parser.add_argument("--quant-variants", nargs="+", default=["bf16"], choices=sorted(QUANT_VARIANTS),
                        help="all: run each (bf16; fp8 = fp8 weights and fp8 KV cache)")
    parser.add_argument("--budget-gib", type=float, default=None,
                        help="a part: --gpu-memory-utilization so that the budget is this many GiB of the card")
    parser.add_argument("--w6-budget-gib", type=float, default=18.0, help="W6's budget (0.90 of a 20 GB card)")
    parser.add_argument("--w6-max-num-seqs", type=int, default=32, help="W6's --max-num-seqs")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--disable-async-output-proc", action="store_true")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True,
                        help="programmatic dependent launch of the Triton kernels (kernels/pdl.py) where the card has it")
    parser.add_argument("--fp8-small-table", default=None,
                        help="fp8_decode_bench.py's fp8_small_table.json: its rows replace SMALL_M_TABLE's")
    parser.add_argument("--int-kernels", default=None,
                        help="a kernels/triton_int_quant.py VARIANTS table for the integer formats (default: DEFAULT_TABLE)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--part-timeout-s", type=float, default=280)
    parser.add_argument("--hf-timeout-s", type=float, default=300)
    args = parser.parse_args()
    if args.part == "ceilings":
        print(json.dumps(measure_ceilings()))
        return
    if args.part == "fitserve":
        print(json.dumps(part_fitserve(args)))
        return
    if args.part == "hf":
        print(json.dumps(part_hf(args)))
        return
    if args.part == "kernels":
        for batch, figures in part_kernels(args).items():
            print(batch, json.dumps({k: round(v, 3) for k, v in figures["ms_per_step"].items()}))
            for name, ms, count in figures["top"]:
                print(f"   {ms:7.3f} ms {count:6.0f}x {name}")
        return
    if args.part == "mixed":
        print(json.dumps(part_mixed(args), indent=1))
        return
    if args.part == "profile":
        print(json.dumps(part_profile(args), indent=1))
        return
    if args.part == "fusion":
        report = part_fusion(args)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "fusion_bench.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=1))
        return
    common = ["--gpu-memory-utilization", str(args.gpu_memory_utilization), "--max-num-seqs", str(args.max_num_seqs),
              "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    table_flags = ["--fp8-small-table", args.fp8_small_table] if args.fp8_small_table else []
    model_flags = ["--model-config", str(args.model_config)]
    report = {"commit": git_commit(), "command": " ".join(sys.argv), "torch": torch.__version__,
              "model_config": Path(args.model_config).name,
              "ceilings": run_part("ceilings", [], args.part_timeout_s)}
    import triton

    report["triton"] = triton.__version__
    variants = dict.fromkeys(["bf16", *args.quant_variants])  # in order, once each
    floors = {q: floor_report(args.model_config, q, report["ceilings"]) for q in variants}
    report["model"] = {q: f.get("model", f.get("error")) for q, f in floors.items()}
    report["floors_s"] = {q: f["floors_s"] for q, f in floors.items() if "floors_s" in f}
    report["single_token_floor_ms"] = {q: f["single_token_floor_ms"] for q, f in floors.items() if "floors_s" in f}
    report["fitserve"] = {}
    part_flags = [*table_flags, *model_flags, *(["--fp8-weight-only"] if args.fp8_weight_only else [])]
    full_budget = [w for w in args.workloads if w != "W6"]
    Path(args.out).mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part, so a call cut short still leaves what ran
        (Path(args.out) / "gpu_bench.json").write_text(json.dumps(report, indent=2, default=str))
    for quant in args.quant_variants:
        for variant in args.variants:
            flags = {"eager": ["--enforce-eager"], "nosched": ["--no-async-scheduling"], "nopdl": ["--no-pdl"],
                     "sync": ["--disable-async-output-proc", "--no-async-scheduling"]}.get(variant, [])
            name = variant if args.quant_variants == ["bf16"] else f"{variant}-{quant}"
            if full_budget:
                report["fitserve"][name] = run_part(
                    "fitserve", ["--workloads", *full_budget, *common, *flags, *part_flags, "--quant-variant", quant],
                    args.part_timeout_s)
                save()
            if "W6" in args.workloads:  # the guide's 20 GB card: its own budget and --max-num-seqs
                w6 = ["--workloads", "W6", "--budget-gib", str(args.w6_budget_gib), "--max-num-seqs",
                      str(args.w6_max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
                report["fitserve"][f"{name}-W6"] = run_part(
                    "fitserve", [*w6, *flags, *part_flags, "--quant-variant", quant], args.part_timeout_s)
                save()
                # and with the guide's flags as they are (--max-num-seqs 256): does it start at all?
                w6_default = [*w6[:5], str(args.max_num_seqs), *w6[6:]]
                report["fitserve"][f"{name}-W6-seqs{args.max_num_seqs}"] = run_part(
                    "fitserve", [*w6_default, *flags, *part_flags, "--quant-variant", quant], args.part_timeout_s)
    report["fp8_over_bf16"] = fp8_ratios(report["fitserve"])
    if args.hf_workloads and args.hf_workloads != ["none"]:
        report["transformers"] = run_part("hf", ["--workloads", *args.hf_workloads, *model_flags], args.hf_timeout_s)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_bench.json").write_text(json.dumps(report, indent=2, default=str))
    print_table(report)


if __name__ == "__main__":
    main()
