"""An fp8 checkpoint of Llama-3-8B's shape against online fp8 quantization (GPU, one call).

    python benchmarks/fp8_checkpoint_load.py --out $OUT      # writes $OUT/fp8_checkpoint_load.json

Writes a compressed-tensors checkpoint (per-channel e4m3 weights and weight_scale, dynamic
per-token activations, llm-compressor's FP8_DYNAMIC layout) of configs/llama-3-8b-instruct
whose values are `--load-format dummy`'s, quantized per row as `--quantization fp8` does. Then
starts the engine twice on the W6 budget (18 GiB of the card): the dummy bf16 weights quantized
online, and the checkpoint read from disk without --quantization. For each: start-up seconds,
weights measured at start-up (planned beside it), the peak of allocated memory during start-up,
KV tokens, greedy tokens of 4 prompts (the two must be equal: same bytes) and the wall time of
20 requests of 128 greedy tokens. The first start-up of a process also compiles the Triton
kernels: --checkpoint-first swaps the order, so each gets its start-up time without it once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
from test_fp8_checkpoint import CHANNEL_DYNAMIC as FP8_DYNAMIC  # noqa: E402  (llm-compressor's FP8_DYNAMIC layout)
CONFIG_DIR = ROOT / "configs" / "llama-3-8b-instruct"
BUDGET_BYTES = 18 * 2**30  # W6: the guide's 20 GB card at --gpu-memory-utilization 0.90
SHARD_BYTES = 2 * 2**30
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_checkpoint(folder: Path) -> dict:
    """dummy_weights' tensors (same generator per name), projections quantized per row, in shards."""
    from safetensors.torch import save_file

    from fitserve.arch_config import ArchConfig
    from fitserve.kernels import fp8
    from fitserve.models.llama import hf_tensor_shapes
    from fitserve.models.loader import DUMMY_INIT_STD, DUMMY_SEED

    config = json.loads((CONFIG_DIR / "config.json").read_text())
    arch = ArchConfig.from_hf_config(config)
    start_s = time.monotonic()
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = num_files = total_bytes = 0

    def flush() -> None:
        nonlocal shard, shard_bytes, num_files
        if shard:
            num_files += 1
            save_file(shard, str(folder / f"model-{num_files:05d}.safetensors"))
            shard, shard_bytes = {}, 0

    for name, shape in sorted(hf_tensor_shapes(arch).items()):
        tensor = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        else:
            generator = torch.Generator(device="cuda").manual_seed(DUMMY_SEED + zlib.crc32(name.encode()))
            tensor.normal_(0.0, DUMMY_INIT_STD, generator=generator)
        pieces = {name: tensor}
        if name.split(".")[-2] in PROJECTIONS:
            q, scale = fp8.quantize_per_row(tensor)
            pieces = {name: q, name.replace(".weight", ".weight_scale"): scale}
        for key, value in pieces.items():
            shard[key] = value.cpu().contiguous()
            nbytes = value.numel() * value.element_size()
            shard_bytes, total_bytes = shard_bytes + nbytes, total_bytes + nbytes
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": FP8_DYNAMIC}))
    for extra in ("generation_config.json",):
        (folder / extra).write_text((CONFIG_DIR / extra).read_text())
    return {"files": num_files, "bytes": total_bytes, "seconds": time.monotonic() - start_s}


def start_and_run(model: str, load_format: str, quantization: str | None) -> dict:
    from fitserve.config import CacheConfig, EngineConfig, SchedulerConfig
    from fitserve.startup import build_engine
    from fitserve.sampling_params import SamplingParams

    total = torch.cuda.mem_get_info()[1]
    config = EngineConfig(model=model, load_format=load_format, quantization=quantization,
                          cache=CacheConfig(gpu_memory_utilization=round(BUDGET_BYTES / total, 4)),
                          scheduler=SchedulerConfig(max_num_seqs=32))
    torch.cuda.reset_peak_memory_stats()
    start_s = time.monotonic()
    built = build_engine(config, progress=False)
    startup_s = time.monotonic() - start_s
    memory = built.memory
    engine = built.engine
    row = {"model": model, "load_format": load_format, "quantization_flag": quantization,
           "startup_s": startup_s, "weights_measured_bytes": memory.weights_bytes,
           "weights_planned_bytes": memory.planned.breakdown.weights_bytes,
           "startup_peak_allocated_bytes": torch.cuda.max_memory_allocated(),
           "kv_tokens": engine.kv_cache.pool.num_blocks * engine.block_size}
    prompts = [[128000 + i, 791, 6864, 315, 9822, 374] for i in range(4)]
    greedy = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    row["greedy_tokens"] = [run_to_end(engine, prompts, greedy)[f"r{i}"] for i in range(len(prompts))]
    batch = [[128000, *range(1000 + 64 * i, 1000 + 64 * i + 64)] for i in range(20)]
    start_s = time.monotonic()
    run_to_end(engine, batch, SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True))
    row["twenty_x_128_s"] = time.monotonic() - start_s
    engine.shutdown()
    del built, engine, memory
    return row


def run_to_end(engine, prompts: list[list[int]], params) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(engine.make_request(f"r{i}", prompt, params))
    while engine.has_unfinished:
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
    return tokens


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--checkpoint-first", action="store_true",
                        help="start from the checkpoint first (the first start-up also compiles the Triton kernels)")
    args = parser.parse_args()
    result: dict = {"card": torch.cuda.get_device_name(), "commit": os.environ.get("FITSERVE_COMMIT"),
                    "torch": torch.__version__, "budget_bytes": BUDGET_BYTES}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        result["checkpoint"] = write_checkpoint(Path(tmp))
        print(result, flush=True)
        runs = {"online": (str(CONFIG_DIR), "dummy", "fp8"), "checkpoint_run": (tmp, "auto", None)}
        result["order"] = sorted(runs, reverse=not args.checkpoint_first)  # "online" first by default
        for key in result["order"]:
            torch.cuda.empty_cache()
            result[key] = start_and_run(*runs[key])
    result["same_tokens"] = result["online"]["greedy_tokens"] == result["checkpoint_run"]["greedy_tokens"]
    for key in ("online", "checkpoint_run"):
        print(key, {k: v for k, v in result[key].items() if k != "greedy_tokens"}, flush=True)
    print("same greedy tokens:", result["same_tokens"], flush=True)
    Path(args.out, "fp8_checkpoint_load.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
