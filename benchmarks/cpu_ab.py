"""A/B of the CPU path's choices in one process, interleaved: the embedded SmolLM2-135M, in-process LLM.

Every variant is built once; then each repeat runs every variant in turn (so a busy minute on a
shared machine hits all of them alike), and the median output tok/s of each is reported with its
ratio to the first variant. Decode steps alone are timed: the prompts are prefilled once
per dtype (untimed; at 16 streams a prefill would swamp a short run), then the variants of that dtype
take turns decoding the same streams. A variant is dtype / decode attention / torch threads:

- dtype: bfloat16 or float32 (`--dtype auto` picks float32 on a CPU without bf16 units);
- attention: "grouped" (kernels/reference.py's _decode_sdpa_grouped, the default) or "repeat"
  (K and V copied per query head of a group, as before it);
  or "compiled" (`--cpu-compile decode`, runner/cpu_compile.py: the decode step compiled by inductor, whose
  attention reads K and V in place, kernels/reference._decode_attention_in_place) or "compiled-sdpa" (the
  same, with the attention as eager's: gathered blocks and SDPA); the compiled variants are built, and
  compiled or loaded from inductor's cache, before the timed runs;
- threads: torch's intra-op threads (set before each variant's run). OpenMP's wait policy is the
  environment's (this script loads torch before fitserve, whose import would set PASSIVE): run it
  with OMP_WAIT_POLICY=PASSIVE to measure what `fitserve serve` does.

    python benchmarks/cpu_ab.py --streams 1 --streams 16 --steps 16 --repeats 3 \
        --variant bfloat16/repeat/2 --variant float32/grouped/2 --variant float32/grouped/1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Iterator

import torch

from fitserve.config import inductor_cache_dir
from fitserve.kernels import reference
from fitserve.llm import LLM
from fitserve.runner.cpu_compile import CpuDecodeCompile
from fitserve.sampling_params import SamplingParams

PROMPT_TOKENS = 128


def _repeat_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The decode attention before _decode_sdpa_grouped: K and V repeated per query head."""
    o = reference._sdpa(q[:, :, None, :], k, v, mask[:, None], scale)  # [S, H, 1, D]
    return o[:, :, 0, :]


def _gathered_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                   seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """_decode_attention_in_place's signature, eager's gather and SDPA (the "compiled-sdpa" variant)."""
    k = k_cache[table].flatten(1, 2).transpose(1, 2)  # [S, Hkv, L, D]
    v = v_cache[table].flatten(1, 2).transpose(1, 2)
    mask = torch.arange(k.shape[2])[None, None, :] < seq_lens[:, None, None]  # [S, 1, L]
    return reference._decode_sdpa_grouped(q, k, v, mask, scale)


@contextlib.contextmanager
def attention(kind: str, llm: LLM, compiled: dict[str, CpuDecodeCompile]) -> Iterator[None]:
    """The variant's attention, and its compiled step (the runner's cpu_compile) for the compiled kinds.
    Dynamo guards on the attention function it traced, so the two compiled kinds are two cache entries."""
    grouped, in_place = reference._decode_sdpa_grouped, reference._decode_attention_in_place
    runner = llm.engine.runner
    if kind == "repeat":
        reference._decode_sdpa_grouped = _repeat_heads
    if kind == "compiled-sdpa":
        reference._decode_attention_in_place = _gathered_sdpa
    if kind.startswith("compiled"):
        runner.cpu_compile = compiled.setdefault(kind, CpuDecodeCompile(runner.model, runner.capacity.block_size,
                                                                        inductor_cache_dir()))
    try:
        yield
    finally:
        reference._decode_sdpa_grouped, reference._decode_attention_in_place = grouped, in_place
        runner.cpu_compile = None


def start_streams(llm: LLM, num_streams: int, max_tokens: int) -> list[str]:
    """N prompts prefilled (untimed) until every stream has its first token; returns their ids."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine = llm.engine
    ids = [f"ab{num_streams}-{i}" for i in range(num_streams)]
    for i, request_id in enumerate(ids):
        prompt = [(7 * i + j) % 4000 + 100 for j in range(PROMPT_TOKENS)]
        engine.add_request(engine.make_request(request_id, prompt, params))
    started: set[str] = set()
    while len(started) < num_streams:
        started.update(o.request_id for o in engine.step() if o.new_token_ids)
    return ids


def decode_tok_s(llm: LLM, num_streams: int, num_steps: int) -> float:
    """Output tok/s of num_steps decode steps of the streams already running (each step: one token each)."""
    start_s = time.perf_counter()
    for _ in range(num_steps):
        outputs = llm.engine.step()
        assert not any(o.finished for o in outputs), "a stream ran out: more max_tokens"
    return num_streams * num_steps / (time.perf_counter() - start_s)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", action="append", required=True, help="dtype/attention/threads")
    parser.add_argument("--streams", type=int, action="append")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    variants = [tuple(v.split("/")) for v in args.variant]
    llms = {dtype: LLM(device="cpu", dtype=dtype, max_model_len=512, max_num_seqs=16,
                       kv_cache_memory_bytes=256 << 20) for dtype in sorted({v[0] for v in variants})}
    compiled: dict[str, dict[str, CpuDecodeCompile]] = {dtype: {} for dtype in llms}
    for dtype, kind, _ in variants:  # compile (or load) before any timed run
        if kind.startswith("compiled"):
            with attention(kind, llms[dtype], compiled[dtype]):
                print(f"# {dtype}/{kind}: compiled in {llms[dtype].engine.runner.cpu_compile.warm_up():.1f} s",
                      flush=True)
    for num_streams in args.streams or [1, 16]:
        # one set of streams per dtype, prefilled once; the variants of a dtype take turns on it, so
        # every variant decodes at the same context lengths (they grow by `steps` per turn)
        max_tokens = 2 + args.repeats * args.steps * len(variants)
        streams = {dtype: start_streams(llm, num_streams, max_tokens) for dtype, llm in llms.items()}
        rates: dict[str, list[float]] = {"/".join(v): [] for v in variants}
        for _ in range(args.repeats):
            for dtype, kind, threads in variants:
                torch.set_num_threads(int(threads))
                with attention(kind, llms[dtype], compiled[dtype]):
                    rate = decode_tok_s(llms[dtype], num_streams, args.steps)
                rates[f"{dtype}/{kind}/{threads}"].append(rate)
                print(f"# {num_streams} streams {dtype}/{kind}/{threads}: {rate:.2f} tok/s", flush=True)
        for dtype, llm in llms.items():
            for request_id in streams[dtype]:
                llm.engine.abort_request(request_id)
            while llm.engine.has_unfinished:
                llm.engine.step()
        medians = {name: statistics.median(r) for name, r in rates.items()}
        first = medians["/".join(variants[0])]
        print(json.dumps({"streams": num_streams, "decode_steps": args.steps, "prompt_tokens": PROMPT_TOKENS,
                          "repeats": args.repeats, "tok_s_median": {k: round(v, 2) for k, v in medians.items()},
                          "ratio_to_first": {k: round(v / first, 2) for k, v in medians.items()},
                          "tok_s_all": {k: [round(x, 2) for x in r] for k, r in rates.items()}}), flush=True)


if __name__ == "__main__":
    main()
