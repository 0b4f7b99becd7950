"""In-process: the packaged CPU decode step as fitserve builds it (the model's own weights as user-managed
constants) against a frozen package (inductor's freezing: the weights folded into the package, its bf16
linears prepacked for oneDNN), the embedded model with its defaults (`--quantization gguf`), 16 streams and
one, 128-token prompts of random ids, 64 greedy tokens (ignore_eos), prefill included, 3 repeats. Run each
variant in its own process and cache dir (the package is built in place the first time, a minute or two):

    FITSERVE_AOT_BUILD_HERE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/plain python benchmarks/cpu_frozen_package_ab.py plain
    FITSERVE_AOT_BUILD_HERE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/frozen python benchmarks/cpu_frozen_package_ab.py frozen

The frozen variant patches the build and the load from here; fitserve itself does not freeze (a package that
holds the weights would have to be keyed by their values, and doubles their memory).
"""

from __future__ import annotations

import json
import sys
import time

import torch
from cpu_gguf_int4_ab import random_prompts, time_streams

import fitserve.runner.cpu_aot as cpu_aot
from fitserve.llm import LLM


def freeze_packages() -> None:
    compile_and_package = torch._inductor.aoti_compile_and_package

    def frozen(exported, package_path, inductor_configs=None):
        return compile_and_package(exported, package_path=package_path, inductor_configs={"freezing": True})

    def load(self) -> None:  # the package holds its constants
        self._package = torch._inductor.aoti_load_package(str(self.path))

    cpu_aot.torch._inductor.aoti_compile_and_package = frozen
    cpu_aot.CpuDecodePackage._load = load


def main() -> None:
    variant = sys.argv[1]
    if variant == "frozen":
        freeze_packages()
    start = time.perf_counter()
    llm = LLM(cpu_compile="aot", quantization="gguf")
    print(json.dumps({"variant": variant, "ready_s": round(time.perf_counter() - start, 1)}), flush=True)
    prompts = random_prompts()
    for repeat in range(3):
        time_streams(llm, prompts, variant, repeat)


if __name__ == "__main__":
    main()
