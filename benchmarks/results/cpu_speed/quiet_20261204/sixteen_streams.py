import sys, time, os
from fitserve.llm import LLM
from fitserve.sampling_params import SamplingParams
dtype = sys.argv[1]
llm = LLM(dtype=dtype)
p = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
prompts = [f"Write a long essay number {i} about the history of France and its kings." for i in range(16)]
llm.generate(prompts[:2], p)
best = 0
for _ in range(2):
    t = time.perf_counter(); llm.generate(prompts, p); dt = time.perf_counter() - t
    best = max(best, 16 * 64 / dt)
print(os.environ.get("TAG"), dtype, f"{best:.1f} tok/s at 16 streams (best of 2, 64 tokens each incl. prefill)")
