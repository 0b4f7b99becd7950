"""The CPU decode step's time against context length, in-process: 16 streams of random prompts of 16 to 2048
tokens (prefix caching off, so every prompt is computed), the time of 65 greedy tokens less that of 1, over 64:
the decode step at that context, twice each. `--cpu-compile aot` (the package; TORCHINDUCTOR_CACHE_DIR should
hold it) or `off` (eager). The slope is what the attention pays per token of context; the intercept, the rest.

    TORCHINDUCTOR_CACHE_DIR=... python benchmarks/cpu_context_sweep.py aot
    python benchmarks/cpu_context_sweep.py off
"""

from __future__ import annotations

import json
import random
import sys
import time

from fitserve.llm import LLM
from fitserve.sampling_params import SamplingParams

CONTEXTS = (16, 256, 1024, 2048)


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "aot"
    llm = LLM(cpu_compile=mode, quantization="gguf", enable_prefix_caching=False)
    rng = random.Random(0)
    for context in CONTEXTS if mode == "aot" else CONTEXTS[:3]:
        prompts = [[rng.randint(100, 30000) for _ in range(context)] for _ in range(16)]
        steps_ms = []
        for _ in range(2):
            start = time.perf_counter()
            llm.generate(prompts, SamplingParams(max_tokens=1, ignore_eos=True))
            prefill_s = time.perf_counter() - start
            start = time.perf_counter()
            llm.generate(prompts, SamplingParams(max_tokens=65, temperature=0.0, ignore_eos=True))
            steps_ms.append(round((time.perf_counter() - start - prefill_s) / 64 * 1e3, 2))
        print(json.dumps({"cpu_compile": mode, "context": context, "streams": 16, "decode_step_ms": steps_ms}),
              flush=True)


if __name__ == "__main__":
    main()
