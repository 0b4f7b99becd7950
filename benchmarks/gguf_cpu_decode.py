"""Single-stream decode on the CPU: the embedded SmolLM2-135M (Q4_1) dequantized at load against
kept packed (`--quantization gguf`), which dequantizes each layer's blocks on every step.

Each repeat generates --tokens tokens greedily for one prompt; the best repeat of each mode is
reported (the machine may be shared). docs/quantization.md has the numbers.

    python benchmarks/gguf_cpu_decode.py --repeats 3 --tokens 32
"""

from __future__ import annotations

import argparse
import json
import time

from fitserve.llm import LLM
from fitserve.sampling_params import SamplingParams

PROMPT = "The quick brown fox"


def best_tokens_per_s(quantization: str | None, dtype: str, repeats: int, tokens: int) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    best = 0.0
    with LLM(device="cpu", dtype=dtype, quantization=quantization, kv_cache_memory_bytes=64 << 20,
             max_model_len=256, max_num_seqs=1) as llm:
        llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up
        for _ in range(repeats):
            start_s = time.perf_counter()
            llm.generate([PROMPT], params)
            best = max(best, tokens / (time.perf_counter() - start_s))
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    for quantization in (None, "gguf"):
        rate = best_tokens_per_s(quantization, args.dtype, args.repeats, args.tokens)
        print(json.dumps({"quantization": quantization or "dequantized at load", "dtype": args.dtype,
                          "tokens": args.tokens, "best_tokens_per_s": round(rate, 2)}), flush=True)


if __name__ == "__main__":
    main()
