"""One device call: fitserve on four more model shapes and on Llama-3-8B's weight formats, with floors.

    python benchmarks/device_models.py --out $OUT                  # one call: both groups, what fits 9 minutes
    python benchmarks/device_models.py --group quant --out $OUT    # Llama-3-8B: bf16, gptq_int4, q4_k_m, fp8...
    python benchmarks/device_models.py --group models --out $OUT   # Qwen3-8B, Mistral-7B, Gemma-3-12B, Mixtral
    python benchmarks/device_models.py --group sched --out $OUT    # W1/W2 at step token budgets 1024, 1536 (not in all)
    python benchmarks/device_models.py --parts llama-bf16 gemma-3-12b --out $OUT   # parts by name

Every part is benchmarks/gpu_bench.py's `fitserve` part in its own process (a failure or a timeout
loses that part only), dummy weights at the config's shape, CUDA graphs, BENCHMARKS.md's workloads.
The ceilings are measured once, first; each model and variant's floors come from fitserve's own plan
(bench_floors.py). After every part device_models.json under --out is rewritten, so a call cut short
keeps what ran. Parts run in PARTS order; one whose estimate no longer fits the time left (--budget-s)
is skipped and listed as such. Estimates and the split are in docs/performance.md ("Model shapes and
weight formats").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench  # noqa: E402  (beside this file; puts src/ on the path)
from bench_floors import floor_report  # noqa: E402

CONFIGS = gpu_bench.ROOT / "configs"
LLAMA = "llama-3-8b-instruct"
W6_BUDGET_GIB, W6_MAX_NUM_SEQS = 18.0, 32  # gpu_bench.py's W6 defaults: 0.90 of the guide's 20 GB card
PROCESS_START_S = 12  # python, torch and fitserve imports and the CUDA context, per part


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    group: str  # "quant" (Llama-3-8B's weight formats) or "models" (the other shapes)
    model: str  # a folder under configs/
    variant: str  # bench_floors.QUANT_VARIANTS
    workloads: tuple[str, ...]
    # wall time of the whole process: PROCESS_START_S, the engine's start-up (dummy weights, graph capture,
    # Triton compiles), a warm-up single stream and the workloads, from benchmarks/results/gpu_bench_h200_*
    # (Llama bf16 on an H200: start-up 3-9 s, W1 4.5 s, W2 18 s, W6 4.5 s, single 1.1 s) scaled by each
    # model's W1/W2 floor, and 30-40 s of first Triton compiles where a part is the first of its kernels
    estimate_s: float
    w6: bool = False  # W6: an 18 GiB budget and --max-num-seqs 32
    gpu_memory_utilization: float = 0.9
    extra_flags: tuple[str, ...] = ()  # more gpu_bench flags (the step token budget of group "sched")

    def flags(self) -> list[str]:
        flags = ["--model-config", str(CONFIGS / self.model), "--quant-variant", self.variant,
                 "--workloads", *self.workloads, *self.extra_flags]
        if self.w6:
            return [*flags, "--budget-gib", str(W6_BUDGET_GIB), "--max-num-seqs", str(W6_MAX_NUM_SEQS)]
        return [*flags, "--gpu-memory-utilization", str(self.gpu_memory_utilization)]


# In the order they run: the bf16 reference first (the ratios need it), the packed formats (which fail in
# seconds where this fitserve has no dummy packed weights), then the shapes, Mixtral (93 GB of weights) last.
PARTS = (
    Part("llama-bf16", "quant", LLAMA, "bf16", ("single", "W1", "W2"), 75),
    Part("llama-bf16-W6", "quant", LLAMA, "bf16", ("W6",), 25, w6=True),
    Part("llama-gptq_int4", "quant", LLAMA, "gptq_int4", ("single", "W1", "W2"), 80),
    Part("llama-gptq_int4-W6", "quant", LLAMA, "gptq_int4", ("W6",), 25, w6=True),
    Part("llama-q4_k_m", "quant", LLAMA, "q4_k_m", ("single", "W1", "W2"), 80),
    Part("llama-q4_k_m-W6", "quant", LLAMA, "q4_k_m", ("W6",), 25, w6=True),
    Part("llama-fp8", "quant", LLAMA, "fp8", ("single",), 40),
    Part("llama-fp8_w8a16", "quant", LLAMA, "fp8_w8a16", ("single",), 40),
    Part("qwen3-8b", "models", "qwen3-8b", "bf16", ("W1", "W2"), 75),  # first of --group models: compiles
    Part("mistral-7b", "models", "mistral-7b-v0.1", "bf16", ("W1", "W2"), 45),
    Part("gemma-3-12b", "models", "gemma-3-12b-it", "bf16", ("W1", "W2"), 80),
    # 93.4 GB of bf16 weights: 0.92 of the card leaves ~40 GiB of KV, twice W2's 256 x 640 tokens
    Part("mixtral-8x7b", "models", "mixtral-8x7b-v0.1", "bf16", ("W1", "W2"), 130, gpu_memory_utilization=0.92),
    # the step token budget (--max-num-batched-tokens) against W2's ITL p99: llama-bf16 is the default, 2048
    Part("llama-bf16-b1024", "sched", LLAMA, "bf16", ("W1", "W2"), 60, extra_flags=("--max-num-batched-tokens", "1024")),
    Part("llama-bf16-b1536", "sched", LLAMA, "bf16", ("W1", "W2"), 60, extra_flags=("--max-num-batched-tokens", "1536")),
)
CEILINGS_ESTIMATE_S = 20
PART_TIMEOUT_OVER_ESTIMATE = 2.5  # a part may take this many times its estimate before it is stopped
MIN_PART_TIMEOUT_S = 60


def parts_for(group: str, names: list[str] | None = None) -> tuple[Part, ...]:
    """The parts of a group, or those named (in PARTS order), whatever their group."""
    if names:
        unknown = set(names) - {p.name for p in PARTS}
        if unknown:
            raise SystemExit(f"unknown parts: {sorted(unknown)}; --list shows them")
        return tuple(p for p in PARTS if p.name in names)
    return tuple(p for p in PARTS if p.group == group or (group == "all" and p.group != "sched"))


def estimated_total_s(parts: tuple[Part, ...]) -> float:
    return CEILINGS_ESTIMATE_S + sum(p.estimate_s for p in parts)


def part_timeout_s(part: Part, remaining_s: float) -> float:
    return min(remaining_s, max(MIN_PART_TIMEOUT_S, PART_TIMEOUT_OVER_ESTIMATE * part.estimate_s))


def floors_for(parts: tuple[Part, ...], ceilings: dict) -> dict:
    """model -> variant -> bench_floors.floor_report (figures, floors, single-stream floor per token)."""
    floors: dict = {}
    for part in parts:
        per_model = floors.setdefault(part.model, {})
        if part.variant not in per_model:
            per_model[part.variant] = floor_report(CONFIGS / part.model, part.variant, ceilings)
    return floors


def run(args: argparse.Namespace) -> dict:
    start = time.monotonic()
    parts = parts_for(args.group, getattr(args, "parts", None))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"commit": gpu_bench.git_commit(), "command": " ".join(sys.argv), "group": args.group,
                    "budget_s": args.budget_s, "estimated_s": estimated_total_s(parts), "int_kernels": args.int_kernels,
                    "parts_planned": [asdict(p) for p in parts], "results": {}, "skipped": []}

    def save() -> None:
        report["elapsed_s"] = time.monotonic() - start
        (out / "device_models.json").write_text(json.dumps(report, indent=2, default=str))

    report["ceilings"] = gpu_bench.run_part("ceilings", [], MIN_PART_TIMEOUT_S)
    report["floors"] = floors_for(parts, report["ceilings"])
    save()
    for part in parts:
        remaining = args.budget_s - (time.monotonic() - start)
        if remaining < part.estimate_s:
            report["skipped"].append(f"{part.name} (estimate {part.estimate_s:.0f} s, {remaining:.0f} s left)")
            continue
        began = time.monotonic()
        int_kernels = ["--int-kernels", args.int_kernels] if args.int_kernels else []
        result = gpu_bench.run_part("fitserve", part.flags() + int_kernels, part_timeout_s(part, remaining))
        report["results"][part.name] = result | {"wall_s": time.monotonic() - began}
        print(f"{part.name}: {report['results'][part.name]['wall_s']:.0f} s (estimate {part.estimate_s:.0f} s)",
              file=sys.stderr, flush=True)
        save()
    report["targets"] = target_checks(report)
    save()
    return report


def bf16_reference(results: dict) -> dict:
    """Llama-3-8B bf16's runs in this call, by workload: what the other formats are compared with."""
    return {**results.get("llama-bf16", {}).get("runs", {}), **results.get("llama-bf16-W6", {}).get("runs", {})}


def table_rows(report: dict) -> list[str]:
    """One line per run: floor, measured, efficiency, req/s and its ratio to Llama bf16 in the same call;
    for single, TPOT against the per-token floor and bf16's TPOT over this one (the speed-up)."""
    by_name = {p["name"]: p for p in report["parts_planned"]}
    results = report["results"]
    reference = bf16_reference(results)
    rows = [f"{'part':20} {'run':6} {'floor s':>8} {'meas s':>8} {'eff':>6} {'req/s':>7} {'x bf16':>6} "
            f"{'TPOT ms':>8} {'floor ms':>8} {'TPOT/fl':>7}"]
    for name, result in results.items():
        part = by_name[name]
        floors = report["floors"].get(part["model"], {}).get(part["variant"], {})
        if "error" in result or "startup_error" in result:
            why = result.get("error") or result.get("startup_error")
            rows.append(f"{name:20} failed: {str(why)[:160]}")
            continue
        for workload, run in result.get("runs", {}).items():
            floor = floors.get("floors_s", {}).get(workload, float("nan"))
            ref = reference.get(workload) if part["model"] == LLAMA else None
            if workload == "single":
                token_floor = floors.get("single_token_floor_ms", float("nan"))
                tpot = run["tpot_ms"]["median"]
                ratio = ref["tpot_ms"]["median"] / tpot if ref else float("nan")  # > 1: faster than bf16
                tail = f"{tpot:8.3f} {token_floor:8.3f} {tpot / token_floor:7.2f}"
            else:
                ratio = run["request_throughput"] / ref["request_throughput"] if ref else float("nan")
                tail = f"{run['tpot_ms']['median']:8.3f} {'':8} {'':7}"
            efficiency = floor / run["duration_s"]
            rows.append(f"{name:20} {workload:6} {floor:8.2f} {run['duration_s']:8.2f} {efficiency:6.1%} "
                        f"{run['request_throughput']:7.2f} {ratio:6.2f} {tail}")
    rows += [f"skipped: {s}" for s in report["skipped"]]
    return rows


# The issues' targets (#21 item 3, #22): (part, workload, what, bound). "eff": floor / measured at least
# the bound; "tpot_over_floor": single-stream TPOT at most bound x its per-token floor; "speedup": Llama
# bf16's TPOT over this part's at least the bound; "reqs_over_bf16": req/s over Llama bf16's (same workload,
# same call) at least the bound. Mixtral has none: its figures are reported against its floor.
TARGETS = (
    *((name, workload, "eff", bound) for name in ("llama-bf16", "qwen3-8b", "mistral-7b", "gemma-3-12b")
      for workload, bound in (("W1", 0.80), ("W2", 0.75))),
    *(row for name in ("llama-gptq_int4", "llama-q4_k_m") for row in (
        (name, "single", "tpot_over_floor", 1.5), (name, "single", "speedup", 2.5),
        (name, "W1", "reqs_over_bf16", 1.0), (name, "W2", "reqs_over_bf16", 0.9),
        (f"{name}-W6", "W6", "reqs_over_bf16", 1.5))),
    ("llama-fp8_w8a16", "single", "tpot_over_floor", 1.3),
)


def target_checks(report: dict) -> list[dict]:
    """Each target with its measured value and whether it is met; None where the part did not run."""
    by_name = {p["name"]: p for p in report["parts_planned"]}
    results = report["results"]
    reference = bf16_reference(results)
    checks = []
    for name, workload, what, bound in TARGETS:
        run = results.get(name, {}).get("runs", {}).get(workload)
        ref = reference.get(workload)
        value = None
        if run is not None and name in by_name:
            floors = report["floors"].get(by_name[name]["model"], {}).get(by_name[name]["variant"], {})
            if what == "eff" and "floors_s" in floors:
                value = floors["floors_s"][workload] / run["duration_s"]
            elif what == "tpot_over_floor" and "single_token_floor_ms" in floors:
                value = run["tpot_ms"]["median"] / floors["single_token_floor_ms"]
            elif what == "speedup" and ref:
                value = ref["tpot_ms"]["median"] / run["tpot_ms"]["median"]
            elif what == "reqs_over_bf16" and ref:
                value = run["request_throughput"] / ref["request_throughput"]
        met = None if value is None else (value <= bound if what == "tpot_over_floor" else value >= bound)
        checks.append({"part": name, "workload": workload, "what": what, "bound": bound, "value": value, "met": met})
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group", default="all", choices=["all", "quant", "models", "sched"])
    parser.add_argument("--parts", nargs="+", help="run only these parts (names as --list prints them)")
    parser.add_argument("--budget-s", type=float, default=540, help="stop starting parts past this (9 minutes)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--list", action="store_true", help="print the parts and their estimates, run nothing")
    parser.add_argument("--int-kernels", default=None,
                        help="gpu_bench's --int-kernels for every part: a triton_int_quant.VARIANTS table for the "
                             "integer formats (default: DEFAULT_TABLE)")
    args = parser.parse_args()
    if args.list:
        for part in parts_for(args.group, args.parts):
            print(f"{part.name:20} {part.estimate_s:5.0f} s  {' '.join(part.flags())}")
        total_s = estimated_total_s(parts_for(args.group, args.parts))
        print(f"estimated {total_s:.0f} s with the ceilings; budget {args.budget_s:.0f} s")
        return
    report = run(args)
    ceilings = report["ceilings"]
    if "copy_bytes_per_s" in ceilings:
        print(f"{ceilings['card']}: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
              f"bf16 {ceilings['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s, "
              f"fp8 {ceilings['fp8_flops_per_s'] / 1e12:.0f} TFLOP/s; commit {report['commit'][:10]}; "
              f"{report['elapsed_s']:.0f} s")
    else:
        print(f"ceilings failed: {ceilings.get('error')} (no floors)")
    print("\n".join(table_rows(report)))
    for check in report["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not run"}[check["met"]]
        value = "-" if check["value"] is None else f"{check['value']:.2f}"
        print(f"target {check['part']} {check['workload']} {check['what']} {check['bound']}: {value} {verdict}")


if __name__ == "__main__":
    main()
