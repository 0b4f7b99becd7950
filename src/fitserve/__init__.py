"""fitserve: an LLM inference server with a paged KV cache and continuous batching.

Offline use: `from fitserve.llm import LLM`; `from fitserve.sampling_params import SamplingParams`.
The package root imports nothing, so torch-free parts stay torch-free.
"""

import os

__version__ = "0.1.0"

# torch's OpenMP threads sleep between parallel ops instead of spinning. Spinning is faster on a machine
# that runs nothing else (one bf16 stream through HTTP on 2 cores: 25.4 tok/s with GOMP_SPINCOUNT=30000
# against 17.4 asleep), and collapses when anything else wants a core: with one busy process beside the
# server, 3.6 tok/s spinning against 16.9 asleep (docs/benchmarks.md, "bf16 on an AVX2 CPU"). A server
# with the machine to itself can set GOMP_SPINCOUNT=30000. OpenMP reads this once, when torch loads it:
# it takes effect when fitserve is imported before torch (`fitserve serve` always is). The user's own
# setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
