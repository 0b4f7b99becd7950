"""A/B of the CPU path's choices in one process, interleaved: the embedded SmolLM2-135M, in-process LLM.

Every variant is built once; then each repeat runs every variant in turn (so a busy minute on a
shared machine hits all of them alike), and the median output tok/s of each is reported with its
ratio to the first variant. Decode steps alone are timed (the prompts are prefilled
first, untimed): prefill is another matter, and at 16 streams it would swamp a short run. A variant is dtype / decode attention / torch threads:

- dtype: bfloat16 or float32 (`--dtype auto` picks float32 on a CPU without bf16 units);
- attention: "grouped" (kernels/reference.py's _decode_sdpa_grouped, the default) or "repeat"
  (K and V copied per query head of a group, as before it);
- threads: torch's intra-op threads (set before each variant's run).

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

from fitserve.kernels import reference
from fitserve.llm import LLM
from fitserve.sampling_params import SamplingParams

PROMPT_TOKENS = 128


def _repeat_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The decode attention before _decode_sdpa_grouped: K and V repeated per query head."""
    o = reference._sdpa(q[:, :, None, :], k, v, mask[:, None], scale)  # [S, H, 1, D]
    return o[:, :, 0, :]


@contextlib.contextmanager
def attention(kind: str) -> Iterator[None]:
    grouped = reference._decode_sdpa_grouped
    if kind == "repeat":
        reference._decode_sdpa_grouped = _repeat_heads
    try:
        yield
    finally:
        reference._decode_sdpa_grouped = grouped


def decode_tok_s(llm: LLM, num_streams: int, num_steps: int) -> float:
    """Output tok/s of decode steps alone: N prompts prefilled first (untimed), then num_steps steps
    in which every stream decodes one token, timed; the streams then run out untimed."""
    params = SamplingParams(max_tokens=num_steps + num_streams + 4, temperature=0.0, ignore_eos=True)
    engine = llm.engine
    for i in range(num_streams):
        ids = [(7 * i + j) % 4000 + 100 for j in range(PROMPT_TOKENS)]
        engine.add_request(engine.make_request(f"ab{i}", ids, params))
    started: set[str] = set()
    while len(started) < num_streams:  # prefill (in chunks if need be) until every stream has a token
        started.update(o.request_id for o in engine.step() if o.new_token_ids)
    start_s = time.perf_counter()
    for _ in range(num_steps):
        engine.step()
    elapsed_s = time.perf_counter() - start_s
    while engine.has_unfinished:
        engine.step()
    return num_streams * num_steps / elapsed_s


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
    for llm in llms.values():
        decode_tok_s(llm, 1, 2)  # warm-up
    for num_streams in args.streams or [1, 16]:
        rates: dict[str, list[float]] = {"/".join(v): [] for v in variants}
        for _ in range(args.repeats):
            for dtype, kind, threads in variants:
                torch.set_num_threads(int(threads))
                with attention(kind):
                    rate = decode_tok_s(llms[dtype], num_streams, args.steps)
                rates[f"{dtype}/{kind}/{threads}"].append(rate)
                print(f"# {num_streams} streams {dtype}/{kind}/{threads}: {rate:.2f} tok/s", flush=True)
        medians = {name: statistics.median(r) for name, r in rates.items()}
        first = medians["/".join(variants[0])]
        print(json.dumps({"streams": num_streams, "decode_steps": args.steps, "prompt_tokens": PROMPT_TOKENS,
                          "repeats": args.repeats, "tok_s_median": {k: round(v, 2) for k, v in medians.items()},
                          "ratio_to_first": {k: round(v / first, 2) for k, v in medians.items()},
                          "tok_s_all": {k: [round(x, 2) for x in r] for k, r in rates.items()}}), flush=True)


if __name__ == "__main__":
    main()
