"""fitserve: an LLM inference server with a paged KV cache and continuous batching.

Offline use: `from fitserve.llm import LLM`; `from fitserve.sampling_params import SamplingParams`.
The package root imports nothing, so torch-free parts stay torch-free.
"""

import os

__version__ = "0.1.0"

# torch's OpenMP threads spin briefly after a parallel op, then sleep: GOMP_SPINCOUNT=1000 (with
# OMP_WAIT_POLICY=PASSIVE, which the spin count overrides). A CPU decode step is hundreds of short
# parallel ops back to back; waking a sleeping thread for each (PASSIVE alone, the earlier default) cost
# a third of a packaged step, while spinning long (libgomp's own default, or GOMP_SPINCOUNT=30000) takes
# a core from anything else that wants it. Through HTTP on a 2-core AVX512 EPYC, the embedded model with
# its decode package (docs/benchmarks.md, "OpenMP's spin with the package"): quiet, one stream 34.7 tok/s
# against 25.5-27.0 asleep, 16 streams 257 against 213-216; beside a busy process 16.4 against 21.7 and
# 127 against 149. On a shared machine set OMP_WAIT_POLICY=PASSIVE (threads asleep; fitserve then runs
# one-token steps on one thread, runner/cpu_settings.py). OpenMP reads these once, when torch loads it:
# they take effect when fitserve is imported before torch (`fitserve serve` always is). The user's own
# settings win.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "1000"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
