import sys, time, os
from fitserve.llm import LLM
from fitserve.sampling_params import SamplingParams
dtype = sys.argv[1]
llm = LLM(dtype=dtype) if dtype != "default" else LLM()
p = SamplingParams(max_tokens=96, temperature=0, ignore_eos=True)
llm.generate(["Tell me a story about a cat."], p)
best = 0
for _ in range(3):
    t = time.perf_counter(); out = llm.generate(["Write a long essay about the history of France and its kings."], p); dt = time.perf_counter() - t
    best = max(best, 96 / dt)
print(os.environ.get("TAG"), dtype, f"{best:.1f} tok/s (best of 3, 96 tokens incl. prefill)")
