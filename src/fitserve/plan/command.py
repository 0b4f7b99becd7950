"""`fitserve plan`: does the model fit the card, and how many requests does the rest hold?

Loads no weights and imports no torch: it reads the model's config.json (and its safetensors
headers when the folder has them). The flags are `fitserve serve`'s, plus the card:

    fitserve plan --model configs/llama-3-8b-instruct --gpu "RTX 4000 Ada" --gpu-memory-utilization 0.9
    fitserve plan --model configs/llama-3-8b-instruct --gpu-memory 20GiB --users 20 --context 4096
    fitserve plan --model configs/llama-3-8b-instruct --gpu h100 --quantization fp8 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any, Protocol

from fitserve.config import (
    DEFAULT_BLOCK_SIZE,
    KV_CACHE_DTYPES,
    ArchConfig,
    CacheConfig,
    ConfigError,
    EngineConfig,
    SchedulerConfig,
    parse_size_bytes,
)
from fitserve.plan.fit_search import fit_to_json, format_fit, search_fit
from fitserve.plan.gpus import KNOWN_GPUS, find_gpu
from fitserve.plan.planner import PlanInputs, plan_memory, resolve_max_model_len
from fitserve.plan.report import format_plan, plan_to_json
from fitserve.plan.shapes import model_param_counts, resolve_dtype

EXIT_DOES_NOT_FIT = 1  # like a failed check; 2 stays for settings that cannot be read


class ModelSourceLike(Protocol):
    """What the planner needs of weights.source.ModelSource (passed in by the cli)."""

    name: str
    kind: str
    weights_path: str | None
    arch: ArchConfig

    def quantization(self, requested: str | None) -> str | None:
        """--quantization as the checkpoint allows it (an fp8 checkpoint brings its own)."""
        ...


def add_plan_parser(subparsers: Any, resolve_source: Callable[[EngineConfig], ModelSourceLike]) -> None:
    """Register `fitserve plan`; the cli passes weights.source.resolve_model_source (a layer above)."""
    plan = subparsers.add_parser("plan", help="plan GPU memory: does the model fit, how many requests it holds")
    plan.add_argument("model_tag", nargs="?", default=None, help="the model, as `fitserve serve MODEL` takes it")
    plan.add_argument("--model", default=None, help="a model folder (config.json), a .gguf file, a hub id, "
                      "or configs/NAME; default: the embedded SmolLM2-135M-Instruct")
    card = plan.add_mutually_exclusive_group()
    card.add_argument("--gpu", default=None, help="a card by name, e.g. 'RTX 4000 Ada', h100 (see --list-gpus)")
    card.add_argument("--gpu-memory", default=None, help="the card's total memory, e.g. 20475MiB or 24GiB")
    plan.add_argument("--list-gpus", action="store_true", help="print the cards --gpu knows and exit")
    plan.add_argument("--dtype", default="auto", help="auto (bfloat16), bfloat16, float16 or float32")
    plan.add_argument("--quantization", default=None, choices=["fp8", "fp8_per_tensor"],
                      help="fp8: linear layers in one byte")
    plan.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES, help="auto (= --dtype) or fp8")
    plan.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    plan.add_argument("--max-model-len", type=int, default=None)
    plan.add_argument("--max-num-seqs", type=int, default=256)
    plan.add_argument("--max-num-batched-tokens", type=int, default=2048)
    plan.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    plan.add_argument("--kv-cache-memory-bytes", default=None, help="a fixed KV cache size (the CPU default: 1GiB)")
    plan.add_argument("--num-gpu-blocks-override", type=int, default=None)
    plan.add_argument("--enforce-eager", action="store_true", help="plan without CUDA graphs")
    plan.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                      help="GPUs (of the --gpu kind) the model is split over; the plan is per GPU")
    plan.add_argument("--users", type=int, default=None, help="with --context: the load to fit")
    plan.add_argument("--context", type=int, default=None, help="tokens per request (prompt + output)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of the table")
    plan.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    plan.set_defaults(handler=lambda args: run_plan(args, resolve_source))


def _device_total_bytes(args: argparse.Namespace) -> tuple[int | None, str | None]:
    if args.gpu is not None:
        gpu = find_gpu(args.gpu)
        return gpu.total_bytes, gpu.name
    if args.gpu_memory is not None:
        return parse_size_bytes(args.gpu_memory), None
    return None, None


def plan_inputs_from_args(args: argparse.Namespace, source: ModelSourceLike) -> PlanInputs:
    # The same validation as `fitserve serve` (one config tree), then the planner's own inputs.
    cache = CacheConfig(
        block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=None if args.kv_cache_memory_bytes is None else parse_size_bytes(args.kv_cache_memory_bytes),
        num_gpu_blocks_override=args.num_gpu_blocks_override, kv_cache_dtype=args.kv_cache_dtype,
    )
    scheduler = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                max_model_len=args.max_model_len)
    EngineConfig(tensor_parallel_size=args.tensor_parallel_size)  # its validation
    total_bytes, gpu_name = _device_total_bytes(args)
    folder = source.weights_path if source.kind in ("hf", "dummy") else None
    return PlanInputs(
        arch=source.arch, model_name=source.name, param_counts=model_param_counts(source.arch, folder),
        max_model_len=resolve_max_model_len(scheduler.max_model_len, source.arch), dtype=resolve_dtype(args.dtype),
        quantization=source.quantization(args.quantization), kv_cache_dtype=args.kv_cache_dtype,
        device_total_bytes=total_bytes,
        gpu_name=gpu_name, gpu_memory_utilization=cache.gpu_memory_utilization,
        kv_cache_memory_bytes=cache.kv_cache_memory_bytes, num_gpu_blocks_override=cache.num_gpu_blocks_override,
        max_num_seqs=scheduler.max_num_seqs, max_num_batched_tokens=scheduler.max_num_batched_tokens,
        block_size=cache.block_size, cuda_graphs=not args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size,
    )


def _list_gpus() -> str:
    rows = [f"  {gpu.name:<34} {gpu.total_mib:>7} MiB  --gpu {gpu.aliases[0] if gpu.aliases else gpu.name!r}"
            for gpu in KNOWN_GPUS]
    return "\n".join(["Cards fitserve plan knows (nvidia-smi's total memory):", *rows])


def run_plan(args: argparse.Namespace, resolve_source: Callable[[EngineConfig], ModelSourceLike]) -> int:
    """Print the plan; 0 when it fits, EXIT_DOES_NOT_FIT when not (ConfigError for bad settings)."""
    if args.list_gpus:
        print(_list_gpus())
        return 0
    if (args.users is None) != (args.context is None):
        raise ConfigError("--users and --context go together: N requests of T tokens each.")
    model = args.model or args.model_tag
    source = resolve_source(EngineConfig(model=model, load_format="dummy"))
    inputs = plan_inputs_from_args(args, source)
    if args.users is not None:
        if inputs.device_total_bytes is None:
            raise ConfigError("--users and --context need a card: add --gpu NAME or --gpu-memory SIZE.")
        if args.users < 1 or args.context < 2:
            raise ConfigError("--users must be at least 1 and --context at least 2 tokens.")
        # An fp8 checkpoint has no unquantized weights to plan: only its KV cache dtype varies.
        weights_fixed = source.quantization(None) is not None
        options = search_fit(inputs, args.users, args.context, weights_fixed)
        fits = any(o.utilization is not None for o in options)
        output = json.dumps(fit_to_json(options, args.users, args.context), indent=2) if args.json \
            else format_fit(inputs, args.users, args.context, options)
    else:
        plan = plan_memory(inputs)
        fits = plan.fits
        output = json.dumps(plan_to_json(plan), indent=2) if args.json else format_plan(plan)
    sys.stdout.write(output + "\n")
    return 0 if fits else EXIT_DOES_NOT_FIT
