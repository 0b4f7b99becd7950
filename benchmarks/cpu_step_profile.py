"""Where a CPU decode step's time goes: the embedded SmolLM2-135M, N streams decoding together.

Builds an in-process engine, prefills N prompts, then runs decode steps under torch.profiler with a
label around each part of the step (engine bookkeeping and detokenization, the batch build, the
model's forward, the attention layers, the logits, the sampler) and prints each part's share of the
step, plus the aten ops by their own time. A part's time is inclusive (the attention layers' time is
inside the forward's). Shares, not absolute times, are the point: the profiler adds its own cost per
op, and on a shared machine the absolute times move from run to run.

    python benchmarks/cpu_step_profile.py --streams 1 --streams 16 --dtype bfloat16 --dtype float32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from fitserve.llm import LLM
from fitserve.layers.attention import PagedAttention
from fitserve.runner import model_runner
from fitserve.sampling_params import SamplingParams

PROMPT_TOKENS = 128
PARTS = ("engine.step", "runner.execute", "build_forward_batch", "model.forward", "attention (layer)",
         "paged_attention", "store_kv", "compute_logits", "sampler")


def _labelled(label: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def labels(llm: LLM) -> Iterator[None]:
    """Wrap the step's parts in record_function labels (restored on exit)."""
    runner = llm.engine.runner
    model = runner.model
    from fitserve.kernels import reference
    saved = [(llm.engine, "step", llm.engine.step), (runner, "execute_async", runner.execute_async),
             (model_runner, "build_forward_batch", model_runner.build_forward_batch),
             (model, "forward", model.forward), (model, "compute_logits", model.compute_logits),
             (runner.sampler, "sample_device", runner.sampler.sample_device),
             (PagedAttention, "forward", PagedAttention.forward),
             (reference, "paged_attention", reference.paged_attention), (reference, "store_kv", reference.store_kv)]
    names = ("engine.step", "runner.execute", "build_forward_batch", "model.forward", "compute_logits", "sampler",
             "attention (layer)", "paged_attention", "store_kv")
    for (owner, attr, fn), label in zip(saved, names):
        setattr(owner, attr, _labelled(label, fn))
    try:
        yield
    finally:
        for owner, attr, fn in saved:
            if owner is model or owner is llm.engine or owner is runner or owner is runner.sampler:
                delattr(owner, attr)
            else:
                setattr(owner, attr, fn)


def start_streams(llm: LLM, num_streams: int, max_tokens: int) -> None:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i in range(num_streams):
        ids = [(7 * i + j) % 4000 + 100 for j in range(PROMPT_TOKENS)]
        llm.engine.add_request(llm.engine.make_request(f"s{i}", ids, params))
    for _ in range(num_streams + 2):  # prefill (chunked or not) and the first decode steps
        llm.engine.step()


def profile_steps(llm: LLM, num_streams: int, num_steps: int) -> dict:
    start_streams(llm, num_streams, max_tokens=num_steps * 3 + 8)
    start_s = time.perf_counter()
    for _ in range(num_steps):  # without the profiler: the step's real time
        llm.engine.step()
    step_s = (time.perf_counter() - start_s) / num_steps
    with labels(llm), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(num_steps):
            llm.engine.step()
    while llm.engine.has_unfinished:
        llm.engine.step()
    events = prof.key_averages()
    by_key = {e.key: e for e in events}
    total_us = by_key["engine.step"].cpu_time_total
    parts = {p: round(100 * by_key[p].cpu_time_total / total_us, 1) for p in PARTS if p in by_key}
    ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)
    return {"streams": num_streams, "step_ms_unprofiled": round(1000 * step_s, 2),
            "step_ms_profiled": round(total_us / num_steps / 1000, 2), "parts_pct_of_step": parts,
            "top_ops_self_pct": {e.key: round(100 * e.self_cpu_time_total / total_us, 1) for e in ops[:12]},
            "aten_self_pct_total": round(100 * sum(e.self_cpu_time_total for e in ops) / total_us, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, action="append")
    parser.add_argument("--dtype", action="append")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's choice)")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for dtype in args.dtype or ["auto"]:
        with LLM(device="cpu", dtype=dtype, max_model_len=512, max_num_seqs=16,
                 kv_cache_memory_bytes=128 << 20) as llm:
            for num_streams in args.streams or [1, 16]:
                result = profile_steps(llm, num_streams, args.steps)
                print(json.dumps({"dtype": dtype, "threads": torch.get_num_threads(), **result}), flush=True)


if __name__ == "__main__":
    main()
