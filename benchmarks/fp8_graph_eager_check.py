"""Which fp8 small-batch table makes CUDA-graph decode differ from eager (diagnostic, GPU).

Runs tests/test_fp8_gpu.py's graph-vs-eager engine check under several SMALL_M_TABLEs, with
async scheduling off and on, and reports per table whether the greedy tokens matched (and, where
not, each request's first differing token). Writes fp8_graph_eager_check.json to --out.
On the H200 at b6f984a every table matched (results/fp8_graph_eager_check_h200_b6f984a.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fitserve.kernels import triton_fp8_small as small

G, S = small.GemvConfig, small.SplitKConfig
# "present" in results/fp8_graph_eager_check_h200_b6f984a.json: the table before the tuned tiles
PRESENT = (small.SmallMChoice(1, "gemv", G(8, 2048, 8), False), small.SmallMChoice(16, "split_k", S(16, 64, 256, 0), True),
           small.SmallMChoice(32, "split_k", S(32, 64, 256, 0), True))
TABLES = {
    "present": PRESENT,
    "tuned": (small.SmallMChoice(1, "gemv", G(4, 1024, 4), False), small.SmallMChoice(32, "split_k", S(32, 64, 128, 4), True)),
    "tuned_gemv_only": (small.SmallMChoice(1, "gemv", G(4, 1024, 4), False),) + PRESENT[1:],
    "tuned_split_only": PRESENT[:1] + (small.SmallMChoice(32, "split_k", S(32, 64, 128, 4), True),),
    "split4_bk64_m16": PRESENT[:1] + (small.SmallMChoice(32, "split_k", S(16, 64, 64, 4), True),),
    "split1_bk128_m32": PRESENT[:1] + (small.SmallMChoice(32, "split_k", S(32, 64, 128, 1), True),),
    "no_small": (),
}


def run(name: str, async_scheduling: bool) -> dict:
    from test_fp8_gpu import graph_and_eager_tokens

    small.SMALL_M_TABLE = TABLES[name]
    results = graph_and_eager_tokens("fp8", async_scheduling)
    diffs = {rid: next(i for i, (a, b) in enumerate(zip(results[0][rid], results[1][rid])) if a != b)
             for rid in results[0] if results[0][rid] != results[1][rid]}
    return {"table": name, "async": async_scheduling, "equal": results[0] == results[1], "first_diff": diffs}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    rows = []
    for name in TABLES:
        for async_scheduling in (False, True):
            row = run(name, async_scheduling)
            print(row, flush=True)
            rows.append(row)
    Path(args.out, "fp8_graph_eager_check.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
