"""`fitserve plan` for the model configs under configs/ on the 20 and 24 GiB cards of docs/models.md:
weights, KV cache tokens, and how many requests of a context fit, in bf16 and with fp8 weights. Prints a
markdown table (and the JSON of every plan with --json).

    python benchmarks/plan_models.py                       # --max-model-len 8192, requests of 4096 and 8192
    python benchmarks/plan_models.py --max-model-len 32768 --contexts 32768 --models gemma-3-12b-it
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["llama-3-8b-instruct", "qwen3-8b", "mistral-7b-v0.1", "gemma-3-12b-it", "mixtral-8x7b-v0.1"]


def plan(model: str, card_gib: int, quantization: str | None, max_model_len: int) -> dict:
    command = [sys.executable, "-m", "fitserve", "plan", "--model", str(ROOT / "configs" / model),
               "--gpu-memory", f"{card_gib}GiB", "--gpu-memory-utilization", "0.9",
               "--max-model-len", str(max_model_len), "--json"]
    if quantization:
        command += ["--quantization", quantization]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):  # 1: the plan found a fatal problem (it still prints the JSON)
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--cards", nargs="+", type=int, default=[20, 24])
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--contexts", nargs="+", type=int, default=[4096, 8192])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    print("| model | card | weights | weight GiB | KV tokens | " + " | ".join(
        f"requests of {c}" for c in args.contexts) + " |")
    print("|---|---|---|---:|---:|" + "---:|" * len(args.contexts))
    for model in args.models:
        for card in args.cards:
            for quantization in (None, "fp8"):
                result = plan(model, card, quantization, args.max_model_len)
                if args.json:
                    print(json.dumps(result))
                weights = result["weights"]["total_bytes"] / 2**30
                fits = result["fits"]
                tokens = result.get("kv_tokens", 0) if fits else 0
                users = [str(result.get("concurrency", {}).get(str(c), 0)) if fits else "-" for c in args.contexts]
                print(f"| {model} | {card} GiB | {quantization or 'bf16'} | {weights:.2f} | "
                      f"{tokens if fits else 'does not fit'} | " + " | ".join(users) + " |", flush=True)


if __name__ == "__main__":
    main()
