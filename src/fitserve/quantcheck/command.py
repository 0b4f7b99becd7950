"""`fitserve check-quant`: the command line (torch-free until it runs).

    fitserve check-quant --quantization fp8                         # the embedded SmolLM2, CPU or GPU
    fitserve check-quant --model M --quantization fp8 --kv-cache-dtype fp8 --json
    fitserve check-quant --model FP8_CHECKPOINT --reference-model ITS_BF16_ORIGINAL
    fitserve check-quant --model GPTQ_CHECKPOINT [--reference-model ITS_BF16_ORIGINAL]  # kernel vs dequantized
    fitserve check-quant --model M.gguf --quantization gguf                            # packed vs dequantized
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fitserve.config import ConfigError
from fitserve.flags import add_engine_args, engine_config_from_args

EXIT_BELOW_MIN_AGREEMENT = 1


def add_check_quant_parser(subparsers: Any) -> None:
    """Register `fitserve check-quant`: the engine flags of `fitserve serve`, and its own."""
    check = subparsers.add_parser(
        "check-quant", help="compare --quantization / --kv-cache-dtype with --dtype on built-in prompts")
    add_engine_args(check)
    check.add_argument("--reference-model", default=None,
                       help="the unquantized checkpoint to compare with (default: --model itself); what an fp8 "
                            "checkpoint needs")
    check.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens generated per prompt")
    check.add_argument("--num-prompts", type=int, default=None, help="use the first N built-in prompts")
    check.add_argument("--min-agreement", type=float, default=None,
                       help=f"exit {EXIT_BELOW_MIN_AGREEMENT} when top-1 agreement is below this fraction (e.g. 0.97)")
    check.add_argument("--noise-floor", action="store_true",
                       help="also run the reference model in float32 and compare it with --dtype: the agreement "
                            "that rounding alone gives, to read the quantized figures against (a third model load, "
                            "in float32)")
    check.add_argument("--json", action="store_true", help="print the figures as JSON")
    check.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    check.set_defaults(handler=run_check_quant)


def run_check_quant(args: argparse.Namespace) -> int:
    config = engine_config_from_args(args)
    source = None  # resolved here only when needed, then handed to run_check
    if config.quantization is None and config.cache.kv_cache_dtype == "auto" and args.reference_model is None:
        from fitserve.weights.source import resolve_model_source  # torch-free: reads config.json
        source = resolve_model_source(config)
        if source.checkpoint_int is None:  # an integer checkpoint checks its kernels
            raise ConfigError("check-quant compares a quantized setting with --dtype: give --quantization fp8 "
                              "and/or --kv-cache-dtype fp8 (or, for an fp8 checkpoint, --reference-model).")
    if args.max_new_tokens < 1 or (args.num_prompts is not None and args.num_prompts < 1):
        raise ConfigError("--max-new-tokens and --num-prompts must be at least 1.")
    from fitserve.quantcheck.check import run_check  # torch from here on
    from fitserve.quantcheck.prompts import PROMPTS
    from fitserve.quantcheck.report import format_report

    prompts = PROMPTS[:args.num_prompts] if args.num_prompts else PROMPTS
    report = run_check(config, max_new_tokens=args.max_new_tokens, prompts=prompts,
                       reference_model=args.reference_model, source=source, noise_floor=args.noise_floor)
    sys.stdout.write((json.dumps(report.to_json(), indent=2) if args.json else format_report(report)) + "\n")
    if args.min_agreement is not None and report.top1_agreement < args.min_agreement:
        return EXIT_BELOW_MIN_AGREEMENT
    return 0
