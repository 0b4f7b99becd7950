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


def main() -> None:
    rng = random.Random(0)
    prompts = [[rng.randint(100, 30000) for _ in range(128)] for _ in range(16)]
    llms = {"int4": LLM(cpu_compile="aot", quantization="gguf"), "bf16": LLM(cpu_compile="aot")}
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)
    for repeat in range(3):
        for name, llm in llms.items():
            for streams in (16, 1):
                batch = prompts[:streams]
                llm.generate(batch, SamplingParams(max_tokens=1, ignore_eos=True))  # warm
                start = time.perf_counter()
                llm.generate(batch, params)
                seconds = time.perf_counter() - start
                print(json.dumps({"repeat": repeat, "variant": name, "streams": streams,
                                  "output_tok_s": round(streams * OUTPUT_TOKENS / seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
