"""The sampler's peak GPU memory against plan/estimates.sampler_peak_bytes, for Llama-3-8B's
vocabulary and a range of batch rows (the profiling run's worst case: every option on).

    python benchmarks/sampler_memory.py --out $OUT     # prints and writes sampler_memory.json

Only the lm_head is built (random bf16 weights): the sampler's memory does not depend on the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

ROWS = (1, 8, 32, 64, 65, 128, 200, 256)


class LmHead(torch.nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, device: torch.device) -> None:
        super().__init__()
        self.weight = torch.randn(vocab_size, hidden_size, device=device, dtype=torch.bfloat16) * 0.02

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ self.weight.T).float()


def main() -> None:
    from fitserve.arch_config import ArchConfig
    from fitserve.plan import estimates
    from fitserve.runner import profiling

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    arch = ArchConfig.from_hf_config(json.loads((ROOT / "configs" / "llama-3-8b-instruct" / "config.json").read_text()))
    device = torch.device("cuda")
    head = LmHead(arch.vocab_size, arch.hidden_size, device)
    hidden = torch.randn(max(ROWS), arch.hidden_size, device=device, dtype=torch.bfloat16)
    profiling.run_sampling(head, hidden, 8, device)  # warm-up: cuBLAS and sort workspaces exist before measuring
    rows_out = []
    for num_rows in ROWS:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        profiling.run_sampling(head, hidden, num_rows, device)
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - base
        planned = estimates.sampler_peak_bytes(arch, num_rows, act_bytes=2)
        rows_out.append({"rows": num_rows, "measured_bytes": measured, "planned_bytes": planned,
                         "measured_per_logit": measured / (num_rows * arch.vocab_size)})
        print(f"{num_rows:4d} rows: measured {measured / 2**20:8.1f} MiB, planned {planned / 2**20:8.1f} MiB "
              f"({measured / planned:.3f})", flush=True)
    report = {"card": torch.cuda.get_device_name(), "commit": os.environ.get("FITSERVE_COMMIT"), "rows": rows_out}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "sampler_memory.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
