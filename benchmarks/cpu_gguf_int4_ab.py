"""In-process A/B of the embedded model's GGUF weights on the CPU with the packaged decode step: `--quantization
gguf` (4-bit projections through torch's int4 matmul up to 8 rows, bf16 above) against dequantized at load
(bf16), 16 streams and one, 128-token prompts of random ids, 64 greedy tokens (ignore_eos), prefill included;
the variants take turns in each of three repeats. Both packages must be in $TORCHINDUCTOR_CACHE_DIR (the
LLM class builds a missing one in place, a minute or two; `FITSERVE_AOT_BUILD_HERE=1 fitserve serve` also
builds them). One line of JSON per run.

    TORCHINDUCTOR_CACHE_DIR=/tmp/ind python benchmarks/cpu_gguf_int4_ab.py
"""

from __future__ import annotations

import json
import random
import time

from fitserve.llm import LLM
from fitserve.sampling_params import SamplingParams

OUTPUT_TOKENS = 64


def random_prompts(count: int = 16, length: int = 128) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randint(100, 30000) for _ in range(length)] for _ in range(count)]


def time_streams(llm: LLM, prompts: list[list[int]], variant: str, repeat: int) -> None:
    """16 streams, then one: a warm-up token, then OUTPUT_TOKENS greedy tokens each; a JSON line per run."""
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)
    for streams in (16, 1):
        batch = prompts[:streams]
        llm.generate(batch, SamplingParams(max_tokens=1, ignore_eos=True))  # warm
        start = time.perf_counter()
        llm.generate(batch, params)
        seconds = time.perf_counter() - start
        print(json.dumps({"repeat": repeat, "variant": variant, "streams": streams,
                          "output_tok_s": round(streams * OUTPUT_TOKENS / seconds, 1)}), flush=True)


def main() -> None:
    prompts = random_prompts()
    llms = {"int4": LLM(cpu_compile="aot", quantization="gguf"), "bf16": LLM(cpu_compile="aot")}
    for repeat in range(3):
        for name, llm in llms.items():
            time_streams(llm, prompts, name, repeat)


if __name__ == "__main__":
    main()
