"""fitserve: an LLM inference server with a paged KV cache and continuous batching.

Offline use: `from fitserve.llm import LLM`; `from fitserve.sampling_params import SamplingParams`.
The package root imports nothing, so torch-free parts stay torch-free.
"""

import os

__version__ = "0.1.0"

# torch's OpenMP threads sleep between parallel ops instead of spinning: spinning, two threads on a
# 2-core machine whose cores anything else wants (the HTTP server's own thread included) made a CPU
# decode step 5x slower; sleeping, two threads are as fast as one there and 1.1x faster at 16 streams
# (docs/benchmarks.md, "Where a CPU step goes"). OpenMP reads this once, when torch loads it: it
# takes effect when fitserve is imported before torch (`fitserve serve` always is). The user's own
# setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
