"""fitserve: an LLM inference server with a paged KV cache and continuous batching.

Offline use: `from fitserve.llm import LLM`; `from fitserve.sampling_params import SamplingParams`.
The package root imports nothing, so torch-free parts stay torch-free.
"""

import os

__version__ = "0.1.0"

# torch's OpenMP threads spin for about 0.3 ms (GOMP_SPINCOUNT=30000) after a parallel op, then sleep.
# Within a decode step the next op comes sooner than that, so they stay awake for it; between steps,
# and when a step waits, they sleep and leave the cores to the HTTP thread and to anything else on the
# machine. Sleeping at once (OMP_WAIT_POLICY=PASSIVE, the previous setting) cost a 2-core machine 1.5x
# at one stream in bfloat16, and spinning without end made a step up to 5x slower when anything else
# wanted the cores (docs/benchmarks.md, "Where a CPU step goes"). OpenMP reads these once, when torch
# loads it: they take effect when fitserve is imported before torch (`fitserve serve` always is). A
# user who sets either variable keeps both as they are.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = "30000"
