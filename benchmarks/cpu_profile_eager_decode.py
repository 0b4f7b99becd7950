"""torch.profiler over the embedded model's eager steps on the CPU (`--cpu-compile off`, its `--quantization gguf`
default): 16 streams of 128-token random prompts, a prefill step then 47 decode steps of 16 rows, greedy; the
ops by self CPU time. The packaged decode step's own loops are opaque to the profiler, so this is the eager
step's decomposition (the same ops: the projections, the reference attention's gathers and SDPA).

    python benchmarks/cpu_profile_eager_decode.py
"""

from __future__ import annotations

import random

import torch
from torch.profiler import profile, ProfilerActivity
from fitserve.llm import LLM
from fitserve.sampling_params import SamplingParams
torch.set_num_threads(2)
rng = random.Random(0)
prompts = [[rng.randint(100, 30000) for _ in range(128)] for _ in range(16)]
llm = LLM(cpu_compile="off", quantization="gguf")
llm.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True))
# decode-dominated: prefill is 1 step, then 48 decode steps of 16 rows
with profile(activities=[ProfilerActivity.CPU]) as prof:
    llm.generate(prompts, SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=48))
