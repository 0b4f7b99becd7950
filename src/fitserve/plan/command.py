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

from fitserve.arch_config import ArchConfig
from fitserve.config import ConfigError, EngineConfig, parse_size_bytes
from fitserve.flags import PLAN_FIELDS, add_engine_args, engine_config_from_args
from fitserve.plan.fit_search import fit_to_json, format_fit, search_fit
from fitserve.plan.gpus import KNOWN_GPUS, find_gpu
from fitserve.plan.planner import PlanInputs, plan_memory, resolve_max_model_len
from fitserve.plan.report import format_plan, plan_to_json
from fitserve.plan.gguf_bytes import gguf_quantization, read_packed_linear_bytes
from fitserve.plan.shapes import ParamCounts, model_param_counts, resolve_dtype, with_packed_linears

EXIT_DOES_NOT_FIT = 1  # like a failed check; 2 stays for settings that cannot be read


class ModelSourceLike(Protocol):
    """What the planner needs of weights.source.ModelSource (passed in by the cli)."""

    name: str
    kind: str
    weights_path: str | None
    arch: ArchConfig
    dummy_layout: str | None  # --load-format dummy in a packed layout (its param_counts say its bytes)

    def quantization(self, requested: str | None) -> str | None:
        """--quantization as the checkpoint allows it (an fp8 checkpoint brings its own)."""
        ...

    def param_counts(self) -> ParamCounts | None:
        """An integer checkpoint's counts at its held bytes; None for the others."""
        ...


def add_plan_parser(subparsers: Any, resolve_source: Callable[[EngineConfig], ModelSourceLike]) -> None:
    """Register `fitserve plan`; the cli passes weights.source.resolve_model_source (a layer above)."""
    plan = subparsers.add_parser("plan", help="plan GPU memory: does the model fit, how many requests it holds")
    plan.add_argument("model_tag", nargs="?", default=None, help="the model, as `fitserve serve MODEL` takes it")
    add_engine_args(plan, only=PLAN_FIELDS)  # serve's flags, declared once in config.py
    card = plan.add_argument_group("the card").add_mutually_exclusive_group()
    card.add_argument("--gpu", default=None, help="a card by name, e.g. 'RTX 4000 Ada', h100 (see --list-gpus)")
    card.add_argument("--gpu-memory", default=None, help="the card's total memory, e.g. 20475MiB or 24GiB")
    plan.add_argument("--list-gpus", action="store_true", help="print the cards --gpu knows and exit")
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
    # The same EngineConfig, and so the same validation and messages, as `fitserve serve`.
    config = engine_config_from_args(args)
    cache, scheduler = config.cache, config.scheduler
    total_bytes, gpu_name = _device_total_bytes(args)
    folder = source.weights_path if source.kind in ("hf", "dummy") else None
    gguf_path = folder if folder is not None and folder.endswith(".gguf") else None
    if source.dummy_layout is not None:  # random weights in a packed layout: no file to read
        quantization = source.quantization(config.quantization)
    else:
        quantization = gguf_quantization(source.quantization(config.quantization), gguf_path,
                                         total_bytes is not None, config.tensor_parallel_size)
    counts = source.param_counts() or model_param_counts(source.arch, folder)
    if quantization == "gguf" and gguf_path is not None and source.dummy_layout is None:
        packed = read_packed_linear_bytes(gguf_path)
        counts = with_packed_linears(counts, packed.packed_params, packed.packed_bytes, extra_16bit=packed.extra_16bit)
    return PlanInputs(
        arch=source.arch, model_name=source.name, param_counts=counts,
        max_model_len=resolve_max_model_len(scheduler.max_model_len, source.arch), dtype=resolve_dtype(config.dtype),
        quantization=quantization, kv_cache_dtype=cache.kv_cache_dtype,
        device_total_bytes=total_bytes,
        gpu_name=gpu_name, gpu_memory_utilization=cache.gpu_memory_utilization,
        kv_cache_memory_bytes=cache.kv_cache_memory_bytes, num_gpu_blocks_override=cache.num_gpu_blocks_override,
        max_num_seqs=scheduler.max_num_seqs, max_num_batched_tokens=scheduler.max_num_batched_tokens,
        block_size=cache.block_size, cuda_graphs=not config.enforce_eager,
        tensor_parallel_size=config.tensor_parallel_size,
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
    config = engine_config_from_args(args)  # a setting serve refuses is refused before the model is looked up
    model = args.model or args.model_tag
    # resolved as a dummy (no weights are read); a packed --quantization shapes a --load-format dummy's layout
    packed_dummy = config.quantization if config.load_format == "dummy" else None
    source = resolve_source(EngineConfig(model=model, load_format="dummy", quantization=packed_dummy))
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
